"""Session 29 A/B on one GPU: `_pack_kernel` (the fp32 master's used blocks cast to bf16, once a step) with each
b×b block split over b / PACK_ROWS programs (PACK_ROWS 128 = one program a block, the kernel before) against 64,
32 and 16 rows a program; then the linear fwd+bwd at the old (128) and the new (32) split, bf16 weights and fp32
masters under autocast. CUDA-graph replays, 16k tokens, variants interleaved over 3 rounds; the packed blocks
must equal the one-program-a-block ones bit for bit.

It ran on the working tree of that A/B (`PACK_ROWS` and the kernel's RB split, since reverted: the pack took 3–5 µs
at every split and the fwd+bwd moved within ±0.5%). Its `same` flags compare whole packed buffers, whose padding
slots are never written (torch.empty): they are False for some masks at every split, 128 against itself included,
so they say nothing about the used blocks, which the test suite checks.

    PYTHONPATH=. python results/raw/h200-block-sparse-s29-pack.py
"""

# ruff: noqa: B023  (each lambda is captured into a CUDA graph at once, inside its loop iteration)
import json
import os
import time

import torch
import torch.nn.functional as F

from kernels import block_sparse as bs
from kernels.bench_block_sparse import random_block_mask
from kernels.benchutil import graph_ms

M = 16384
ROWS = (128, 64, 32, 16)
t_start = time.time()
res = {
    "method": "mst (block-sparse linear)",
    "device": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "command": "PYTHONPATH=. python results/raw/h200-block-sparse-s29-pack.py",
    "config": {"tokens": M, "timing": "CUDA graph replays, best of 3 x 50, 3 rounds", "pack_rows": ROWS},
    "rows": [],
}


def fwd_bwd(x, w, dy, info, amp, dense=False):
    def call():
        x.grad = w.grad = None
        with torch.autocast("cuda", torch.bfloat16, enabled=amp, cache_enabled=False):
            y = F.linear(x, w) if dense else bs.block_sparse_linear(x, w, None, info, dw_density=info.density())
        y.backward(dy)

    return call


cases = [(1024, 4096, 128, 0.75), (1024, 4096, 128, 0.9), (4096, 1024, 128, 0.75), (768, 3072, 64, 0.75),
         (3072, 768, 64, 0.75)]  # fmt: skip
for in_f, out_f, block, sp in cases:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, in_f, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    dy = torch.randn(M, out_f, generator=gen).to("cuda", torch.bfloat16)
    w32 = ((torch.rand(out_f, in_f, generator=gen) * 2 - 1) * in_f**-0.5).to("cuda").requires_grad_()
    wb = w32.detach().to(torch.bfloat16).requires_grad_()
    info = bs.build_block_mask_info(random_block_mask(out_f // block, in_f // block, sp, gen), block, "cuda")
    row = {"shape": f"{in_f}x{out_f}", "block": block, "sparsity": sp, "ms": {}, "same": {}}
    bs.PACK_ROWS = 128
    want = bs.pack_blocks(w32, info, torch.bfloat16)
    for rows in ROWS:
        bs.PACK_ROWS = rows
        row["same"][str(rows)] = bool(torch.equal(bs.pack_blocks(w32, info, torch.bfloat16), want))
    fb = {"fb": fwd_bwd(x, wb, dy, info, False), "fb_amp": fwd_bwd(x, w32, dy, info, True)}
    for fn in fb.values():
        fn()  # tuned in the main thread, before any capture
    for _ in range(3):
        for rows in ROWS:
            bs.PACK_ROWS = rows
            row["ms"].setdefault(f"pack {rows}", []).append(graph_ms(lambda: bs.pack_blocks(w32, info, torch.bfloat16)))
            if rows in (128, 32):
                for name, fn in fb.items():
                    row["ms"].setdefault(f"{name} {rows}", []).append(graph_ms(fn))
    row["ms"]["dense"] = [graph_ms(fwd_bwd(x, wb, dy, info, False, True))]
    row["ms"]["dense_amp"] = [graph_ms(fwd_bwd(x, w32, dy, info, True, True))]
    row["best"] = best = {k: min(v) for k, v in row["ms"].items()}
    res["rows"].append(row)
    print(f"{time.time() - t_start:.0f}s {in_f}x{out_f} b{block} {sp}", {k: round(v, 4) for k, v in best.items()},
          row["same"], flush=True)  # fmt: skip
    res["wall_s"] = time.time() - t_start
    with open(os.path.join(os.environ.get("OUT", "."), "h200-block-sparse-s29-pack.json"), "w") as f:
        json.dump(res, f, indent=1)  # after every case: a run cut short keeps what it measured
bs.PACK_ROWS = 32
