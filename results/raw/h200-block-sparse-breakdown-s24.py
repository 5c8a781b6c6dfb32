"""Per-kernel times of the block-sparse linear (graph replays), and dW with its tasks grouped by row / by column.

Session 24, from the repository root on the device: PYTHONPATH=. python results/raw/h200-block-sparse-breakdown-s24.py
"""
# ruff: noqa: B023  (each lambda is captured into a CUDA graph at once, inside its loop iteration)

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from kernels import block_sparse as bs
from kernels.bench_block_sparse import inputs, random_block_mask
from kernels.benchutil import capture


def gtime(fn, reps=50):
    g, out = capture(fn)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = []
    for _ in range(3):
        s.record()
        for _ in range(reps):
            g.replay()
        e.record()
        e.synchronize()
        best.append(s.elapsed_time(e) / reps)
    del g
    return min(best), out


dev = "cuda"
M = 16384
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": M, "rows": []}
t0 = time.time()
only = sys.argv[1] if len(sys.argv) > 1 else "all"
for in_f, out_f in [(1024, 4096), (4096, 1024)]:
    x, w, w32, dy = inputs(in_f, out_f, M, dev)
    x, w = x.detach(), w.detach()
    dense = {
        "fwd": gtime(lambda: F.linear(x, w))[0],
        "dx": gtime(lambda: dy @ w)[0],
        "dw": gtime(lambda: dy.t() @ x)[0],
    }
    res["rows"].append({"shape": f"{in_f}x{out_f}", "dense": dense})
    print(in_f, out_f, "dense", dense, flush=True)
    for sp in (0.75, 0.9):
        gen = torch.Generator().manual_seed(0)
        info = bs.build_block_mask_info(random_block_mask(out_f // 128, in_f // 128, sp, gen), 128, dev)
        packed = bs.pack_blocks(w, info, torch.bfloat16)
        row = {"shape": f"{in_f}x{out_f}", "sparsity": sp, "dense": dense}
        row["pack"] = gtime(lambda: bs.pack_blocks(w, info, torch.bfloat16))[0]
        row["fwd"], y0 = gtime(lambda: bs._mm(x, packed, None, info, out_f, True))
        row["dx"], dx0 = gtime(lambda: bs._mm(dy, packed, None, info, in_f, False))
        row["dw"] = gtime(lambda: bs.dw_triton(dy, x, info, torch.bfloat16, density=info.density()))[0]
        row["dw32"] = gtime(lambda: bs.dw_triton(dy, x, info, torch.float32, density=info.density()))[0]
        row["tuned"] = {str(k): str(c) for k, c in bs._bsr_mm_kernel.cache.items()}
        row["tuned_dw"] = {str(k): str(c) for k, c in bs._sddmm_kernel.cache.items()}
        pers = []
        real = bs._by_row
        for forced in (True, False):
            for dt in (torch.bfloat16, torch.float32):
                ref = bs.dw_triton(dy, x, info, dt, density=info.density())
                bs._by_row = lambda r, c, f=forced: f
                inf2 = bs.build_block_mask_info(info.mask, 128, dev)
                ms, out = gtime(lambda: bs.dw_triton(dy, x, inf2, dt, density=inf2.density()))
                out = out.clone()
                bs._by_row = real
                pers.append(
                    {
                        "by_row": forced,
                        "dtype": str(dt),
                        "ms": ms,
                        "maxdiff": (out.float() - ref.float()).abs().max().item(),
                    }
                )
        print("  dw by_row forced:", [(p["by_row"], p["dtype"][-7:], round(p["ms"], 4)) for p in pers], flush=True)
        row["dw_by_row"] = pers
        print(
            f"{in_f}x{out_f} sp={sp} fwd {row['fwd']:.4f} (dense {dense['fwd']:.4f})",
            f"dx {row['dx']:.4f} (dense {dense['dx']:.4f})",
            flush=True,
        )
        print(
            f"  pack {row['pack']:.4f} dw {row['dw']:.4f} dw32 {row['dw32']:.4f} dense dw {dense['dw']:.4f}", flush=True
        )
        res["rows"].append(row)
res["wall_s"] = time.time() - t0
out = os.path.join(os.environ.get("OUT", "/tmp"), "bs_break.json")
json.dump(res, open(out, "w"), indent=1)
