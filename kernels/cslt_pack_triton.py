"""Triton kernel of kernels/cslt_pack.py (`mvue24_pack`): MVUE 2:4 of dYᵀ written in cuSPARSELt's layout.

Importing this module imports triton; kernels/cslt_pack.py does it only when the kernel runs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.semi24_triton import _pick


@triton.jit
def _sel(k, v0, v1, v2, v3):
    return tl.where(k == 0, v0, tl.where(k == 1, v1, tl.where(k == 2, v2, v3)))


@triton.jit
def mvue_pack_kernel(x_ptr, out_ptr, meta_ptr, T, N, seed):
    # x: dY (T, N) row-major. Output: MVUE(dYᵀ) (N, T) compressed: values (N, T/2) row-major, then metadata words.
    # One program = one metadata tile: 64 rows (features n) x 8 groups (32 tokens). Element (w, s) of the (128, 4)
    # arrays is the code in nibble s of the tile's word w (kernels/cslt_pack.py gives the bit order), so a word is
    # the sum of its row, shifted.
    pid_t, pid_n = tl.program_id(0), tl.program_id(1)
    w = tl.arange(0, 128)[:, None]
    s = tl.arange(0, 4)[None, :]
    r = ((w >> 2) & 7) | ((s & 1) << 3) | ((w >> 5) << 4)
    g = (w & 3) | ((s >> 1) << 2)
    n = pid_n * 64 + r
    grp = pid_t * 8 + g  # group of 4 tokens along T
    base = (grp * 4) * N + n
    x0 = tl.load(x_ptr + base).to(tl.float32)
    x1 = tl.load(x_ptr + base + N).to(tl.float32)
    x2 = tl.load(x_ptr + base + 2 * N).to(tl.float32)
    x3 = tl.load(x_ptr + base + 3 * N).to(tl.float32)
    # The draw of kernels.semi24_triton._mvue_kernel, same Philox counters: the same MVUE(dYᵀ) for a seed.
    eps = 1.19209e-7
    a0, a1, a2, a3 = tl.abs(x0) + eps, tl.abs(x1) + eps, tl.abs(x2) + eps, tl.abs(x3) + eps
    S = a0 + a1 + a2 + a3
    gid = grp * N + n
    u1 = tl.rand(seed, 2 * gid)
    u2 = tl.rand(seed, 2 * gid + 1)
    i = _pick(u1, a0, a1, a2, a3, S)
    b0, b1, b2, b3 = tl.where(i == 0, 0.0, a0), tl.where(i == 1, 0.0, a1), tl.where(i == 2, 0.0, a2), tl.where(
        i == 3, 0.0, a3)
    j = _pick(u2, b0, b1, b2, b3, S - _sel(i, a0, a1, a2, a3))
    j = tl.where(j == i, tl.where(i == 3, 2, 3), j)
    r0, r1, r2, r3 = (a0 / S) / (S - a0), (a1 / S) / (S - a1), (a2 / S) / (S - a2), (a3 / S) / (S - a3)
    rs = r0 + r1 + r2 + r3
    p0, p1, p2, p3 = a0 / S + a0 * (rs - r0), a1 / S + a1 * (rs - r1), a2 / S + a2 * (rs - r2), a3 / S + a3 * (rs - r3)
    lo, hi = tl.minimum(i, j), tl.maximum(i, j)
    y_lo = _sel(lo, x0, x1, x2, x3) / _sel(lo, p0, p1, p2, p3)
    y_hi = _sel(hi, x0, x1, x2, x3) / _sel(hi, p0, p1, p2, p3)
    vals = out_ptr + n * (T // 2) + 2 * grp
    tl.store(vals, y_lo.to(out_ptr.dtype.element_ty))
    tl.store(vals + 1, y_hi.to(out_ptr.dtype.element_ty))
    word = tl.sum((lo | (hi << 2)) << (4 * s), axis=1)
    tile = pid_n * (T // 32) + pid_t
    tl.store(meta_ptr + N * (T // 2) + tile * 128 + tl.arange(0, 128), word.to(tl.int16))
