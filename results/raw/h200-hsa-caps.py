"""Session 23 (`PYTHONPATH=. python results/raw/h200-hsa-caps.py`, OUT set; wrote h200-hsa-caps.json): register
caps the shipped sweep grid does not hold (more programs per SM for the HSA kernels), the device-to-device copy
bandwidth (the ceiling for these memory-bound kernels), per-kernel rows before and after."""
import json
import os
import time

import torch

from kernels import bench_hsa as bench
from kernels import hsa_attention as hsa
from kernels.hsa_attention import Launch

out = os.environ.get("OUT", "/tmp")
t0 = time.time()
record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}

# Copy bandwidth: a 2 GiB bf16 device-to-device copy, bytes read + written, median of 20.
src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
dst = torch.empty_like(src)
times = []
for i in range(25):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    dst.copy_(src)
    b.record()
    b.synchronize()
    if i >= 5:
        times.append(a.elapsed_time(b))
ms = sorted(times)[len(times) // 2]
record["copy"] = {"bytes": 2 * src.numel() * 2, "ms": ms, "TB_per_s": 2 * src.numel() * 2 / ms / 1e9}
print("copy", record["copy"], flush=True)
del src, dst
torch.cuda.empty_cache()

timer = lambda fn: bench.time_call(fn, "graph", 5, 30)  # noqa: E731
for T, stride, B in [(1024, 64, 16), (2048, 64, 8)]:
    base = hsa.config_for(T, stride, 64)

    def candidates(kernel, base=base):
        b = getattr(base, kernel)
        caps = {"strided_fwd": (80, 64), "strided_bwd": (128, 96, 80), "band_fwd": (96, 80),
                "band_bwd": (128, 96)}[kernel]  # programs per SM: 6/8, 4/5/6, 5/5, 4/5 (tools.kernel_resources)
        extra = [Launch(b.block, b.num_warps, b.num_stages, b.block_n, cap) for cap in caps]
        if kernel == "band_bwd":
            extra += [Launch(b.block, b.num_warps, 2, b.block_n, cap) for cap in (128, 168)]
        return [b] + extra

    swept = bench.sweep_case(T, stride, B, timer, time.time() + 100, candidates=candidates,
                             log=lambda s: print(s, flush=True))
    best = hsa.HsaConfig(*(Launch(**swept["kernels"][n]["best"]) for n in hsa.HsaConfig._fields))
    rows = {}
    for name, cfg in (("shipped", base), ("swept", best), ("shipped_again", base), ("swept_again", best)):
        hsa.TUNED[(T, stride, 64)] = cfg
        rows[name] = r = bench.kernel_rows(T, stride, B, 10, 100)
        print(name, T, {k: round(v["ms"], 4) for k, v in r["kernels"].items()}, "fwd", round(r["hsa_fwd_ms"], 4),
              "bwd", round(r["hsa_bwd_ms"], 4), "flash", round(r["flash_fwd_bwd_ms"], 4),
              "speedup", round(r["hsa_speedup_fwd_bwd"], 3), flush=True)
    hsa.TUNED[(T, stride, 64)] = base
    record["cases"].append({"T": T, "stride": stride, "B": B, "sweep": swept, "best": repr(best), "rows": rows})
    json.dump(record | {"wall_s": time.time() - t0}, open(f"{out}/caps_sweep.json", "w"), indent=1)
try:
    record["compiled"] = bench.compiled_kernels()
except Exception as e:  # noqa: BLE001
    record["compiled"] = {"error": repr(e)}
json.dump(record | {"wall_s": time.time() - t0}, open(f"{out}/caps_sweep.json", "w"), indent=1)
print("done", time.time() - t0)
