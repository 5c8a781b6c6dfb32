"""Session 28 A/B on one GPU: the launch order of the block-sparse forward / dX kernel (`_bsr_mm_kernel`). Token
tile by token tile throughout (`MM_TAIL_WAVES` 0, the order before) against a list-major tail of the last 1, 2 or
4 programs per multiprocessor. Per kernel, CUDA-graph replays, 16k tokens, bf16; each case autotuned once (with
the shipped default), then every variant timed with that config, interleaved over rounds. Errors: max |err| /
max |ref| against the fp32 reference. Then, retuned at the default tail, `deep`: the tuning list plus 7-stage
configs (4 chunks in flight).

Its first two runs also had a `ws` variant: the K loop as `tl.range(..., warp_specialize=True)` (a switch in that
working tree, since removed), 4-warp configs, which Triton 3.6 compiles for sm90 as a TMA producer warp and one
consumer warpgroup (12 warps). On the H200 its first launch (1024x4096, b=128, 75%, the forward) hung: both runs
were killed by their timeouts (420 s, 445 s), and nothing else of them was kept.

    PYTHONPATH=. python results/raw/h200-block-sparse-s28.py
"""

# ruff: noqa: B023  (each lambda is captured into a CUDA graph at once, inside its loop iteration)
import json
import os
import time

import torch
import torch.nn.functional as F

from kernels import block_sparse as bs
from kernels.bench_block_sparse import random_block_mask
from kernels.benchutil import graph_ms, rel_err

M = 16384
WAVES = (0, 1, 2, 4)
DEEP = [(256, 64, 8, 7), (128, 64, 4, 7), (128, 64, 8, 7)]
t_start = time.time()
default = bs.MM_TAIL_WAVES
res = {
    "method": "mst (block-sparse linear, fwd and dX)",
    "device": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "command": "PYTHONPATH=. python results/raw/h200-block-sparse-s28.py",
    "config": {
        "tokens": M,
        "dtype": "bfloat16",
        "timing": "CUDA graph replays, best of 3 x 50, 2 rounds",
        "tail_waves": WAVES,
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
    },
    "rows": [],
}
cases = [(in_f, out_f, block, sp) for block, shapes in [(128, [(1024, 4096), (4096, 1024)]),
                                                        (64, [(768, 3072), (3072, 768)])]
         for in_f, out_f in shapes for sp in (0.75, 0.9)]  # fmt: skip
for in_f, out_f, block, sp in cases:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, in_f, generator=gen).to("cuda", torch.bfloat16)
    dy = torch.randn(M, out_f, generator=gen).to("cuda", torch.bfloat16)
    w = torch.randn(out_f, in_f, generator=gen).to("cuda")
    mask = random_block_mask(out_f // block, in_f // block, sp, gen)
    info = bs.build_block_mask_info(mask, block, "cuda")
    packed = bs.pack_blocks(w, info, torch.bfloat16)
    want = {"fwd": bs.fwd_ref(x.float(), w, None, info), "dx": bs.dx_ref(dy.float(), w, info)}
    ops = {"fwd": lambda: bs.fwd_triton(x, w, None, info, packed), "dx": lambda: bs.dx_triton(dy, w, info, packed)}
    row = {"shape": f"{in_f}x{out_f}", "block": block, "sparsity": sp, "ms": {}, "err": {}}
    bs.MM_TAIL_WAVES = default
    for fn in ops.values():
        fn()  # autotune with the default
    row["tuned"] = {str(k): str(v) for k, v in bs._bsr_mm_kernel.cache.items()}
    print(f"{time.time() - t_start:.0f}s {in_f}x{out_f} b={block} {sp}: tuned", flush=True)
    for r in range(2):
        for waves in WAVES:
            bs.MM_TAIL_WAVES = waves
            for op, fn in ops.items():
                key = f"{op}_tail{waves}"
                if r == 0:
                    row["err"][key] = rel_err(fn(), want[op])
                row["ms"].setdefault(key, []).append(graph_ms(fn))
    # Retuned at the default tail with deeper pipelines in the list (4 chunks in flight, `mm_smem`).
    bs.MM_TAIL_WAVES = default
    kernel, shipped = bs._bsr_mm_kernel, bs._bsr_mm_kernel.configs
    kernel.configs = bs._configs(("BM", "BK"), bs.MM_TILES + DEEP, bs._set_mm_boxes)
    kernel.cache.clear()
    print(f"{time.time() - t_start:.0f}s   deep", flush=True)
    for op, fn in ops.items():
        row["err"][f"{op}_deep"] = rel_err(fn(), want[op])
        row["ms"][f"{op}_deep"] = [graph_ms(fn) for _ in range(3)]
    row["tuned_deep"] = {str(k): str(v) for k, v in kernel.cache.items()}
    kernel.configs = shipped
    kernel.cache.clear()
    wb = w.to(torch.bfloat16)
    row["ms"]["dense_fwd"] = graph_ms(lambda: F.linear(x, wb))
    row["ms"]["dense_dx"] = graph_ms(lambda: dy @ wb)
    row["best"] = {k: min(v) for k, v in row["ms"].items() if isinstance(v, list)}
    row["over_tail0"] = {k: row["best"][k.split("_")[0] + "_tail0"] / v for k, v in row["best"].items()}
    res["rows"].append(row)
    print(f"{time.time() - t_start:.0f}s", json.dumps({k: row[k] for k in ("shape", "block", "sparsity", "best")}),
          flush=True)  # fmt: skip
    res["wall_s"] = time.time() - t_start
    with open(os.path.join(os.environ.get("OUT", "."), "h200-block-sparse-s28.json"), "w") as f:
        json.dump(res, f, indent=1)  # after every case: a run cut short keeps what it measured
bs.MM_TAIL_WAVES = default
