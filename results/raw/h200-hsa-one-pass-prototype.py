# ruff: noqa: B023, UP031  (the timed lambdas run inside their loop iteration; the code as it was measured)
"""Prototype, measured once and not shipped (results/raw/h200-hsa-one-pass-prototype.json): one-pass HSA (band +
strided in the same program, strided keys as shifted row slices, rowwise dots on
CUDA cores). Forward: one kernel; backward: a delta pre-pass + one kernel. Compared with the shipped two-pass
kernels and flash SDPA. Run: PYTHONPATH=. python results/raw/h200-hsa-one-pass-prototype.py [--interp]"""

import json
import math
import os
import sys

if "--interp" in sys.argv:
    import tests.triton_interp  # noqa: F401

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _op_fwd_kernel(
    Q, K, V, Out, LSE, qk_scale,
    stride_ib, stride_ih, stride_it, stride_ob, stride_oh, stride_ot,
    H, T, L,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    start = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    in_off = (bh // H).to(tl.int64) * stride_ib + (bh % H).to(tl.int64) * stride_ih
    out_off = (bh // H).to(tl.int64) * stride_ob + (bh % H).to(tl.int64) * stride_oh
    Q += in_off
    K += in_off
    V += in_off
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + rows[:, None] * stride_it + d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    # Strided keys j = i - c*l, c >= 1: for the block, c-th shifted slice of K, V; a rowwise dot per row.
    qf = q.to(tl.float32)
    n_str = (tl.minimum(start + BLOCK_M, T) - 1) // L
    for c in range(1, n_str + 1):
        keys = rows - c * L
        kok = (keys >= 0) & row_ok
        ks = tl.load(K + keys[:, None] * stride_it + d[None, :], mask=kok[:, None], other=0.0)
        vs = tl.load(V + keys[:, None] * stride_it + d[None, :], mask=kok[:, None], other=0.0)
        ss = tl.where(kok, tl.sum(qf * ks.to(tl.float32), 1) * qk_scale, float("-inf"))
        ms = tl.maximum(m_i, ss)
        alphas = tl.exp2(m_i - ms)
        ps = tl.exp2(ss - ms)
        l_i = l_i * alphas + ps
        acc = acc * alphas[:, None] + ps[:, None] * vs.to(tl.float32)
        m_i = ms
    lo = tl.maximum(start - L + 1, 0)
    hi = tl.minimum(start + BLOCK_M, T)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < T
        k = tl.load(K + cols[:, None] * stride_it + d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + cols[:, None] * stride_it + d[None, :], mask=col_ok[:, None], other=0.0)
        diff = rows[:, None] - cols[None, :]
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where((diff >= 0) & (diff < L) & col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    tl.store(
        Out + out_off + rows[:, None] * stride_ot + d[None, :],
        (acc / l_i[:, None]).to(Out.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(LSE + bh.to(tl.int64) * T + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _op_delta_kernel(
    Out,
    DO,
    Delta,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_gb,
    stride_gh,
    stride_gt,
    H,
    T,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < T
    d = tl.arange(0, HEAD_DIM)
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + d[None, :], mask=ok[:, None], other=0.0
    )
    do = tl.load(
        DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gt + d[None, :], mask=ok[:, None], other=0.0
    )
    tl.store(Delta + bh.to(tl.int64) * T + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)


@triton.jit
def _op_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE, Delta, qk_scale, sm_scale,
    stride_ib, stride_ih, stride_it, stride_ob, stride_oh, stride_ot, stride_gb, stride_gh, stride_gt,
    H, T, L,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    Q += b * stride_ib + h * stride_ih
    K += b * stride_ib + h * stride_ih
    V += b * stride_ib + h * stride_ih
    DO += b * stride_gb + h * stride_gh
    DQ += b * stride_ob + h * stride_oh
    DK += b * stride_ob + h * stride_oh
    DV += b * stride_ob + h * stride_oh
    LSE += bh.to(tl.int64) * T
    Delta += bh.to(tl.int64) * T
    d = tl.arange(0, HEAD_DIM)
    start = tl.program_id(0) * BLOCK
    idx = start + tl.arange(0, BLOCK)
    ok = idx < T
    q = tl.load(Q + idx[:, None] * stride_it + d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + idx[:, None] * stride_gt + d[None, :], mask=ok[:, None], other=0.0)
    lse = tl.load(LSE + idx, mask=ok, other=0.0)
    delta = tl.load(Delta + idx, mask=ok, other=0.0)

    # dQ, strided: keys idx - c*l (rowwise).
    qf, dof = q.to(tl.float32), do.to(tl.float32)
    dq = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
    n_str = (tl.minimum(start + BLOCK, T) - 1) // L
    for c in range(1, n_str + 1):
        keys = idx - c * L
        kok = (keys >= 0) & ok
        kc = tl.load(K + keys[:, None] * stride_it + d[None, :], mask=kok[:, None], other=0.0).to(tl.float32)
        vc = tl.load(V + keys[:, None] * stride_it + d[None, :], mask=kok[:, None], other=0.0).to(tl.float32)
        pc = tl.where(kok, tl.exp2(tl.sum(qf * kc, 1) * qk_scale - lse), 0.0)
        dsc = pc * (tl.sum(dof * vc, 1) - delta)
        dq += dsc[:, None] * kc
    # dQ, band: the earlier key blocks that i - l < j reaches.
    for j0 in range(tl.maximum(start - L + 1, 0) // BLOCK * BLOCK, start, BLOCK):
        keys = j0 + tl.arange(0, BLOCK)
        kj = tl.load(K + keys[:, None] * stride_it + d[None, :])
        vj = tl.load(V + keys[:, None] * stride_it + d[None, :])
        s = tl.dot(q, tl.trans(kj)) * qk_scale
        p = tl.where(idx[:, None] - keys[None, :] < L, tl.exp2(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(vj)) - delta[:, None])
        dq += tl.dot(ds.to(kj.dtype), kj)
    # The diagonal tile.
    k = tl.load(K + idx[:, None] * stride_it + d[None, :], mask=ok[:, None], other=0.0)
    v = tl.load(V + idx[:, None] * stride_it + d[None, :], mask=ok[:, None], other=0.0)
    diff = idx[:, None] - idx[None, :]
    s = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.where((diff >= 0) & (diff < L) & ok[:, None], tl.exp2(s - lse[:, None]), 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do)
    ds = (p * (tl.dot(do, tl.trans(v)) - delta[:, None])).to(q.dtype)
    out_ptr = idx[:, None] * stride_ot + d[None, :]
    dq = (dq + tl.dot(ds, k)) * sm_scale
    tl.store(DQ + out_ptr, dq.to(DQ.dtype.element_ty), mask=ok[:, None])
    dk = tl.dot(tl.trans(ds), q)
    # dK, dV, band: the later query blocks that j < i < j + l reaches.
    for m0 in range(start + BLOCK, tl.minimum(start + BLOCK + L - 1, T), BLOCK):
        rows = m0 + tl.arange(0, BLOCK)
        row_ok = rows < T
        qm = tl.load(Q + rows[:, None] * stride_it + d[None, :], mask=row_ok[:, None], other=0.0)
        dom = tl.load(DO + rows[:, None] * stride_gt + d[None, :], mask=row_ok[:, None], other=0.0)
        lse_m = tl.load(LSE + rows, mask=row_ok, other=0.0)
        delta_m = tl.load(Delta + rows, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(qm)) * qk_scale
        pt = tl.where((rows[None, :] - idx[:, None] < L) & row_ok[None, :], tl.exp2(st - lse_m[None, :]), 0.0)
        dv += tl.dot(pt.to(dom.dtype), dom)
        dst = pt * (tl.dot(v, tl.trans(dom)) - delta_m[None, :])
        dk += tl.dot(dst.to(qm.dtype), qm)
    # dK, dV, strided: queries idx + c*l (rowwise).
    kf, vf = k.to(tl.float32), v.to(tl.float32)
    n_q = (T - 1 - start) // L
    for c in range(1, n_q + 1):
        qrows = idx + c * L
        qok = (qrows < T) & ok
        qc = tl.load(Q + qrows[:, None] * stride_it + d[None, :], mask=qok[:, None], other=0.0).to(tl.float32)
        doc = tl.load(DO + qrows[:, None] * stride_gt + d[None, :], mask=qok[:, None], other=0.0).to(tl.float32)
        lse_c = tl.load(LSE + qrows, mask=qok, other=0.0)
        delta_c = tl.load(Delta + qrows, mask=qok, other=0.0)
        pc = tl.where(qok, tl.exp2(tl.sum(kf * qc, 1) * qk_scale - lse_c), 0.0)
        dv += pc[:, None] * doc
        dsc = pc * (tl.sum(vf * doc, 1) - delta_c)
        dk += dsc[:, None] * qc
    tl.store(DK + out_ptr, (dk * sm_scale).to(DK.dtype.element_ty), mask=ok[:, None])
    tl.store(DV + out_ptr, dv.to(DV.dtype.element_ty), mask=ok[:, None])


def _s(x):
    return x.stride(0), x.stride(1), x.stride(2)


def op_forward(q, k, v, L, block_m=64, block_n=64, warps=4, stages=2):
    B, H, T, D = q.shape
    o = torch.empty_like(q)
    lse = q.new_empty((B * H, T), dtype=torch.float32)
    _op_fwd_kernel[(-(-T // block_m), B * H)](
        q,
        k,
        v,
        o,
        lse,
        LOG2E / math.sqrt(D),
        *_s(q),
        *_s(o),
        H,
        T,
        L,
        HEAD_DIM=D,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PREFETCH=False,
        num_warps=warps,
        num_stages=stages,
    )
    return o, lse


def op_backward(q, k, v, o, lse, do, L, block=64, warps=4, stages=1, maxnreg=None):
    B, H, T, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)
    delta = torch.empty_like(lse)
    _op_delta_kernel[(-(-T // 64), B * H)](o, do, delta, *_s(o), *_s(do), H, T, HEAD_DIM=D, BLOCK=64, num_warps=4)
    sm = 1.0 / math.sqrt(D)
    extra = {} if maxnreg is None else {"maxnreg": maxnreg}
    _op_bwd_kernel[(-(-T // block), B * H)](
        q,
        k,
        v,
        do,
        dq,
        dk,
        dv,
        lse,
        delta,
        sm * LOG2E,
        sm,
        *_s(q),
        *_s(dq),
        *_s(do),
        H,
        T,
        L,
        HEAD_DIM=D,
        BLOCK=block,
        num_warps=warps,
        num_stages=stages,
        **extra,
    )
    return dq, dk, dv


def check(device, cases, dtype):
    from kernels.hsa_attention import hsa_attention_ref

    for B, H, T, L, D in cases:
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (torch.randn(B, H, T, D, generator=g).to(device, dtype) for _ in range(4))
        x = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref = hsa_attention_ref(*x, L)
        rg = torch.autograd.grad(ref, x, do.float())
        o, lse = op_forward(q, k, v, L)
        grads = op_backward(q, k, v, o, lse, do, L)
        errs = [((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip((o, *grads), (ref, *rg))]
        print((B, H, T, L, D), "rel errs o dq dk dv", ["%.1e" % e for e in errs], flush=True)
        assert max(errs) < (1e-4 if dtype == torch.float32 else 3e-2), errs


def main():
    if "--interp" in sys.argv:
        check(
            "cpu",
            [(1, 2, 64, 8, 16), (1, 1, 130, 48, 16), (1, 1, 257, 64, 16), (1, 1, 100, 3, 16), (1, 1, 90, 128, 16)],
            torch.float32,
        )
        print("ok")
        return
    from kernels import bench_hsa as bench
    from kernels import hsa_attention as hsa

    check(
        "cuda",
        [(2, 4, 1024, 64, 64), (2, 4, 2048, 64, 64), (2, 4, 1000, 48, 64), (2, 4, 1024, 256, 64)],
        torch.bfloat16,
    )
    out = {"rows": []}
    gt = lambda fn: bench.time_call(fn, "graph", 10, 100)
    for T, L, B in [(1024, 64, 16), (2048, 64, 8), (1024, 256, 16)]:
        qkv, do = bench.make_inputs(T, B, "cuda")
        q, k, v = (qkv[:, :, n].transpose(1, 2).contiguous() for n in range(3))
        row = {"T": T, "l": L, "B": B}
        row["flash_fwd_bwd_ms"] = bench.time_call(
            bench.make_call(bench._variants(L)["sdpa_causal"], qkv, do, "bhtd", True), "graph", 10, 100
        )
        o2, lse2 = hsa.hsa_forward(q, k, v, L)
        row["two_fwd"] = gt(lambda: hsa.hsa_forward(q, k, v, L))
        row["two_bwd"] = gt(lambda: hsa.hsa_backward(q, k, v, o2, lse2, do, L))
        o, lse = op_forward(q, k, v, L)
        for bm, bn, w, st in [
            (64, 64, 4, 1),
            (64, 64, 4, 2),
            (64, 64, 8, 2),
            (64, 128, 4, 2),
            (128, 64, 8, 2),
            (32, 64, 4, 2),
        ]:
            try:
                row[f"fwd_{bm}_{bn}_{w}_{st}"] = gt(lambda: op_forward(q, k, v, L, bm, bn, w, st))
            except Exception as e:  # noqa: BLE001
                row[f"fwd_{bm}_{bn}_{w}_{st}"] = str(e)[:100]
        for blk, w, st, mr in [
            (64, 4, 1, None),
            (64, 4, 1, 168),
            (64, 8, 1, None),
            (64, 4, 2, None),
            (32, 4, 1, None),
            (32, 2, 1, None),
        ]:
            try:
                row[f"bwd_{blk}_{w}_{st}_{mr}"] = gt(lambda: op_backward(q, k, v, o, lse, do, L, blk, w, st, mr))
            except Exception as e:  # noqa: BLE001
                row[f"bwd_{blk}_{w}_{st}_{mr}"] = str(e)[:100]
        fwd = min(x for kk, x in row.items() if kk.startswith("fwd_") and isinstance(x, float))
        bwd = min(x for kk, x in row.items() if kk.startswith("bwd_") and isinstance(x, float))
        row["best_onepass_speedup"] = row["flash_fwd_bwd_ms"] / (fwd + bwd)
        row["two_pass_speedup"] = row["flash_fwd_bwd_ms"] / (row["two_fwd"] + row["two_bwd"])
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
    json.dump(out, open(os.environ.get("OUT", "/tmp") + "/onepass.json", "w"), indent=1)


if __name__ == "__main__":
    main()
