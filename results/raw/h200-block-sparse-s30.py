"""Session 30 A/B on one GPU: programmatic dependent launch (`USE_PDL`: each block-sparse kernel may start while the
one before it runs; dW's loop runs beside dX's last wave) and list spans (`USE_SPAN`: the forward/dX read a list's
(start, end) by launch position, beside its block index, instead of through it), each on and off. Per step (pack +
forward; zero-fill + dX + dW) and per linear fwd+bwd (bf16 weights, and fp32 masters under bf16 autocast),
CUDA-graph replays, 16k tokens; one autotuned config per kernel shared by all variants, variants interleaved over
rounds. Errors: max |err| / max |ref| against the fp32 reference, per variant. It ran on the working tree of that
A/B, in which `USE_SPAN` switched `_bsr_mm_kernel` (a constexpr SPAN) to read (start, end) pairs stored in launch
order; spans gained nothing (0.97-1.02x) and were removed, so this script no longer runs as it is. PDL shipped.

    PYTHONPATH=. python results/raw/h200-block-sparse-s30.py
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
VARIANTS = {"base": (False, False), "span": (False, True), "pdl": (True, False), "both": (True, True)}
t_start = time.time()
res = {
    "method": "mst (block-sparse linear)",
    "device": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "command": "PYTHONPATH=. python results/raw/h200-block-sparse-s30.py",
    "config": {"tokens": M, "dtype": "bfloat16", "timing": "CUDA graph replays, best of 3 x 50, 3 rounds",
               "variants": {k: {"USE_PDL": p, "USE_SPAN": s} for k, (p, s) in VARIANTS.items()}},  # fmt: skip
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
    wb = w.to(torch.bfloat16)
    packed = bs.pack_blocks(wb, info, torch.bfloat16)
    dens = info.density()
    want = {"fwd": bs.fwd_ref(x.float(), wb.float(), None, info), "bwd": bs.dw_ref(dy.float(), x.float(), info)}
    ops = {
        "fwd": lambda: bs.fwd_triton(x, wb, None, info),
        "bwd": lambda: bs._backward(dy, x, packed, info, "triton", torch.bfloat16, False, dens, True, True)[1],
    }
    xl, wl, w32 = x.clone().requires_grad_(), wb.clone().requires_grad_(), w.clone().requires_grad_()
    ops["fb"] = fwd_bwd(xl, wl, dy, info, False)
    ops["fb_amp"] = fwd_bwd(xl, w32, dy, info, True)
    row = {"shape": f"{in_f}x{out_f}", "block": block, "sparsity": sp, "ms": {}, "err": {}}
    for rnd in range(3):
        for name, (pdl, span) in VARIANTS.items():
            bs.USE_PDL, bs.USE_SPAN = pdl, span
            for op, fn in ops.items():
                key = f"{op}_{name}"
                if rnd == 0 and op in want:
                    row["err"][key] = rel_err(fn(), want[op])
                row["ms"].setdefault(key, []).append(graph_ms(fn))
    bs.USE_PDL = bs.USE_SPAN = True
    ops["fb"]()
    row["err"]["fb_dw_both"] = rel_err(wl.grad, want["bwd"])
    row["tuned"] = {str(k): str(v) for k, v in bs._bsr_mm_kernel.cache.items() if k[0] == M}
    row["ms"]["dense_fb"] = [graph_ms(dense_fwd_bwd(xl, wl, dy, False)) for _ in range(2)]
    row["ms"]["dense_fb_amp"] = [graph_ms(dense_fwd_bwd(xl, w32, dy, True)) for _ in range(2)]
    row["best"] = best = {k: min(v) for k, v in row["ms"].items()}
    row["over_base"] = {f"{op}_{n}": best[f"{op}_base"] / best[f"{op}_{n}"] for op in ops for n in VARIANTS}
    row["speedup"] = {f"{op}_{n}": best["dense_" + op] / best[f"{op}_{n}"] for op in ("fb", "fb_amp")
                      for n in VARIANTS}  # fmt: skip
    res["rows"].append(row)
    print(f"{time.time() - t_start:.0f}s {in_f}x{out_f} b{block} {sp}",
          {k: round(v, 4) for k, v in best.items()}, {k: round(v, 3) for k, v in row["speedup"].items()},
          {k: round(v, 3) for k, v in row["over_base"].items() if not k.endswith("base")}, flush=True)  # fmt: skip
    res["wall_s"] = time.time() - t_start
    with open(os.path.join(os.environ.get("OUT", "."), "h200-block-sparse-s30.json"), "w") as f:
        json.dump(res, f, indent=1)  # after every case: a run cut short keeps what it measured
