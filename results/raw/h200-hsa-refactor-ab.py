# ruff: noqa: B023, E501  (kept as measured)
"""Session 23 (wrote h200-hsa-refactor-ab.json). A/B on the GPU: the band backward before the refactor into one
kernel with UNROLLED (commit 785c5ae's loop kernel, commit 12f7b37's straight-line kernel) against the current
_band_bwd_kernel, same launches, same process."""
import importlib.util
import json
import os
import sys

import torch

from kernels import bench_hsa as bench
from kernels import hsa_attention as new


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec)
    sys.modules[name] = m
    spec.loader.exec_module(m)
    return m


old = load(".carry/hsa_old.py", "hsa_old")
short = load(".carry/hsa_short.py", "hsa_short")
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
for T, stride, B in [(1024, 64, 16), (2048, 64, 8), (1024, 256, 16)]:
    qkv, do = bench.make_inputs(T, B, "cuda")
    q, k, v = (qkv[:, :, n].transpose(1, 2).contiguous() for n in range(3))
    cfg = new.config_for(T, stride, 64)
    o, lse = new.hsa_forward(q, k, v, stride, cfg)
    bl = cfg.band_bwd
    plain = dict(block=bl.block, num_warps=bl.num_warps, num_stages=bl.num_stages, block_n=bl.block_n, maxnreg=bl.maxnreg)
    variants = {"new": (new, cfg)}
    old_cfg = old.HsaConfig(*(old.Launch(x.block, x.num_warps, x.num_stages, x.block_n, x.maxnreg) for x in cfg))
    variants["old_loop_785c5ae"] = (old, old_cfg)
    if bl.unrolled:
        short_cfg = short.HsaConfig(*(short.Launch(x.block, x.num_warps, x.num_stages, x.block_n, x.maxnreg)
                                      for x in cfg[:3]), short.Launch(**plain, early=0))
        variants["short_12f7b37"] = (short, short_cfg)
        variants["new_loop"] = (new, cfg._replace(band_bwd=new.Launch(**plain)))
    ref = None
    for rep in range(2):
        for name, (mod, c) in variants.items():
            fn = lambda mod=mod, c=c: mod.hsa_backward(q, k, v, o, lse, do, stride, c)
            grads = fn()
            if ref is None:
                ref = grads
            same = all(torch.equal(a, b) for a, b in zip(grads, ref))
            ms = bench.time_call(fn, "graph", 10, 200)
            row = {"T": T, "stride": stride, "variant": name, "rep": rep, "bwd_ms": ms, "bitwise_equal_to_new": same}
            out["rows"].append(row)
            print(row, flush=True)
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/ab_refactor.json", "w"), indent=1)
