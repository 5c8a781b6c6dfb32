"""dW time at forced split-K counts against the `dw_splits(expected_tasks(...))` choice (session 24, H200)."""

import json

# ruff: noqa: B023  (each lambda is captured into a CUDA graph at once, inside its loop iteration)
import os

import torch

from kernels import block_sparse as bs
from kernels.bench_block_sparse import inputs, random_block_mask
from kernels.benchutil import graph_ms

M = 16384
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": M, "rows": []}
for in_f, out_f in [(1024, 4096), (4096, 1024)]:
    x, w, w32, dy = inputs(in_f, out_f, M, "cuda")
    x, dy = x.detach(), dy.detach()
    for sp in (0.75, 0.9):
        for seed in (0, 1):
            gen = torch.Generator().manual_seed(seed)
            info = bs.build_block_mask_info(random_block_mask(out_f // 128, in_f // 128, sp, gen), 128, "cuda")
            real = int((info.task_ids[:, 0] >= 0).sum())
            mean, high = bs.expected_tasks(info.grid, 128, info.density())
            auto = bs.dw_splits(M, mean, x.device, high)
            t = {
                s: graph_ms(lambda: bs.dw_triton(dy, x, info, torch.bfloat16, splits=s))
                for s in (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15)
            }
            row = {
                "shape": f"{in_f}x{out_f}",
                "sparsity": sp,
                "seed": seed,
                "real_tasks": real,
                "mean": mean,
                "high": high,
                "auto": auto,
                "ms": t,
            }
            res["rows"].append(row)
            print(
                row["shape"],
                sp,
                seed,
                "tasks",
                real,
                mean,
                high,
                "auto",
                auto,
                {k: round(v, 4) for k, v in t.items()},
                flush=True,
            )
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "dw_splits.json"), "w"), indent=1)
