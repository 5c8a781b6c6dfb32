# ruff: noqa: B023, E501  (kept as measured)
"""Session 23 (at commit d95393d, reverted; wrote h200-hsa-band-bwd-split.json): the band backward split into a
dQ kernel and a dK/dV kernel (_band_bwd_kernel PART 1 and 2, each with its own register cap) against the shipped one-kernel pass, bwd pass as CUDA-graph replays, one process."""
import json
import math
import os

import torch

from kernels import bench_hsa as bench
from kernels import hsa_attention as hsa


def backward(q, k, v, o, lse, do, stride, cfg, parts):
    """hsa_backward with the band kernel launched once per (PART, options) in parts."""
    B, H, T, D = q.shape
    strided = cfg.strided_bwd
    dq, dk, dv = hsa._empty_out(q), hsa._empty_out(q), hsa._empty_out(q)
    delta = torch.empty_like(lse)
    sm_scale = 1.0 / math.sqrt(D)
    args = (q, k, v, o, do, dq, dk, dv, lse, delta, sm_scale * hsa.LOG2E, sm_scale,
            *hsa._strides(q), *hsa._strides(o), *hsa._strides(do), H, T, stride)
    np_ = hsa._periods(T, stride)
    rs = strided.block // np_
    hsa._strided_bwd_kernel[(-(-stride // rs), B * H)](*args, HEAD_DIM=D, NP=np_, RS=rs, **strided.options())
    for part, unrolled, opts in parts:
        hsa._band_bwd_kernel[(-(-T // 64), B * H)](*args[:3], *args[4:], HEAD_DIM=D, BLOCK=64, UNROLLED=unrolled,
                                                    PART=part, **opts)
    return dq, dk, dv


out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
w4 = lambda cap=None: {"num_warps": 4, "num_stages": 1} | ({"maxnreg": cap} if cap else {})  # noqa: E731
for T, stride, B in [(1024, 64, 16), (2048, 64, 8), (1024, 256, 16)]:
    qkv, do = bench.make_inputs(T, B, "cuda")
    q, k, v = (qkv[:, :, n].transpose(1, 2).contiguous() for n in range(3))
    cfg = hsa.config_for(T, stride, 64)
    o, lse = hsa.hsa_forward(q, k, v, stride, cfg)
    un = cfg.band_bwd.unrolled
    variants = {"shipped": None}
    for c1 in (128, None, 168):
        for c2 in (None, 168, 128):
            variants[f"split un={un} dq cap {c1} dkdv cap {c2}"] = [(1, un, w4(c1)), (2, un, w4(c2))]
    if un:
        variants["split loop dq cap 128 dkdv cap 168"] = [(1, False, w4(128)), (2, False, w4(168))]
    ref = hsa.hsa_backward(q, k, v, o, lse, do, stride, cfg)
    for rep in range(2):
        for name, parts in variants.items():
            if parts is None:
                fn = lambda: hsa.hsa_backward(q, k, v, o, lse, do, stride, cfg)  # noqa: E731
            else:
                fn = lambda parts=parts: backward(q, k, v, o, lse, do, stride, cfg, parts)  # noqa: E731
            try:
                grads = fn()
                same = all(torch.equal(a, b) for a, b in zip(grads, ref, strict=True))
                err = max(bench.rel_err(a, b) for a, b in zip(grads, ref, strict=True))
                ms = bench.time_call(fn, "graph", 10, 200)
                row = {"T": T, "stride": stride, "variant": name, "rep": rep, "bwd_ms": ms, "bitwise_equal": same,
                       "max_rel_err_vs_shipped": err}
            except Exception as e:  # noqa: BLE001
                row = {"T": T, "stride": stride, "variant": name, "rep": rep, "error": repr(e)[:300]}
            out["rows"].append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    json.dump(out, open(os.environ.get("OUT", "/tmp") + "/split_ab.json", "w"), indent=1)
