"""Triton kernels for 2:4 training (kernels/semi24.py holds the references they must match).

- `transposable_search`: per aligned 4x4 block of |W|, the index (uint8) of the transposable pattern with the most
  kept L1 — the paper's "convolution" done as 16 rank-1 updates of a (blocks x 128) score tile and an argmax.
  Memory-bound: each weight is read once, one byte per 16 weights is written.
- `prune24`: W̃ = M⊙W and W̃ᵀ (contiguous) in the compute dtype from W and the pattern indices, one pass.
- `mvue24_t`: MVUE 2:4 along the token axis of dY (T, N), written transposed as the dense pruned dYᵀ (N, T), the
  left operand of dW = dYᵀX. Philox seeded per call from (seed, step, layer, microstep), or read from a device
  tensor [base, micro] (CUDA-graph replays: the seed must change without re-capturing, see `mixed_seed`).

Importing this module imports triton; kernels/semi24.py does it only when a Triton path is chosen.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NPAD_HOST = 128  # the 90 patterns padded to a power of two for the score tile
NPAD = tl.constexpr(NPAD_HOST)


@triton.jit
def _search_kernel(w_ptr, pat_ptr, idx_ptr, R, C, stride_w, BR: tl.constexpr, BC: tl.constexpr):
    # One program scores the (BR/4)*(BC/4) blocks of a BR x BC tile against all patterns.
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    GR: tl.constexpr = BR // 4
    GC: tl.constexpr = BC // 4
    br = pid_r * GR + tl.arange(0, GR)  # block-row indices
    bc = pid_c * GC + tl.arange(0, GC)
    valid = (br[:, None] < R // 4) & (bc[None, :] < C // 4)
    p = tl.arange(0, NPAD)
    score = tl.zeros((GR * GC, NPAD), dtype=tl.float32)
    for e in tl.static_range(16):
        rows = br * 4 + e // 4
        cols = bc * 4 + e % 4
        v = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=valid, other=0.0)
        v = tl.reshape(tl.abs(v.to(tl.float32)), (GR * GC,))
        pe = tl.load(pat_ptr + p * 16 + e)  # column e of the (NPAD, 16) pattern table
        score += v[:, None] * pe[None, :]
    score = tl.where(p[None, :] < 90, score, -1.0)  # padded patterns never win (scores are >= 0)
    best = tl.argmax(score, axis=1, tie_break_left=True)
    out = tl.reshape(br[:, None] * (C // 4) + bc[None, :], (GR * GC,))
    tl.store(idx_ptr + out, best.to(tl.uint8), mask=tl.reshape(valid, (GR * GC,)))


def transposable_search(w: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Pattern index per 4x4 block of w (R, C): uint8 (R/4, C/4). patterns: (90, 16) float32 on w's device."""
    R, C = w.shape
    w = w if w.stride(1) == 1 else w.contiguous()
    table = torch.zeros(NPAD_HOST, 16, dtype=torch.float32, device=w.device)
    table[:90] = patterns
    idx = torch.empty(R // 4, C // 4, dtype=torch.uint8, device=w.device)
    BR, BC = 32, 64
    grid = (triton.cdiv(R, BR), triton.cdiv(C, BC))
    _search_kernel[grid](w, table, idx, R, C, w.stride(0), BR=BR, BC=BC, num_warps=8)  # 64 score regs/thread
    return idx


@triton.jit
def _prune_kernel(w_ptr, bits_ptr, idx_ptr, out_ptr, outt_ptr, R, C, BR: tl.constexpr, BC: tl.constexpr):
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    r = pid_r * BR + tl.arange(0, BR)
    c = pid_c * BC + tl.arange(0, BC)
    inb = (r[:, None] < R) & (c[None, :] < C)
    w = tl.load(w_ptr + r[:, None] * C + c[None, :], mask=inb, other=0.0)
    pat = tl.load(idx_ptr + (r[:, None] // 4) * (C // 4) + c[None, :] // 4, mask=inb, other=0).to(tl.int32)
    bits = tl.load(bits_ptr + pat)  # 16-bit pattern, bit (4*row + col) set where kept
    keep = ((bits >> ((r[:, None] % 4) * 4 + c[None, :] % 4)) & 1) != 0
    v = tl.where(keep, w, 0.0).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + r[:, None] * C + c[None, :], v, mask=inb)
    tl.store(outt_ptr + c[None, :] * R + r[:, None], v, mask=inb)


def prune24(w: torch.Tensor, idx: torch.Tensor, pattern_bits: torch.Tensor, dtype: torch.dtype):
    """(M⊙W, (M⊙W)ᵀ contiguous) in dtype, from the pattern indices idx (R/4, C/4) and the (90,) int32 bit table."""
    R, C = w.shape
    w = w.contiguous()
    out = torch.empty(R, C, dtype=dtype, device=w.device)
    out_t = torch.empty(C, R, dtype=dtype, device=w.device)
    BR, BC = 64, 64
    _prune_kernel[(triton.cdiv(R, BR), triton.cdiv(C, BC))](w, pattern_bits, idx, out, out_t, R, C, BR=BR, BC=BC)
    return out, out_t


@triton.jit
def _pick(u, a0, a1, a2, a3, total):
    # First index whose running sum of a exceeds u*total (inverse CDF); a zero weight is never picked.
    target = u * total
    c0 = a0
    c1 = c0 + a1
    c2 = c1 + a2
    return tl.minimum((c0 <= target).to(tl.int32) + (c1 <= target).to(tl.int32) + (c2 <= target).to(tl.int32), 3)


@triton.jit
def _mvue_kernel(x_ptr, out_ptr, T, N, seed, seed_ptr, BG: tl.constexpr, BN: tl.constexpr, SEED_PTR: tl.constexpr):
    # x: (T, N) row-major; out: (N, T) row-major. One program handles BG groups of 4 tokens x BN features.
    pid_t, pid_n = tl.program_id(0), tl.program_id(1)
    if SEED_PTR:  # same mixing as kernels.semi24.mixed_seed
        seed = (tl.load(seed_ptr) ^ (tl.load(seed_ptr + 1) * 0x5BD1E995)) & 0x7FFFFFFF
    g = pid_t * BG + tl.arange(0, BG)
    n = pid_n * BN + tl.arange(0, BN)
    inb = (g[:, None] < T // 4) & (n[None, :] < N)
    base = (g[:, None] * 4) * N + n[None, :]
    x0 = tl.load(x_ptr + base, mask=inb, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + base + N, mask=inb, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + 2 * N, mask=inb, other=0.0).to(tl.float32)
    x3 = tl.load(x_ptr + base + 3 * N, mask=inb, other=0.0).to(tl.float32)
    eps = 1.19209e-7
    a0, a1, a2, a3 = tl.abs(x0) + eps, tl.abs(x1) + eps, tl.abs(x2) + eps, tl.abs(x3) + eps
    S = a0 + a1 + a2 + a3
    gid = g[:, None] * N + n[None, :]  # group id: the Philox counter, so draws don't depend on the tiling
    u1 = tl.rand(seed, 2 * gid)
    u2 = tl.rand(seed, 2 * gid + 1)
    i = _pick(u1, a0, a1, a2, a3, S)
    b0, b1, b2, b3 = tl.where(i == 0, 0.0, a0), tl.where(i == 1, 0.0, a1), tl.where(i == 2, 0.0, a2), tl.where(
        i == 3, 0.0, a3)
    ai = tl.where(i == 0, a0, tl.where(i == 1, a1, tl.where(i == 2, a2, a3)))
    j = _pick(u2, b0, b1, b2, b3, S - ai)
    j = tl.where(j == i, tl.where(i == 3, 2, 3), j)  # rounding at u2*total ~ total: never repeat i
    # p_k = t_k + a_k * sum_{m != k} t_m / (S - a_m): probability that k is one of the two picks.
    r0, r1, r2, r3 = (a0 / S) / (S - a0), (a1 / S) / (S - a1), (a2 / S) / (S - a2), (a3 / S) / (S - a3)
    rs = r0 + r1 + r2 + r3
    p0, p1, p2, p3 = a0 / S + a0 * (rs - r0), a1 / S + a1 * (rs - r1), a2 / S + a2 * (rs - r2), a3 / S + a3 * (rs - r3)
    y0 = tl.where((i == 0) | (j == 0), x0 / p0, 0.0)
    y1 = tl.where((i == 1) | (j == 1), x1 / p1, 0.0)
    y2 = tl.where((i == 2) | (j == 2), x2 / p2, 0.0)
    y3 = tl.where((i == 3) | (j == 3), x3 / p3, 0.0)
    # Interleave the four (BG, BN) tiles into (BN, 4*BG) so the transposed store is contiguous along T.
    z = tl.join(tl.join(y0, y2), tl.join(y1, y3))  # z[g, n, k, l] = y_{2k+l}
    z = tl.reshape(tl.permute(z, (1, 0, 2, 3)), (BN, 4 * BG))
    t = pid_t * 4 * BG + tl.arange(0, 4 * BG)
    omask = (n[:, None] < N) & (t[None, :] < T)
    tl.store(out_ptr + n[:, None] * T + t[None, :], z.to(out_ptr.dtype.element_ty), mask=omask)


def mvue24_t(x: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    """MVUE 2:4 along dim 0 of x (T, N), returned as the dense pruned xᵀ (N, T) contiguous, in x's dtype.

    seed: a 31-bit int, or an int64 device tensor [base, micro] read by the kernel (no host sync, graph-safe).
    """
    T, N = x.shape
    x = x.contiguous()
    out = torch.empty(N, T, dtype=x.dtype, device=x.device)
    BG, BN = 16, 64
    grid = (triton.cdiv(T // 4, BG), triton.cdiv(N, BN))
    if isinstance(seed, torch.Tensor):
        _mvue_kernel[grid](x, out, T, N, 0, seed, BG=BG, BN=BN, SEED_PTR=True)
    else:
        _mvue_kernel[grid](x, out, T, N, seed, x, BG=BG, BN=BN, SEED_PTR=False)
    return out
