"""Session 27 A/B on one GPU: dW of block-sparse linears at b = 64 (G = 4) and b = 32 through the TMA kernel
(`_sddmm_tma_kernel`, one b×b accumulator and TMA box a block) against the pointer-load kernel (`_sddmm_kernel`,
one b × G·b tile), per kernel, CUDA-graph replays, 16k tokens, bf16 operands; dW into bf16 (compact + cast pass)
and into fp32 (the master weights' grad under autocast). b = 32 runs the TMA kernel with G = 4 (DW_TILE 128)
against the pointer kernel with its G = 8 (DW_TILE 256). Errors: max |err| / max |ref| against the fp32
reference. The `tma_swap` variant is the by-row dot as X_otherᵀ dY_fixed (accumulators transposed once at the
end) instead of dY_fixedᵀ X_other.

    PYTHONPATH=. python results/raw/h200-block-sparse-s27.py [b32]

It ran in session 27 against that session's working tree, in which `_sddmm_tma_kernel` took both by-row forms
behind a module switch `_SWAP`: the swapped form won and became the only one (the switch is gone), so this script
does not run against later trees. `h200-block-sparse-s27-first.json` is its first run, b32 included, before the
swapped form and the 4-warp BK=64 dW configs existed (variants pointer and tma only).
"""

# ruff: noqa: B023  (each lambda is captured into a CUDA graph at once, inside its loop iteration)
import json
import os
import sys
import time

import torch

from kernels import block_sparse as bs
from kernels.bench_block_sparse import random_block_mask
from kernels.benchutil import graph_ms, rel_err


def variant(groups, tile, swap):
    bs.TMA_DW_GROUPS, bs.DW_TILE, bs._SWAP = groups, tile, swap
    bs.expected_tasks.cache_clear()  # it reads DW_TILE through `_group`


M = 16384
t_start = time.time()
res = {
    "method": "mst (block-sparse linear, dW)",
    "device": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "command": "PYTHONPATH=. python results/raw/h200-block-sparse-s27.py",
    "config": {"tokens": M, "dtype": "bfloat16", "timing": "CUDA graph replays, best of 3 x 50",
               "dw_tiles": bs.DW_TILES},
    "rows": [],
}
cases = [(in_f, out_f, 64, sp) for in_f, out_f in [(768, 3072), (3072, 768), (1024, 4096), (4096, 1024)]
         for sp in (0.75, 0.9)]  # fmt: skip
if "b32" in sys.argv:
    cases += [(768, 3072, 32, 0.75), (3072, 768, 32, 0.75)]
variants = {"pointer": ((2,), 256, False), "tma": ((2, 4), 256, False), "tma_swap": ((2, 4), 256, True)}
for in_f, out_f, block, sp in cases:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, in_f, generator=gen).to("cuda", torch.bfloat16)
    dy = torch.randn(M, out_f, generator=gen).to("cuda", torch.bfloat16)
    mask = random_block_mask(out_f // block, in_f // block, sp, gen)
    want = bs.dw_ref(dy.float(), x.float(), bs.build_block_mask_info(mask, block, "cuda"))
    row = {"shape": f"{in_f}x{out_f}", "block": block, "sparsity": sp, "ms": {}, "err": {}, "tasks": {}}
    for name, (groups, tile, swap) in variants.items():
        variant(groups, 128 if name.startswith("tma") and block == 32 else tile, swap)
        info = bs.build_block_mask_info(mask, block, "cuda")
        row["tasks"][name] = {"group": info.group, "by_row": info.by_row,
                              "real": int((info.task_ids[:, 0] >= 0).sum()), "slots": info.n_tasks}  # fmt: skip
        for out in (torch.bfloat16, torch.float32):
            key = f"{name}_{str(out).split('.')[-1]}"
            fn = lambda: bs.dw_triton(dy, x, info, out, density=info.density())
            row["err"][key] = rel_err(fn(), want)
            row["ms"][key] = graph_ms(fn)
    row["ms"]["dense_dw"] = graph_ms(lambda: dy.t() @ x)
    row["speedup_tma_over_pointer"] = {
        f"{v}_{o}": row["ms"][f"pointer_{o}"] / row["ms"][f"{v}_{o}"]
        for v in ("tma", "tma_swap")
        for o in ("bfloat16", "float32")
    }
    row["tuned"] = {n: {str(k): str(v) for k, v in k_.cache.items()}
                    for n, k_ in (("tma", bs._sddmm_tma_kernel), ("pointer", bs._sddmm_kernel))}  # fmt: skip
    res["rows"].append(row)
    print(json.dumps({k: row[k] for k in ("shape", "block", "sparsity", "speedup_tma_over_pointer")}),
          flush=True)  # fmt: skip
variant((2, 4), 256, False)
res["wall_s"] = time.time() - t_start
with open(os.path.join(os.environ.get("OUT", "."), "h200-block-sparse-s27.json"), "w") as f:
    json.dump(res, f, indent=1)
