"""Session 23 (at commit 12f7b37; wrote h200-hsa-band-bwd-short.json): the straight-line band backward for
l - 1 <= 64 (_band_bwd_short_kernel, Launch.early 0/1/2) against the shipped loop kernel,
swept at T=1024 and 2048, l=64; per-kernel rows before and after."""
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

timer = lambda fn: bench.time_call(fn, "graph", 5, 30)  # noqa: E731
for T, stride, B in [(1024, 64, 16), (2048, 64, 8)]:
    base = hsa.config_for(T, stride, 64)

    def candidates(kernel, base=base):
        b = getattr(base, kernel)
        if kernel != "band_bwd":
            return [b]
        return [b] + [Launch(64, w, 1, maxnreg=cap, early=e) for e in (0, 1, 2)
                      for w, cap in ((4, None), (4, 168), (4, 128), (8, None), (8, 128))]

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
    json.dump(record | {"wall_s": time.time() - t0}, open(f"{out}/early_sweep.json", "w"), indent=1)
try:
    record["compiled"] = bench.compiled_kernels()
    fn = hsa._band_bwd_short_kernel
    record["compiled"]["band_bwd_short_kernel"] = [
        {**{fn.arg_names[p[0]]: v for p, v in k.src.constants.items() if isinstance(v, int)},
         "num_warps": k.metadata.num_warps, "maxnreg": getattr(k.metadata, "maxnreg", None),
         "shared": k.metadata.shared, "n_regs": k.n_regs, "n_spills": k.n_spills}
        for k in fn.device_caches[torch.cuda.current_device()][0].values()]
except Exception as e:  # noqa: BLE001
    record["compiled"] = {"error": repr(e)}
json.dump(record | {"wall_s": time.time() - t0}, open(f"{out}/early_sweep.json", "w"), indent=1)
print("done", time.time() - t0)
