"""Session 30 A/B on one GPU: the HSA kernels launched programmatically dependent (`hsa_attention.USE_PDL`: each
kernel may start while the one before runs; the band forward runs its loop beside the strided kernel's last
programs and waits only to merge) against plain launches, with causal flash SDPA in the same rounds. Forward and
fwd+bwd as CUDA-graph replays (median of 100), both layouts of `kernels.bench_hsa`, variants interleaved over 3
rounds; errors of each variant against fp32 masked SDPA (`bench_hsa.check_errors`).

    PYTHONPATH=. python results/raw/h200-hsa-pdl-s30.py
"""

import json
import os
import time

import torch

from kernels import bench_hsa as bh
from kernels import hsa_attention as hsa

t_start = time.time()
res = {
    "method": "mst (HSA attention)",
    "device": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "command": "PYTHONPATH=. python results/raw/h200-hsa-pdl-s30.py",
    "config": {"n_head": bh.N_HEAD, "head_dim": bh.HEAD_DIM, "dtype": "bfloat16",
               "timing": "CUDA graph replays, median of 100 after 10, 3 rounds, best round"},  # fmt: skip
    "rows": [],
}
for T, stride, B in [(1024, 64, 16), (2048, 64, 8), (1024, 256, 16)]:
    qkv, do = bh.make_inputs(T, B, "cuda")
    row = {"T": T, "stride": stride, "B": B, "ms": {}, "err": {}}
    for pdl in (False, True):
        hsa.USE_PDL = pdl
        row["err"]["pdl" if pdl else "plain"] = bh.check_errors(qkv, do, stride)
    variants = {"sdpa_causal": (bh._variants(stride)["sdpa_causal"], None),
                "hsa_plain": (bh._variants(stride)["triton_hsa"], False),
                "hsa_pdl": (bh._variants(stride)["triton_hsa"], True)}  # fmt: skip
    for _ in range(3):
        for layout in bh.LAYOUTS:
            for name, (fn, pdl) in variants.items():
                if pdl is not None:
                    hsa.USE_PDL = pdl
                for key, backward in (("fwd", False), ("fwd_bwd", True)):
                    ms = bh.time_call(bh.make_call(fn, qkv, do, layout, backward), "graph", 10, 100)
                    row["ms"].setdefault(f"{layout}_{name}_{key}", []).append(ms)
    hsa.USE_PDL = True
    row["best"] = best = {k: min(v) for k, v in row["ms"].items()}
    row["speedup"] = {k: best[k.replace(name, "sdpa_causal")] / v for k, v in best.items()
                      for name in ("hsa_plain", "hsa_pdl") if name in k}  # fmt: skip
    row["pdl_over_plain"] = {k.replace("hsa_pdl_", ""): best[k.replace("pdl", "plain")] / v for k, v in best.items()
                             if "hsa_pdl" in k}  # fmt: skip
    res["rows"].append(row)
    ratios = {k: round(v, 3) for k, v in {**row["speedup"], **row["pdl_over_plain"]}.items()}
    print(f"{time.time() - t_start:.0f}s T={T} l={stride}", {k: round(v, 4) for k, v in best.items()}, ratios,
          {k: max(v.values()) for k, v in row["err"].items()}, flush=True)  # fmt: skip
    res["wall_s"] = time.time() - t_start
    with open(os.path.join(os.environ.get("OUT", "."), "h200-hsa-pdl-s30.json"), "w") as f:
        json.dump(res, f, indent=1)
