"""Session 29 A/B on one GPU: `_bsr_mm_kernel` (block-sparse forward / dX) storing its output tile through a TMA
descriptor (`MM_TMA_STORE`) against the pointer store. Per kernel and per linear fwd+bwd (bf16 weights, and fp32
masters under bf16 autocast), CUDA-graph replays, 16k tokens; each kernel variant autotuned on its own (C_TMA is
in the autotune key), variants interleaved over rounds. Errors: max |err| / max |ref| against the fp32 reference.
It ran on the working tree of that A/B, in which `MM_TMA_STORE` switched `_bsr_mm_kernel` (a constexpr C_TMA)
between the two stores; the TMA store won everywhere and is now the kernel's only one, the switch gone.

    PYTHONPATH=. python results/raw/h200-block-sparse-s29.py
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
FLAGS = (False, True)
t_start = time.time()
res = {
    "method": "mst (block-sparse linear)",
    "device": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "command": "PYTHONPATH=. python results/raw/h200-block-sparse-s29.py",
    "config": {"tokens": M, "dtype": "bfloat16", "timing": "CUDA graph replays, best of 3 x 50, 3 rounds",
               "variants": {"store": "pointer store (tl.store)", "tma": "TMA descriptor store"}},  # fmt: skip
    "rows": [],
}


def fwd_bwd(x, w, dy, info, amp):
    def call():
        x.grad = w.grad = None
        with torch.autocast("cuda", torch.bfloat16, enabled=amp, cache_enabled=False):
            y = bs.block_sparse_linear(x, w, None, info, backend="triton", dw_density=info.density())
        y.backward(dy)

    return call


def dense_fwd_bwd(x, w, dy, amp):
    def call():
        x.grad = w.grad = None
        with torch.autocast("cuda", torch.bfloat16, enabled=amp, cache_enabled=False):
            y = F.linear(x, w)
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
    mask = random_block_mask(out_f // block, in_f // block, sp, gen)
    info = bs.build_block_mask_info(mask, block, "cuda")
    packed = bs.pack_blocks(w, info, torch.bfloat16)
    want = {"fwd": bs.fwd_ref(x.float(), w, None, info), "dx": bs.dx_ref(dy.float(), w, info)}
    ops = {"fwd": lambda: bs.fwd_triton(x, w, None, info, packed), "dx": lambda: bs.dx_triton(dy, w, info, packed)}
    xl, wb, w32 = x.clone().requires_grad_(), w.to(torch.bfloat16).requires_grad_(), w.clone().requires_grad_()
    ops["fb"] = fwd_bwd(xl, wb, dy, info, False)
    ops["fb_amp"] = fwd_bwd(xl, w32, dy, info, True)
    row = {"shape": f"{in_f}x{out_f}", "block": block, "sparsity": sp, "ms": {}, "err": {}}
    for rnd in range(3):
        for flag in FLAGS:
            bs.MM_TMA_STORE = flag
            name = "tma" if flag else "store"
            for op, fn in ops.items():
                key = f"{op}_{name}"
                if rnd == 0 and op in want:
                    row["err"][key] = rel_err(fn(), want[op])
                row["ms"].setdefault(key, []).append(graph_ms(fn))
    row["tuned"] = {str(k): str(v) for k, v in bs._bsr_mm_kernel.cache.items() if k[0] == M}
    row["ms"]["dense_fb"] = [graph_ms(dense_fwd_bwd(xl, wb, dy, False)) for _ in range(2)]
    row["ms"]["dense_fb_amp"] = [graph_ms(dense_fwd_bwd(xl, w32, dy, True)) for _ in range(2)]
    row["best"] = best = {k: min(v) for k, v in row["ms"].items()}
    row["tma_over_store"] = {op: best[f"{op}_store"] / best[f"{op}_tma"] for op in ops}
    row["speedup"] = {f"{op}_{n}": best["dense_" + op] / best[f"{op}_{n}"] for op in ("fb", "fb_amp")
                      for n in ("store", "tma")}  # fmt: skip
    res["rows"].append(row)
    print(f"{time.time() - t_start:.0f}s {in_f}x{out_f} b{block} {sp}",
          {k: round(v, 4) for k, v in best.items()}, {k: round(v, 3) for k, v in row["speedup"].items()},
          flush=True)  # fmt: skip
    res["wall_s"] = time.time() - t_start
    with open(os.path.join(os.environ.get("OUT", "."), "h200-block-sparse-s29.json"), "w") as f:
        json.dump(res, f, indent=1)  # after every case: a run cut short keeps what it measured
bs.MM_TMA_STORE = False
