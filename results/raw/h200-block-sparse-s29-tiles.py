"""Session 29 sweep on one GPU: every `_bsr_mm_kernel` config (block-sparse forward / dX) timed on its own, the
tuning list's and 64-row tiles (4 warps: one warpgroup a 64×b dot; 90 registers and 48–96 KB of shared memory,
so 4 programs an SM where the 128-row tile fits 2–3). Then the linear fwd+bwd (bf16 weights, and fp32 masters
under autocast) autotuned over the shipped list against the list with the 64-row tiles added, interleaved over
2 rounds. CUDA-graph replays, 16k tokens, bf16.

Its first run stopped at the first fwd+bwd: autotuning the dX kernel inside the backward of `capture`'s warm-up
(side stream, autograd's device thread) failed to make a TMA descriptor ("invalid device context"). The forward
and dX are now tuned in the main thread first, as in the other scripts. The same fwd+bwd in a fresh process
(b=128, 1024x4096: eager, on a side stream, and through `capture`, each tuning from scratch) ran on the same
machine without the error, so it was this script's state (tuning caches cleared after single-config captures), not
the library's path; it was not pursued further.

    PYTHONPATH=. python results/raw/h200-block-sparse-s29-tiles.py
"""

# ruff: noqa: B023  (each lambda is captured into a CUDA graph at once, inside its loop iteration)
import json
import os
import time
import traceback

import torch
import torch.nn.functional as F

from kernels import block_sparse as bs
from kernels.bench_block_sparse import random_block_mask
from kernels.benchutil import graph_ms, rel_err

M = 16384
NEW = {128: [(64, 64, 4, 3), (64, 64, 4, 5), (64, 64, 4, 7)], 64: [(64, 64, 4, 3), (64, 64, 4, 5)]}
kernel = bs._bsr_mm_kernel
shipped = kernel.configs
t_start = time.time()
res = {
    "method": "mst (block-sparse linear)",
    "device": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "command": "PYTHONPATH=. python results/raw/h200-block-sparse-s29-tiles.py",
    "config": {"tokens": M, "dtype": "bfloat16", "timing": "CUDA graph replays, best of 3 x 50",
               "new_tiles": {str(k): v for k, v in NEW.items()}},  # fmt: skip
    "rows": [],
}


def use(configs):
    kernel.configs = configs
    kernel.cache.clear()


def fwd_bwd(x, w, dy, info, amp, dense=False):
    def call():
        x.grad = w.grad = None
        with torch.autocast("cuda", torch.bfloat16, enabled=amp, cache_enabled=False):
            y = F.linear(x, w) if dense else bs.block_sparse_linear(x, w, None, info, dw_density=info.density())
        y.backward(dy)

    return call


cases = [(in_f, out_f, block, sp) for block, shapes in [(128, [(1024, 4096), (4096, 1024)]),
                                                        (64, [(768, 3072), (3072, 768)])]
         for in_f, out_f in shapes for sp in (0.75, 0.9)]  # fmt: skip
for in_f, out_f, block, sp in cases:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, in_f, generator=gen).to("cuda", torch.bfloat16)
    dy = torch.randn(M, out_f, generator=gen).to("cuda", torch.bfloat16)
    w = ((torch.rand(out_f, in_f, generator=gen) * 2 - 1) * in_f**-0.5).to("cuda")
    info = bs.build_block_mask_info(random_block_mask(out_f // block, in_f // block, sp, gen), block, "cuda")
    packed = bs.pack_blocks(w, info, torch.bfloat16)
    want = {"fwd": bs.fwd_ref(x.float(), w, None, info), "dx": bs.dx_ref(dy.float(), w, info)}
    ops = {"fwd": lambda: bs.fwd_triton(x, w, None, info, packed), "dx": lambda: bs.dx_triton(dy, w, info, packed)}
    row = {"shape": f"{in_f}x{out_f}", "block": block, "sparsity": sp, "config_ms": {}, "err": {}}
    kept = bs.mm_configs_for(bs._configs(("BM", "BK"), bs.MM_TILES + NEW[block], bs._set_mm_boxes), block, 2,
                             bs._smem_limit(torch.device("cuda")))  # fmt: skip
    for cfg in kept:
        name = f"{cfg.kwargs['BM']}x{cfg.kwargs['BK']}w{cfg.num_warps}s{cfg.num_stages}"
        use([cfg])
        for op, fn in ops.items():
            try:
                row["err"][f"{op} {name}"] = rel_err(fn(), want[op])
                row["config_ms"][f"{op} {name}"] = graph_ms(fn)
            except Exception:
                row.setdefault("failed", {})[f"{op} {name}"] = traceback.format_exc()[-1500:]
                print("FAILED", op, name, traceback.format_exc()[-600:], flush=True)
    extended = bs._configs(("BM", "BK"), bs.MM_TILES + NEW[block], bs._set_mm_boxes)
    xl, wb, w32 = x.clone().requires_grad_(), w.to(torch.bfloat16).requires_grad_(), w.clone().requires_grad_()
    row["fb_ms"] = {}
    for rnd in range(2):
        for lname, lst in (("shipped", shipped), ("with64", extended)):
            use(lst)
            for fn in ops.values():  # tuned here, not inside the backward of a capture's warm-up (see above)
                fn()
            for amp, wt in ((False, wb), (True, w32)):
                key = f"fb{'_amp' if amp else ''} {lname}"
                row["fb_ms"].setdefault(key, []).append(graph_ms(fwd_bwd(xl, wt, dy, info, amp)))
            if rnd == 1:
                row[f"tuned {lname}"] = [str(v) for k, v in kernel.cache.items() if k[0] == M]
    for amp, wt in ((False, wb), (True, w32)):
        row["fb_ms"][f"dense{'_amp' if amp else ''}"] = [graph_ms(fwd_bwd(xl, wt, dy, info, amp, True))]
    best = {k: min(v) for k, v in row["fb_ms"].items()}
    row["speedup"] = {k: best["dense_amp" if "amp" in k else "dense"] / v for k, v in best.items() if "dense" not in k}
    res["rows"].append(row)
    fastest = {op: min((v, k) for k, v in row["config_ms"].items() if k.startswith(op)) for op in ops}
    print(f"{time.time() - t_start:.0f}s {in_f}x{out_f} b{block} {sp}", fastest,
          {k: round(v, 3) for k, v in row["speedup"].items()}, flush=True)  # fmt: skip
    res["wall_s"] = time.time() - t_start
    with open(os.path.join(os.environ.get("OUT", "."), "h200-block-sparse-s29-tiles.json"), "w") as f:
        json.dump(res, f, indent=1)  # after every case: a run cut short keeps what it measured
use(shipped)
