"""Sessions 25-26 A/B on one GPU: stream-K dW (`_sddmm_stream_kernel`) and TMA dW (`_sddmm_tma2_kernel`, G = 2)
against split-K dW, and the persistent forward/dX (`_bsr_mm_persistent_kernel`, fixed configs) against the grid
kernel, per kernel, CUDA-graph replays.

It ran (session 26) against the session-25 working tree: the stream-K and persistent kernels lost and were removed
right after, and the G = 2 TMA kernel became `_sddmm_tma_kernel`, so this script does not run against later trees.
"""

# ruff: noqa: B023  (each lambda is captured into a CUDA graph at once, inside its loop iteration)
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from kernels import block_sparse as bs
from kernels.bench_block_sparse import random_block_mask
from kernels.benchutil import graph_ms, rel_err


def safe(fn):
    try:
        return fn()
    except Exception as ex:  # a config that cannot run records why
        return f"{type(ex).__name__}: {str(ex)[:200]}"


M = 16384
t_start = time.time()
res = {
    "method": "mst (block-sparse linear)",
    "device": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "command": "PYTHONPATH=. python results/raw/h200-block-sparse-s25.py",
    "tokens": M,
    "rows": [],
}
cases = [
    (1024, 4096, 128, 0.75),
    (1024, 4096, 128, 0.9),
    (4096, 1024, 128, 0.75),
    (4096, 1024, 128, 0.9),
    (768, 3072, 64, 0.75),
    (3072, 768, 64, 0.75),
]
if len(sys.argv) > 1:
    cases = cases[: int(sys.argv[1])]
for in_f, out_f, block, sp in cases:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, in_f, generator=gen).to("cuda", torch.bfloat16)
    w = (torch.randn(out_f, in_f, generator=gen) * 0.02).to("cuda", torch.bfloat16)
    dy = torch.randn(M, out_f, generator=gen).to("cuda", torch.bfloat16)
    info = bs.build_block_mask_info(random_block_mask(out_f // block, in_f // block, sp, gen), block, "cuda")
    packed = bs.pack_blocks(w, info, torch.bfloat16)
    tab_f, tab_d = bs.persistent_tables(info, True), bs.persistent_tables(info, False)
    row = {
        "shape": f"{in_f}x{out_f}",
        "block": block,
        "sparsity": sp,
        "n_tasks_real": int((info.task_ids[:, 0] >= 0).sum()),
    }
    xf, wf, dyf = x.float(), w.float(), dy.float()
    want = {"fwd": bs.fwd_ref(xf, wf, None, info), "dx": bs.dx_ref(dyf, wf, info), "dw": bs.dw_ref(dyf, xf, info)}
    row["err"] = {
        "dw_stream_bf16": rel_err(bs.dw_triton(dy, x, info, torch.bfloat16, schedule="stream"), want["dw"]),
        "dw_stream_fp32": rel_err(bs.dw_triton(dy, x, info, torch.float32, schedule="stream"), want["dw"]),
        "dw_split_bf16": rel_err(
            bs.dw_triton(dy, x, info, torch.bfloat16, schedule="split", density=info.density()), want["dw"]
        ),
        "dw_tma_bf16": rel_err(
            bs.dw_triton(dy, x, info, torch.bfloat16, schedule="tma", density=info.density()), want["dw"]
        ),
        "dw_tma_fp32": rel_err(
            bs.dw_triton(dy, x, info, torch.float32, schedule="tma", density=info.density()), want["dw"]
        ),
        "fwd_persistent": rel_err(bs.mm_persistent(x, packed, None, info, True, tab_f), want["fwd"]),
        "dx_persistent": rel_err(bs.mm_persistent(dy, packed, None, info, False, tab_d), want["dx"]),
    }
    del want
    ms = {
        "dense_fwd": graph_ms(lambda: F.linear(x, w)),
        "dense_dx": graph_ms(lambda: dy @ w),
        "dense_dw": graph_ms(lambda: dy.t() @ x),
        "pack": graph_ms(lambda: bs.pack_blocks(w, info, torch.bfloat16)),
        "grid_fwd": graph_ms(lambda: bs.fwd_triton(x, None, None, info, packed)),
        "grid_dx": graph_ms(lambda: bs.dx_triton(dy, None, info, packed)),
        "dw_split_bf16": graph_ms(
            lambda: bs.dw_triton(dy, x, info, torch.bfloat16, schedule="split", density=info.density())
        ),
        "dw_split_fp32": graph_ms(
            lambda: bs.dw_triton(dy, x, info, torch.float32, schedule="split", density=info.density())
        ),
        "dw_tma_bf16": graph_ms(
            lambda: bs.dw_triton(dy, x, info, torch.bfloat16, schedule="tma", density=info.density())
        ),
        "dw_tma_fp32": graph_ms(
            lambda: bs.dw_triton(dy, x, info, torch.float32, schedule="tma", density=info.density())
        ),
        "dw_stream_bf16": graph_ms(lambda: bs.dw_triton(dy, x, info, torch.bfloat16, schedule="stream")),
        "dw_stream_fp32": graph_ms(lambda: bs.dw_triton(dy, x, info, torch.float32, schedule="stream")),
    }
    configs = [(128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3)] + (
        [(256, 64, 8, 3)] if block == 128 else [(64, 64, 4, 4)]
    )
    pers = {}
    for bm, bk, nw, st in configs:
        for per_sm in (1, 2, 3):
            key = f"{bm}/{bk}/w{nw}/s{st}/x{per_sm}"
            pers["fwd " + key] = safe(
                lambda: graph_ms(lambda: bs.mm_persistent(x, packed, None, info, True, tab_f, bm, bk, nw, st, per_sm))
            )
            pers["dx " + key] = safe(
                lambda: graph_ms(lambda: bs.mm_persistent(dy, packed, None, info, False, tab_d, bm, bk, nw, st, per_sm))
            )
    row["ms"], row["persistent_ms"] = ms, pers
    num = lambda v: v if isinstance(v, float) else 1e9
    row["best_persistent"] = {
        d: min(((k, v) for k, v in pers.items() if k.startswith(d + " ")), key=lambda kv: num(kv[1]))
        for d in ("fwd", "dx")
    }
    row["tuned_dw"] = {
        name: {str(k): str(v) for k, v in kern.cache.items()}
        for name, kern in (
            ("stream", bs._sddmm_stream_kernel), ("tma", bs._sddmm_tma2_kernel), ("split", bs._sddmm_kernel)
        )
    }
    res["rows"].append(row)
    print(json.dumps({k: row[k] for k in ("shape", "block", "sparsity", "err", "ms", "best_persistent")}), flush=True)
res["wall_s"] = time.time() - t_start
out = os.environ.get("OUT", ".")
with open(os.path.join(out, "h200-block-sparse-s25.json"), "w") as f:
    json.dump(res, f, indent=1)
