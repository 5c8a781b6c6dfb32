"""Hybrid Sparse Attention (MST §4): causal attention restricted to a strided pattern, with a kernel that skips
the masked pairs.

Mode 'sparse' (Child et al.'s "unfactorized strided", MST's default) lets query i see key j iff j <= i and
(i - j < l or (i - j) % l == 0), l = stride: a band of the previous l positions plus every l-th earlier one.
The other modes ('local', 'strided', 'fixed', 'dense') exist as masks for the reference path.

The fast path splits the kept pairs into two disjoint sets, each computed as dense tensor-core tiles:
- strided, i - j = m*l with m >= 1: keys share the query's residue i % l, so in residue-major order
  (row i = residue + a*l) the pattern is block-diagonal with strictly causal (T/l) x (T/l) blocks. One program
  holds RS whole residue classes (64 rows by default, gathered by pointer arithmetic, no permuted copy), so it
  loads every q, k, v row once and computes its rows' strided attention outright: one tile, no loop.
- band, 0 <= i - j < l: FlashAttention-2's tile loop over query blocks and the key tiles from l - 1 positions
  before the block to its end (by default 64-row blocks and 64-key tiles).
Why not fold the strided keys into the band program: a 64-row query block needs one key per row from each of its
~T/l earlier periods, i.e. T/l contiguous 64-row K/V slices used for 64 pairs each; summed over blocks that is
T/(2l) reads of all of K and V from L2 (~370 MB per forward at T=1024, B*nh=192, ~4x the band's own traffic), the
same traffic as causal flash attention. The residue-major pass reads them once.
The passes merge by log-sum-exp through the output buffer: the strided kernel writes (o, lse) of its keys, the band
kernel folds them into its online softmax in the epilogue and writes the final (o, lse).
The backward pass is FlashAttention-2's (P recomputed from the final lse) in the same two steps: the strided kernel
writes dQ, dK, dV of its pairs and delta = rowsum(dO * O) for every row (it loads each row once anyway); the band
kernel adds its pairs in one program per 64-row block, no atomics: the diagonal tile (the block's queries against
its own keys) once for all of dQ, dK, dV, then dK/dV key-major over the ceil((l-1)/64) later query blocks that see
the block and dQ query-major over the earlier key blocks it sees.
Outputs and gradients are laid out (B, T, nh, hs) when q is (the model's q is a view of c_attn's output), as flash
attention's are: no copy before c_proj, none of dO or of dQ, dK, dV. Each kernel's block size, warps and pipeline
stages come from a table swept per (T, l, head dim) (`python -m kernels.bench_hsa --sweep`), else from defaults.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels import define_op, jit, launch_pdl, pdl_capable, select, triton_available

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # CPU-only installs: the reference path still works
    triton = tl = None

MODES = ("sparse", "local", "strided", "fixed", "dense")
TRITON_DTYPES = (torch.bfloat16, torch.float16)
TRITON_HEAD_DIMS = (16, 32, 64, 128)
# The strided tile is one program's whole residue classes (>= next_pow2(T / l) rows), all of q, k, v, dO, O in
# shared memory at once in the backward pass, so rows x head dim is bounded.
MAX_STRIDED_TILE = 128 * 64
BLOCK = 64  # default rows per program (see default_config)
LOG2E = 1.4426950408889634


def _check(T: int, stride: int, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"hsa mode must be one of {', '.join(MODES)}, got {mode!r}")
    if stride < 1:
        raise ValueError(f"hsa stride must be >= 1, got {stride}")
    if mode == "fixed" and T % stride:
        raise ValueError(f"hsa mode 'fixed' needs T % stride == 0, got T={T}, stride={stride}")


@functools.lru_cache(maxsize=32)
def _mask(T: int, stride: int, mode: str, device: torch.device) -> torch.Tensor:
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    d = i - j
    causal = d >= 0
    if mode == "sparse":
        return causal & ((d < stride) | (d % stride == 0))
    if mode == "local":
        return causal & (d < stride)
    if mode == "strided":
        return causal & (d % stride == 0)
    if mode == "fixed":
        # Column k*l - 1 for k = T/l is only reachable by row T-1, which owns it through its block anyway.
        return causal & ((i // stride == j // stride) | ((j + 1) % stride == 0))
    return causal


def hsa_mask(T: int, stride: int, mode: str = "sparse", device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (T, T) mask, True = query row attends to key column. Cached per (T, stride, mode, device): read-only."""
    _check(T, stride, mode)
    return _mask(T, stride, mode, torch.device(device if device is not None else "cpu"))


def hsa_density(T: int, stride: int, mode: str) -> float:
    """Kept pairs / causal pairs T(T+1)/2: the attention density for FLOP counting (model.flops.FlopProfile.attn)."""
    _check(T, stride, mode)
    i = torch.arange(T, dtype=torch.int64)
    kept = {
        "sparse": torch.clamp(i + 1, max=stride) + i // stride,
        "local": torch.clamp(i + 1, max=stride),
        "strided": i // stride + 1,
        "fixed": i % stride + 1 + i // stride,
        "dense": i + 1,
    }[mode]
    return int(kept.sum()) / (T * (T + 1) / 2)


def hsa_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stride: int, mode: str = "sparse", dropout_p: float = 0.0
) -> torch.Tensor:
    """SDPA with the boolean HSA mask: the spec, the CPU fallback and the path for dropout and the other modes.
    q, k, v: (B, nh, T, hs)."""
    T = q.size(-2)
    if mode == "dense":  # the same math; is_causal keeps SDPA on its flash kernel
        _check(T, stride, mode)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    mask = hsa_mask(T, stride, mode, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels. lse is kept in log2 units (scores are pre-multiplied by sm_scale * log2(e)) and never leaves here.
# Q, K, V share one set of strides (stride_i*), Out, dQ, dK, dV another (stride_o*), dO has its own (stride_g*: its
# layout is autograd's); LSE and Delta are (B*H, T).


@jit
def _strided_rows(T, L, NP: tl.constexpr, RS: tl.constexpr):
    """The program's tile: RS residue classes x NP periods, row i = residue + a*l, and which pairs are kept."""
    pp = tl.arange(0, RS * NP)
    rho = pp // NP
    a = pp % NP
    r = tl.program_id(0) * RS + rho
    i = r + a * L
    ok = (r < L) & (i < T)
    keep = (rho[:, None] == rho[None, :]) & (a[None, :] < a[:, None]) & ok[None, :]
    return i, ok, keep


@jit
def _strided_fwd_kernel(
    Q, K, V, Out, LSE, qk_scale,
    stride_ib, stride_ih, stride_it, stride_ob, stride_oh, stride_ot,
    H, T, L,
    HEAD_DIM: tl.constexpr, NP: tl.constexpr, RS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL:  # see `_pdl`
        gdc_wait()
        gdc_launch_dependents()
    bh = tl.program_id(1)
    in_off = (bh // H).to(tl.int64) * stride_ib + (bh % H).to(tl.int64) * stride_ih
    out_off = (bh // H).to(tl.int64) * stride_ob + (bh % H).to(tl.int64) * stride_oh
    i, ok, keep = _strided_rows(T, L, NP, RS)
    d = tl.arange(0, HEAD_DIM)
    in_ptr = in_off + i[:, None] * stride_it + d[None, :]
    q = tl.load(Q + in_ptr, mask=ok[:, None], other=0.0)
    k = tl.load(K + in_ptr, mask=ok[:, None], other=0.0)
    v = tl.load(V + in_ptr, mask=ok[:, None], other=0.0)
    s = tl.where(keep, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
    # Rows of the first period have no strided key: o = 0, lse = -inf, which the band's merge weighs by 0.
    m = tl.max(s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2(s - m[:, None])
    denom = tl.sum(p, 1)
    has = denom > 0.0
    denom = tl.where(has, denom, 1.0)
    o = tl.dot(p.to(v.dtype), v) / denom[:, None]
    tl.store(Out + out_off + i[:, None] * stride_ot + d[None, :], o.to(Out.dtype.element_ty), mask=ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * T + i, tl.where(has, m + tl.log2(denom), float("-inf")), mask=ok)


@jit
def _band_fwd_kernel(
    Q, K, V, Out, LSE, qk_scale,
    stride_ib, stride_ih, stride_it, stride_ob, stride_oh, stride_ot,
    H, T, L,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """PDL: launched programmatically dependent on the strided kernel, whose (o, lse) it reads only in the merge:
    the band loop runs beside the strided kernel's last programs."""
    start = tl.program_id(0) * BLOCK_M
    # Heads in reverse launch order: the first band programs find the heads the strided kernel touched last in L2.
    bh = tl.num_programs(1) - 1 - tl.program_id(1)
    in_off = (bh // H).to(tl.int64) * stride_ib + (bh % H).to(tl.int64) * stride_ih
    out_off = (bh // H).to(tl.int64) * stride_ob + (bh % H).to(tl.int64) * stride_oh
    Q += in_off
    K += in_off
    V += in_off
    LSE += bh.to(tl.int64) * T
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + rows[:, None] * stride_it + d[None, :], mask=row_ok[:, None], other=0.0)
    out_ptr = Out + out_off + rows[:, None] * stride_ot + d[None, :]
    if not PDL:  # the strided kernel's (o, lse) of these rows, loaded now so that their latency overlaps the tiles
        o_s = tl.load(out_ptr, mask=row_ok[:, None], other=0.0)
        lse_s = tl.load(LSE + rows, mask=row_ok, other=float("-inf"))
    # A finite floor for the running max: a key tile can hold no kept key for some rows (the band's first tile for
    # the block's last rows), and -inf - -inf would poison the rescale.
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    # Key tiles start at the block's first band key, not at a multiple of BLOCK_N: BLOCK_M + l - 1 keys take
    # ceil((BLOCK_M + l - 1) / BLOCK_N) tiles, e.g. one 128-key tile for a 64-row block at l = 64.
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

    if PDL:
        gdc_wait()
        gdc_launch_dependents()
        o_s = tl.load(out_ptr, mask=row_ok[:, None], other=0.0)
        lse_s = tl.load(LSE + rows, mask=row_ok, other=float("-inf"))
    # Merge with the strided kernel's (o, lse) of the same rows; rows past T have l_i = 0 and are not stored.
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    lse_b = m_i + tl.log2(l_i)
    m = tl.maximum(lse_b, lse_s)
    w_b = tl.exp2(lse_b - m)
    w_s = tl.exp2(lse_s - m)
    w = w_b + w_s
    o = (acc * (w_b / (l_i * w))[:, None]) + o_s.to(tl.float32) * (w_s / w)[:, None]
    tl.store(out_ptr, o.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + rows, m + tl.log2(w), mask=row_ok)


@jit
def _strided_bwd_kernel(
    Q, K, V, Out, DO, DQ, DK, DV, LSE, Delta, qk_scale, sm_scale,
    stride_ib, stride_ih, stride_it, stride_ob, stride_oh, stride_ot, stride_gb, stride_gh, stride_gt,
    H, T, L,
    HEAD_DIM: tl.constexpr, NP: tl.constexpr, RS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    i, ok, keep = _strided_rows(T, L, NP, RS)
    d = tl.arange(0, HEAD_DIM)
    in_ptr = b * stride_ib + h * stride_ih + i[:, None] * stride_it + d[None, :]
    out_ptr = b * stride_ob + h * stride_oh + i[:, None] * stride_ot + d[None, :]
    q = tl.load(Q + in_ptr, mask=ok[:, None], other=0.0)
    k = tl.load(K + in_ptr, mask=ok[:, None], other=0.0)
    v = tl.load(V + in_ptr, mask=ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_gb + h * stride_gh + i[:, None] * stride_gt + d[None, :], mask=ok[:, None], other=0.0)
    o = tl.load(Out + out_ptr, mask=ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + i, mask=ok, other=0.0)
    # Every row is in exactly one strided tile, so this is where the band kernel's delta comes from too.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * T + i, delta, mask=ok)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
    ds = (p * (tl.dot(do, tl.trans(v)) - delta[:, None])).to(q.dtype)
    tl.store(DV + out_ptr, tl.dot(tl.trans(p.to(do.dtype)), do).to(DV.dtype.element_ty), mask=ok[:, None])
    tl.store(DK + out_ptr, (tl.dot(tl.trans(ds), q) * sm_scale).to(DK.dtype.element_ty), mask=ok[:, None])
    tl.store(DQ + out_ptr, (tl.dot(ds, k) * sm_scale).to(DQ.dtype.element_ty), mask=ok[:, None])


@jit
def _band_dq_tile(Q, K, V, q, do, lse, delta, idx, keys, qk_scale, stride_it, L, HEAD_DIM: tl.constexpr,
                  MASKED: tl.constexpr):  # fmt: skip
    """dQ (unscaled) of query rows idx from the band pairs with key rows keys; MASKED: keys may be < 0."""
    d = tl.arange(0, HEAD_DIM)
    if MASKED:
        k_ok = keys >= 0
        kj = tl.load(K + keys[:, None] * stride_it + d[None, :], mask=k_ok[:, None], other=0.0)
        vj = tl.load(V + keys[:, None] * stride_it + d[None, :], mask=k_ok[:, None], other=0.0)
    else:
        kj = tl.load(K + keys[:, None] * stride_it + d[None, :])
        vj = tl.load(V + keys[:, None] * stride_it + d[None, :])
    s = tl.dot(q, tl.trans(kj)) * qk_scale
    if MASKED:
        p = tl.where((idx[:, None] - keys[None, :] < L) & k_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
    else:
        p = tl.where(idx[:, None] - keys[None, :] < L, tl.exp2(s - lse[:, None]), 0.0)
    ds = p * (tl.dot(do, tl.trans(vj)) - delta[:, None])
    return tl.dot(ds.to(kj.dtype), kj)


@jit
def _band_dkdv_tile(Q, DO, LSE, Delta, k, v, dk, dv, idx, rows, qk_scale, stride_it, stride_gt, T, L,
                    HEAD_DIM: tl.constexpr):  # fmt: skip
    """dK, dV (dK unscaled) of key rows idx plus the band pairs with query rows `rows` (past T or the band: 0)."""
    d = tl.arange(0, HEAD_DIM)
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
    return dk, dv


@jit
def _band_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE, Delta, qk_scale, sm_scale,
    stride_ib, stride_ih, stride_it, stride_ob, stride_oh, stride_ot, stride_gb, stride_gh, stride_gt,
    H, T, L,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, UNROLLED: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Adds the band pairs' gradients to the strided kernel's dQ, dK, dV of block pid: dQ query-major over the
    earlier key blocks the block sees, dK, dV key-major over the later query blocks that see it, and the diagonal
    tile (query block = key block, in both lists) once for all three, between the loops: dQ is finished and
    stored before dK, dV start accumulating, so at most two accumulators are live at a time. UNROLLED (l - 1 <=
    BLOCK, Launch.unrolled): each loop has one trip, the block before and the block after, and is written
    straight, which takes fewer registers (176 against 229 at head dim 64, 4 warps). PDL: launched programmatically
    dependent on the strided kernel: its q, dO and lse loads are issued before it waits for delta."""
    bh = tl.num_programs(1) - 1 - tl.program_id(1)  # reverse order, as in the forward pass
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
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    delta = tl.load(Delta + idx, mask=ok, other=0.0)

    # dQ from the earlier key blocks that i - l < j reaches (below T: no key mask, except before the first block).
    if UNROLLED:  # the block before
        dq = _band_dq_tile(Q, K, V, q, do, lse, delta, idx, idx - BLOCK, qk_scale, stride_it, L, HEAD_DIM, True)
    else:
        dq = tl.zeros((BLOCK, HEAD_DIM), tl.float32)
        for j0 in range(tl.maximum(start - L + 1, 0) // BLOCK * BLOCK, start, BLOCK):
            keys = j0 + tl.arange(0, BLOCK)
            dq += _band_dq_tile(Q, K, V, q, do, lse, delta, idx, keys, qk_scale, stride_it, L, HEAD_DIM, False)

    # The diagonal tile.
    k = tl.load(K + idx[:, None] * stride_it + d[None, :], mask=ok[:, None], other=0.0)
    v = tl.load(V + idx[:, None] * stride_it + d[None, :], mask=ok[:, None], other=0.0)
    diff = idx[:, None] - idx[None, :]
    s = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.where((diff >= 0) & (diff < L) & ok[:, None], tl.exp2(s - lse[:, None]), 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do)
    ds = (p * (tl.dot(do, tl.trans(v)) - delta[:, None])).to(q.dtype)
    out_ptr = idx[:, None] * stride_ot + d[None, :]
    dq = (dq + tl.dot(ds, k)) * sm_scale + tl.load(DQ + out_ptr, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DQ + out_ptr, dq.to(DQ.dtype.element_ty), mask=ok[:, None])
    dk = tl.dot(tl.trans(ds), q)

    # dK, dV from the later query blocks that j < i < j + l reaches, keys as rows (no tile transposed).
    if UNROLLED:  # the block after
        dk, dv = _band_dkdv_tile(Q, DO, LSE, Delta, k, v, dk, dv, idx, idx + BLOCK, qk_scale, stride_it, stride_gt,
                                 T, L, HEAD_DIM)  # fmt: skip
    else:
        for m0 in range(start + BLOCK, tl.minimum(start + BLOCK + L - 1, T), BLOCK):
            dk, dv = _band_dkdv_tile(Q, DO, LSE, Delta, k, v, dk, dv, idx, m0 + tl.arange(0, BLOCK), qk_scale,
                                     stride_it, stride_gt, T, L, HEAD_DIM)  # fmt: skip
    dk = dk * sm_scale + tl.load(DK + out_ptr, mask=ok[:, None], other=0.0).to(tl.float32)
    dv += tl.load(DV + out_ptr, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DK + out_ptr, dk.to(DK.dtype.element_ty), mask=ok[:, None])
    tl.store(DV + out_ptr, dv.to(DV.dtype.element_ty), mask=ok[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Launch. Each kernel's parameters come from TUNED, a table swept per (T, stride, head dim), else default_config.
# Not triton.autotune: it would pick per process (so runs, and DDP ranks, could differ in their rounding) and pay
# its benchmarking in the first training step.


@dataclass(frozen=True)
class Launch:
    """One kernel's launch parameters. block: rows per program, a power of two >= 16: a strided tile (RS = block / NP
    residue classes of NP = next_pow2(T / l) periods, so block >= NP; keys are the same rows), a band program's
    query block and key block (band forward: its key tile is block_n, default block). num_stages pipelines the
    band kernels' loops over key or query blocks; the strided kernels have no loop. maxnreg caps the registers per
    thread (ptxas .maxnreg): more programs per SM to hide the load latency of these short programs, for some
    spilling (e.g. the band backward's 229 registers at 4 warps allow 2 programs per SM, 168 allow 3). unrolled
    (band backward only, l - 1 <= block): its two one-trip loops written straight (_band_bwd_kernel's UNROLLED)."""

    block: int
    num_warps: int
    num_stages: int = 1
    block_n: int | None = None
    maxnreg: int | None = None
    unrolled: bool = False

    def options(self) -> dict[str, int]:
        """Triton's launch options."""
        extra = {} if self.maxnreg is None else {"maxnreg": self.maxnreg}
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, **extra}


class HsaConfig(NamedTuple):
    """The launch parameters of the four kernels for one (T, stride, head dim)."""

    strided_fwd: Launch
    band_fwd: Launch
    strided_bwd: Launch
    band_bwd: Launch


# (T, stride, head dim) -> the fastest configuration of `python -m kernels.bench_hsa --sweep` on an H100 (it prints
# these entries); any other shape runs default_config.
TUNED: dict[tuple[int, int, int], HsaConfig] = {
    # `python -m kernels.bench_hsa --sweep` on an H100 (results/raw/h100-hsa-sweep.json): bwd 0.194 -> 0.173 ms at
    # T=1024 and 0.197 -> 0.175 ms at T=2048 (graph replays, B*nh = 192 / 96); fwd within 3% of the defaults.
    # Session 23 on an H200: strided_bwd capped at 128 registers, 4 programs per SM instead of 3
    # (results/raw/h200-hsa-caps.json: bwd 0.152 -> 0.148 ms), then the unrolled band backward
    # (results/raw/h200-hsa-refactor-ab.json: bwd 0.147 -> 0.139 ms; 0.149 -> 0.141 at T=2048).
    (1024, 64, 64): HsaConfig(
        strided_fwd=Launch(block=64, num_warps=4, num_stages=1),
        band_fwd=Launch(block=64, num_warps=4, num_stages=2, block_n=64, maxnreg=128),
        strided_bwd=Launch(block=64, num_warps=4, num_stages=1, maxnreg=128),
        band_bwd=Launch(block=64, num_warps=4, num_stages=1, maxnreg=168, unrolled=True)),
    # MST's default stride (configs/mst-gpt2.toml): `--sweep --cases 1024x256x16` on an H200
    # (results/raw/h200-hsa-sweep-1024-256.json): bwd 0.261 -> 0.209 ms, fwd 0.092 -> 0.091 ms (graph replays).
    (1024, 256, 64): HsaConfig(
        strided_fwd=Launch(block=64, num_warps=4, num_stages=1),
        band_fwd=Launch(block=64, num_warps=4, num_stages=2, block_n=64, maxnreg=128),
        strided_bwd=Launch(block=16, num_warps=2, num_stages=1),
        band_bwd=Launch(block=64, num_warps=4, num_stages=1, maxnreg=168)),
    (2048, 64, 64): HsaConfig(
        strided_fwd=Launch(block=32, num_warps=2, num_stages=1),
        band_fwd=Launch(block=64, num_warps=4, num_stages=2, block_n=64, maxnreg=128),
        strided_bwd=Launch(block=64, num_warps=4, num_stages=1, maxnreg=128),
        band_bwd=Launch(block=64, num_warps=4, num_stages=1, maxnreg=168, unrolled=True)),
}


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _periods(T: int, stride: int) -> int:
    """NP: rows per residue class in a strided tile, next_pow2(T / l)."""
    return _next_pow2(-(-T // stride))


@functools.lru_cache(maxsize=64)  # immutable; looked up on every call
def default_config(T: int, stride: int, head_dim: int) -> HsaConfig:
    """64-row blocks and key tiles (the smallest wgmma M) and a strided tile of one residue class where that is
    longer; 8 warps once a tile is over 64 x 64."""
    tile = max(BLOCK, _periods(T, stride))
    strided = Launch(tile, 4 if tile * head_dim <= BLOCK * 64 else 8)
    warps, small = (4, True) if head_dim <= 64 else (8, False)
    band_fwd = Launch(BLOCK, warps, 3 if small else 2, BLOCK)
    return HsaConfig(strided, band_fwd, strided, Launch(BLOCK, warps, 2 if small else 1))


def config_for(T: int, stride: int, head_dim: int) -> HsaConfig:
    return TUNED.get((T, stride, head_dim)) or default_config(T, stride, head_dim)


@functools.lru_cache(maxsize=256)  # a pure function of hashable arguments, asked on every call
def config_error(config: HsaConfig, T: int, stride: int, head_dim: int) -> str | None:
    """Why `config` cannot run this shape (or would compute the wrong pairs), or None if it can."""
    np_ = _periods(T, stride)
    for name, launch in zip(HsaConfig._fields, config, strict=True):
        for size in (launch.block, launch.block_n or launch.block, launch.num_warps):
            if size < 1 or size & (size - 1):
                return f"{name}: block sizes and num_warps must be powers of two, got {launch}"
        if min(launch.block, launch.block_n or launch.block) < 16 or launch.num_stages < 1:
            return f"{name}: blocks must be >= 16 (tl.dot) and num_stages >= 1, got {launch}"
        if launch.maxnreg is not None and not 32 <= launch.maxnreg <= 255:
            return f"{name}: maxnreg must be in [32, 255], got {launch}"
        if launch.block_n is not None and name != "band_fwd" and launch.block_n != launch.block:
            return f"{name}: only band_fwd has a key tile of its own, got {launch}"
        if launch.unrolled and name != "band_bwd":
            return f"{name}: only band_bwd has an unrolled kernel, got {launch}"
        if launch.unrolled and stride - 1 > launch.block:
            return f"{name}: unrolled needs the band (l - 1 = {stride - 1}) within one {launch.block}-row block"
        if name.startswith("strided") and launch.block < np_:
            return f"{name}: a {launch.block}-row tile cannot hold a residue class of {np_} periods (T={T}, l={stride})"
        if name.startswith("strided") and launch.block * head_dim > MAX_STRIDED_TILE:
            return f"{name}: tile rows x head dim = {launch.block} x {head_dim} > {MAX_STRIDED_TILE}"
    return None


def triton_unsupported(q: torch.Tensor, stride: int, mode: str = "sparse", dropout_p: float = 0.0) -> str | None:
    """Why the Triton path cannot take this call, or None if it can."""
    T, hs = q.size(-2), q.size(-1)
    if mode != "sparse":
        return f"mode {mode!r} has no fast kernel (only 'sparse')"
    if dropout_p > 0.0:
        return "attention dropout is only in the reference path"
    if not q.is_cuda or not triton_available():
        return "needs CUDA and Triton"
    if q.dtype not in TRITON_DTYPES:
        return f"dtype {q.dtype} (needs bfloat16 or float16)"
    if hs not in TRITON_HEAD_DIMS:
        return f"head dim {hs} (needs one of {TRITON_HEAD_DIMS})"
    why = config_error(config_for(T, stride, hs), T, stride, hs)
    return None if why is None else f"T={T}, stride={stride}, head dim {hs}: {why}"


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _same_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernels take one set of strides for q, k, v (the model's are views of one c_attn output, so they match)
    and need a unit stride along the head dim."""
    if q.stride(-1) == 1 and q.stride() == k.stride() == v.stride():
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def _empty_out(q: torch.Tensor) -> torch.Tensor:
    """A (B, nh, T, hs) output or gradient, laid out (B, T, nh, hs) when q is (the model's q, a view of c_attn's
    output): the model's y.transpose(1, 2).contiguous() is then free and autograd hands dO back in o's layout, as
    flash attention does; dQ, dK, dV then need no copy on their way back to c_attn either. A function of q's shape
    and stride order only (not of a size-1 dim's stride, which compiled graphs may set either way), so the fake ops
    below make the same layout."""
    B, H, T, D = q.shape
    if H > 1 and T > 1 and q.stride(1) < q.stride(2):
        return q.new_empty((B, T, H, D)).transpose(1, 2)
    return q.new_empty((B, H, T, D))


def _check_config(config: HsaConfig | None, T: int, stride: int, D: int) -> HsaConfig:
    if config is None:
        return config_for(T, stride, D)
    if (why := config_error(config, T, stride, D)) is not None:
        raise ValueError(f"hsa config for T={T}, stride={stride}, head dim {D}: {why}")
    return config


USE_PDL = True  # benchmarks flip it to measure what programmatic dependent launch gains


def _pdl(device: torch.device) -> bool:
    """Launch the kernels programmatically dependent on the kernel before them (Hopper and later): a launch's
    programs may start while that kernel still runs. The strided kernels wait for it before they read anything,
    and only then let the band kernel after them start (so the band's q, k, v, dO are written by then). The band
    forward runs its whole loop beside the strided kernel's last programs and waits only before it merges their
    (o, lse); the band backward waits before it reads delta. On an H200: fwd+bwd 1.004-1.009x, the forward
    1.007-1.034x (`results/raw/h200-hsa-pdl-s30.json`)."""
    return USE_PDL and pdl_capable(device)


def hsa_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stride: int, config: HsaConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernels: (o, lse), o (B, nh, T, hs) laid out as _empty_out(q), lse (B*nh, T) in log2 units.
    config: config_for's unless given (the sweep's trials)."""
    B, H, T, D = q.shape
    strided, band = _check_config(config, T, stride, D)[:2]
    o = _empty_out(q)
    q, k, v = _same_layout(q, k, v)
    lse = q.new_empty((B * H, T), dtype=torch.float32)
    args = (q, k, v, o, lse, LOG2E / math.sqrt(D), *_strides(q), *_strides(o), H, T, stride)
    np_ = _periods(T, stride)
    rs = strided.block // np_
    pdl = _pdl(q.device)
    _strided_fwd_kernel[(-(-stride // rs), B * H)](
        *args, HEAD_DIM=D, NP=np_, RS=rs, PDL=pdl, **strided.options(), **launch_pdl(pdl)
    )
    _band_fwd_kernel[(-(-T // band.block), B * H)](
        *args, HEAD_DIM=D, BLOCK_M=band.block, BLOCK_N=band.block_n or band.block, PDL=pdl, **band.options(),
        **launch_pdl(pdl),
    )
    return o, lse


def hsa_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
    stride: int, config: HsaConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernels: (dQ, dK, dV), laid out as _empty_out(q); (o, lse) are hsa_forward's of the same q."""
    B, H, T, D = q.shape
    strided, band = _check_config(config, T, stride, D)[2:]
    dq, dk, dv = _empty_out(q), _empty_out(q), _empty_out(q)
    if o.stride() != dq.stride():
        raise ValueError(f"o must be hsa_forward's output for this q (strides {dq.stride()}), got {o.stride()}")
    q, k, v = _same_layout(q, k, v)
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty_like(lse)
    sm_scale = 1.0 / math.sqrt(D)
    args = (
        q, k, v, o, do, dq, dk, dv, lse, delta, sm_scale * LOG2E, sm_scale,
        *_strides(q), *_strides(o), *_strides(do), H, T, stride,
    )  # fmt: skip
    np_ = _periods(T, stride)
    rs = strided.block // np_
    pdl = _pdl(q.device)
    _strided_bwd_kernel[(-(-stride // rs), B * H)](
        *args, HEAD_DIM=D, NP=np_, RS=rs, PDL=pdl, **strided.options(), **launch_pdl(pdl)
    )
    grid = (-(-T // band.block), B * H)
    _band_bwd_kernel[grid](
        *args[:3], *args[4:], HEAD_DIM=D, BLOCK=band.block, UNROLLED=band.unrolled, PDL=pdl, **band.options(),
        **launch_pdl(pdl),
    )
    return dq, dk, dv


def _in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t with like's strides (a copy into like only if they differ): an op's outputs must match its fake's."""
    if t.stride() == like.stride():
        return t
    return like.copy_(t)


def causal_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention through SDPA's flash kernel, with hsa_forward's outputs: (o laid out as _empty_out(q),
    lse (B*nh, T)). Its lse is flash's own (natural log), which only causal_backward reads."""
    B, H, T, _ = q.shape
    q, k, v = _same_layout(q, k, v)
    if q.is_cuda:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)[:2]
    else:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    if tuple(lse.shape) != (B, H, T):
        raise RuntimeError(f"flash attention returned a logsumexp of shape {tuple(lse.shape)}, not {(B, H, T)}")
    return _in_layout_of(o, _empty_out(q)), lse.reshape(B * H, T)


def causal_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) of causal_forward, laid out as _empty_out(q)."""
    B, H, T, _ = q.shape
    q, k, v = _same_layout(q, k, v)
    if do.stride(-1) != 1:
        do = do.contiguous()
    lse = lse.view(B, H, T)
    if q.is_cuda:  # no dropout: no cumulative lengths (not varlen) and no RNG state to pass
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, o, lse, None, None, T, T, 0.0, True, None, None
        )
    else:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, o, lse, 0.0, True)
    return tuple(_in_layout_of(g, _empty_out(q)) for g in grads)


# The kernels as torch.library ops: torch.compile sees one opaque op per pass (shapes from the fakes below) instead
# of a graph break. A break inside a block made dynamo run GPT.forward's loop over blocks eagerly and split every
# block into pieces, on top of the kernel's own time. The ops have no autograd of their own: `_HsaFn`, an
# autograd.Function that dynamo traces, ties them together, so a compiled step calls each op's kernel straight from
# the dispatcher. (torch.library.custom_op with register_autograd puts Python in front of every call of a compiled
# graph: its autograd kernel, a redispatch, dynamo-disable wrappers and output-alias checks.) `causal` = 1 runs
# dense causal attention (flash) instead, chosen when the op runs: MST's switch from HSA to dense attention then
# needs no other graph (HsaAttention.runtime_mode).
def _fwd_impl(q, k, v, stride, causal):
    return causal_forward(q, k, v) if causal else hsa_forward(q, k, v, stride)


def _bwd_impl(q, k, v, o, lse, do, stride, causal):
    return causal_backward(q, k, v, o, lse, do) if causal else hsa_backward(q, k, v, o, lse, do, stride)


def _fwd_fake(q, k, v, stride, causal):
    B, H, T, D = q.shape
    return _empty_out(q), q.new_empty((B * H, T), dtype=torch.float32)


def _bwd_fake(q, k, v, o, lse, do, stride, causal):
    return _empty_out(q), _empty_out(q), _empty_out(q)


_hsa_fwd_op = define_op(
    "hsa_fwd(Tensor q, Tensor k, Tensor v, int stride, SymInt causal) -> (Tensor, Tensor)", _fwd_impl, _fwd_fake
)
_hsa_bwd_op = define_op(
    "hsa_bwd(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor do, int stride, SymInt causal) -> "
    "(Tensor, Tensor, Tensor)",
    _bwd_impl,
    _bwd_fake,
)


class _HsaFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, stride, causal):
        o, lse = _hsa_fwd_op(q, k, v, stride, causal)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.stride, ctx.causal = stride, causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        return (*_hsa_bwd_op(q, k, v, o, lse, do, ctx.stride, ctx.causal), None, None)


def hsa_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stride: int, causal: int = 0
) -> torch.Tensor:
    """Mode 'sparse' HSA computing only the kept pairs (forward and backward), or dense causal attention (flash)
    when `causal` is 1. q, k, v: (B, nh, T, hs) on CUDA (or CPU tensors under TRITON_INTERPRET=1); bf16/fp16 (fp32
    runs with TF32 dots on a GPU)."""
    _check(q.size(-2), stride, "sparse")
    if k is q or v is q or v is k:  # dynamo refuses an autograd.Function given one tensor twice; a view is another
        k, v = k.view_as(k), v.view_as(v)
    return _HsaFn.apply(q, k, v, stride, causal)


IMPLS: dict[str, Callable[..., torch.Tensor]] = {"triton": hsa_attention_triton, "ref": hsa_attention_ref}


def hsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    stride: int,
    mode: str = "sparse",
    dropout_p: float = 0.0,
    backend: str = "auto",
    causal: int = 0,
) -> torch.Tensor:
    """HSA through the fastest implementation that can run this call (backend 'auto'), or the one named. `causal`
    = 1: dense causal attention instead, through the same path (on the Triton path the ops choose it when they
    run, so a compiled graph may take it as an input)."""
    why_not = triton_unsupported(q, stride, mode, dropout_p)
    if backend == "triton" and why_not is not None:
        raise RuntimeError(f"hsa backend 'triton' cannot run this call: {why_not}; use 'ref' or 'auto'")
    name = select(IMPLS, backend, {"triton": lambda: why_not is None})
    if name == "triton":
        return hsa_attention_triton(q, k, v, stride, causal)
    return hsa_attention_ref(q, k, v, stride, "dense" if causal else mode, dropout_p)


class HsaAttention:
    """Attention for CausalSelfAttention.attend, with model.gpt.causal_attention's signature: HSA, or dense causal
    attention when `runtime_mode` is 1. MST flips the mode where its schedule turns HSA off. The mode reaches a
    compiled graph as an input (kernels.compile_runtime_modes): on the Triton path the switch compiles nothing."""

    def __init__(self, stride: int, mode: str = "sparse", backend: str = "auto") -> None:
        if mode not in MODES:
            raise ValueError(f"hsa mode must be one of {', '.join(MODES)}, got {mode!r}")
        if stride < 1:
            raise ValueError(f"hsa stride must be >= 1, got {stride}")
        self.stride, self.mode, self.backend = stride, mode, backend
        self.runtime_mode = 0  # 1 = dense causal attention

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
        return hsa_attention(q, k, v, self.stride, self.mode, dropout_p, self.backend, self.runtime_mode)

    def __repr__(self) -> str:
        causal = ", dense causal" if self.runtime_mode else ""
        return f"HsaAttention(stride={self.stride}, mode={self.mode!r}, backend={self.backend!r}{causal})"
