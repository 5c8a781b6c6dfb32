"""Session 29: the kernels of one block-sparse linear fwd+bwd at 1024x4096, b=128, 75% and 90% (fp32 masters
under bf16 autocast, the trainer's case), and of the dense one, under Nsight Compute. Everything is warmed up
(autotuned) first; only the calls between cudaProfilerStart and Stop are profiled.

    ncu --clock-control none --profile-from-start off --set full -o prof \
        python results/raw/h200-block-sparse-s29-ncu.py
"""

import sys

import torch
import torch.nn.functional as F

from kernels import block_sparse as bs
from kernels.bench_block_sparse import random_block_mask

M, IN, OUT = 16384, 1024, 4096
store = len(sys.argv) > 1 and sys.argv[1] == "tma"
bs.MM_TMA_STORE = store
gen = torch.Generator().manual_seed(0)
x = torch.randn(M, IN, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
dy = torch.randn(M, OUT, generator=gen).to("cuda", torch.bfloat16)
w = ((torch.rand(OUT, IN, generator=gen) * 2 - 1) * IN**-0.5).to("cuda").requires_grad_()
calls = []
for sp in (0.75, 0.9):
    info = bs.build_block_mask_info(random_block_mask(OUT // 128, IN // 128, sp, gen), 128, "cuda")
    calls.append(lambda info=info: bs.block_sparse_linear(x, w, None, info, backend="triton",
                                                          dw_density=info.density()))  # fmt: skip
calls.append(lambda: F.linear(x, w))


def step(fn):
    x.grad = w.grad = None
    with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
        y = fn()
    y.backward(dy)


for fn in calls:
    for _ in range(3):
        step(fn)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
for fn in calls:
    torch.cuda.nvtx.range_push("call")
    step(fn)
    torch.cuda.nvtx.range_pop()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
print("ok")
