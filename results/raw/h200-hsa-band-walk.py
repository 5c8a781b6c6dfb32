"""Runs at commit d7c87d5 (the walking band kernels, reverted in the commit after it), as
`PYTHONPATH=. python results/raw/h200-hsa-band-walk.py 240` with OUT set; wrote h200-hsa-band-walk.json.
Session 23: the walking band kernels against the shipped ones, on the GPU. For each case: a sweep of the band
kernels only (shipped launch + the walk grid; strided kernels at their shipped launch), then kernel_rows (each
kernel alone, both passes, flash) for the shipped config and for the swept one, in the same process."""
import json
import os
import sys
import time

import torch

from kernels import bench_hsa as bench
from kernels import hsa_attention as hsa

out = os.environ.get("OUT", "/tmp")
budget = float(sys.argv[1]) if len(sys.argv) > 1 else 120.0
cases = [(1024, 64, 16), (2048, 64, 8)]
t0 = time.time()
record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": []}
timer = lambda fn: bench.time_call(fn, "graph", 5, 20)  # noqa: E731
shipped = {c: hsa.config_for(c[0], c[1], 64) for c in cases}
for T, l, B in cases:  # noqa: E741
    base = shipped[(T, l, B)]

    def candidates(kernel, base=base):
        if kernel.startswith("strided"):
            return [getattr(base, kernel)]
        return [getattr(base, kernel)] + bench.walks(kernel)

    deadline = time.time() + budget / len(cases)
    swept = bench.sweep_case(T, l, B, timer, deadline, candidates=candidates, log=lambda s: print(s, flush=True))
    best = hsa.HsaConfig(*(hsa.Launch(**swept["kernels"][n]["best"]) for n in hsa.HsaConfig._fields))
    rows = {}
    for name, cfg in (("shipped", base), ("swept", best), ("shipped_again", base)):
        hsa.TUNED[(T, l, 64)] = cfg
        rows[name] = bench.kernel_rows(T, l, B, 5, 30)
        r = rows[name]
        print(name, T, {k: round(v["ms"], 4) for k, v in r["kernels"].items()}, "fwd", round(r["hsa_fwd_ms"], 4),
              "bwd", round(r["hsa_bwd_ms"], 4), "flash", round(r["flash_fwd_bwd_ms"], 4),
              "speedup", round(r["hsa_speedup_fwd_bwd"], 3), flush=True)
    hsa.TUNED[(T, l, 64)] = base
    record["cases"].append({"T": T, "stride": l, "B": B, "sweep": swept, "best": repr(best), "rows": rows})
    json.dump(record | {"wall_s": time.time() - t0}, open(f"{out}/walk_sweep.json", "w"), indent=1)
try:
    record["compiled"] = bench.compiled_kernels()
except Exception as e:  # noqa: BLE001
    record["compiled"] = {"error": repr(e)}
json.dump(record | {"wall_s": time.time() - t0}, open(f"{out}/walk_sweep.json", "w"), indent=1)
print("done", time.time() - t0)
