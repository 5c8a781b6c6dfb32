"""Triton kernels for 2:4 training (kernels/semi24.py holds the references they must match).

- `transposable_search`: per aligned 4x4 block of |W|, the index (uint8) of the transposable pattern with the most
  kept L1 — the paper's "convolution", as a walk over the 90 patterns in registers, one block per thread, with
  scores bit-identical to the reference's. Reads each weight once and writes one byte per 16 weights.
- `prune24`: W̃ = M⊙W and W̃ᵀ (contiguous) in the compute dtype from W and the pattern indices, one pass.
- `mvue24_t`: MVUE 2:4 along the token axis of dY (T, N), written transposed as the dense pruned dYᵀ (N, T), the
  left operand of dW = dYᵀX. Philox seeded per call from (seed, step, layer, microstep), or read from a device
  tensor [base, micro] (CUDA-graph replays: the seed must change without re-capturing, see `mixed_seed`).

Importing this module imports triton; kernels/semi24.py does it only when a Triton path is chosen.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl


def _row_masks() -> int:
    # The 6 ways to keep 2 of a row's 4 entries, in the order kernels.semi24._build_patterns enumerates them
    # (lexicographic over 0/1 rows), as 4-bit column masks packed 4 bits apart: row choice k is (ROWS >> 4k) & 15.
    rows = [r for r in itertools.product((0, 1), repeat=4) if sum(r) == 2]
    return sum(sum(bit << c for c, bit in enumerate(r)) << (4 * k) for k, r in enumerate(rows))


ROWS = tl.constexpr(_row_masks())


@triton.jit
def _add_row(s, x0, x1, x2, x3, m: tl.constexpr):
    # s + the row's kept entries (column mask m), added one at a time in ascending column order.
    if m & 1:
        s = s + x0
    if m & 2:
        s = s + x1
    if m & 4:
        s = s + x2
    if m & 8:
        s = s + x3
    return s


@triton.jit
def _load_row(w_ptr, rows, cols, inb, GR: tl.constexpr, GC: tl.constexpr):
    # One row of every block of the tile as 4 (GR, GC) tensors, entry c of the row in the c-th. The load is a
    # coalesced (GR, 4*GC) row slab; the split only regroups each thread's 4 contiguous columns (no data movement).
    v = tl.load(w_ptr + rows[:, None] + cols[None, :], mask=inb, other=0.0)
    lo, hi = tl.split(tl.reshape(tl.abs(v.to(tl.float32)), (GR, GC, 2, 2)))  # lo: columns 0, 2; hi: 1, 3
    x0, x2 = tl.split(lo)
    x1, x3 = tl.split(hi)
    return x0, x1, x2, x3


@triton.jit
def _search_kernel(w_ptr, idx_ptr, R, C, stride_w, GR: tl.constexpr, GC: tl.constexpr):
    # One program handles GR x GC blocks (a 4GR x 4GC tile); each thread keeps its blocks' 16 |w| in registers and
    # walks the 90 patterns as a prefix tree over their rows, keeping a running (best score, best index).
    #
    # Exactness: a pattern's score is its 8 kept |w| added one at a time in row-major order, which is how the
    # reference's `blocks @ patterns.T` rounds (adding x * 0 leaves a non-negative sum unchanged;
    # tests/kernels/test_semi24_search.py checks it). Any other order (e.g. per-row pair sums added up) changes the
    # last bit of some scores and so the winner of some near-ties. With bit-identical scores, walking the patterns
    # in index order with a strict `>` takes the first maximum, as argmax does. NaN scores never win (argmax would
    # pick the first NaN): a NaN weight means training has diverged anyway.
    # Cost: the prefix sums are shared without changing that order: 6 row-0 sums, 36 (row 0, row 1) sums, then per
    # pattern 2 adds for row 2 and 2 for row 3 (forced by rows 0-2): <= 6 + 72 + 180 + 180 adds and 90 x (compare,
    # 2 selects) per block, about 750 instructions, against 16 x 128 FMAs, a 128-wide argmax and 16 stride-4
    # gathers for a (blocks x 128) score tile. The Python-level branches below are resolved at compile time.
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    br = pid_r * GR + tl.arange(0, GR)  # block rows
    cols = pid_c * 4 * GC + tl.arange(0, 4 * GC)
    inb = (br[:, None] < R // 4) & (cols[None, :] < C)
    rows = br * 4 * stride_w
    a0, a1, a2, a3 = _load_row(w_ptr, rows, cols, inb, GR, GC)
    b0, b1, b2, b3 = _load_row(w_ptr, rows + stride_w, cols, inb, GR, GC)
    c0, c1, c2, c3 = _load_row(w_ptr, rows + 2 * stride_w, cols, inb, GR, GC)
    d0, d1, d2, d3 = _load_row(w_ptr, rows + 3 * stride_w, cols, inb, GR, GC)
    zero = tl.zeros((GR, GC), dtype=tl.float32)
    best = zero - 1.0  # scores are >= 0: pattern 0 always replaces it
    best_idx = tl.zeros((GR, GC), dtype=tl.int32)
    p = 0  # pattern index, a compile-time count
    for k0 in tl.static_range(6):
        m0 = (ROWS >> (4 * k0)) & 15
        s0 = _add_row(zero, a0, a1, a2, a3, m0)
        for k1 in tl.static_range(6):
            m1 = (ROWS >> (4 * k1)) & 15
            s1 = _add_row(s0, b0, b1, b2, b3, m1)
            for k2 in tl.static_range(6):
                m2 = (ROWS >> (4 * k2)) & 15
                # Rows 0-2 extend to a pattern iff every column holds 1 or 2 kept entries; row 3 keeps those with 1.
                if (m0 | m1 | m2) == 15:
                    if (m0 & m1 & m2) == 0:
                        m3 = ((m0 & m1) | (m0 & m2) | (m1 & m2)) ^ 15
                        s = _add_row(_add_row(s1, c0, c1, c2, c3, m2), d0, d1, d2, d3, m3)
                        win = s > best
                        best = tl.where(win, s, best)
                        best_idx = tl.where(win, p, best_idx)
                        p += 1
    bc = pid_c * GC + tl.arange(0, GC)
    out = (br[:, None] < R // 4) & (bc[None, :] < C // 4)
    tl.store(idx_ptr + br[:, None] * (C // 4) + bc[None, :], best_idx.to(tl.uint8), mask=out)


# (GR, GC, num_warps): two blocks per thread (56 registers, Triton 3.6, sm_90), each thread's 16 B row loads issued
# up front. Measured on an H100 (results/raw/h100-search.json, `python -m kernels.semi24_triton`): 64 µs at
# 36864x768 and 70 µs at 9216x3072, against 68 / 75 µs for one block per thread (4, 32, 4) and 1.75 ms for the
# previous score-tile kernel.
SEARCH_TILE = (8, 32, 4)


def transposable_search(w: torch.Tensor, patterns: torch.Tensor | None = None,
                        tile: tuple[int, int, int] = SEARCH_TILE) -> torch.Tensor:
    """Pattern index per 4x4 block of w (R, C): uint8 (R/4, C/4), equal to kernels.semi24.transposable_search_ref.

    patterns is ignored: the kernel enumerates the 90 patterns at compile time, in the table's order (checked by
    tests/kernels/test_semi24_search.py); kernels/semi24.py still passes the table.
    """
    R, C = w.shape
    w = w if w.stride(1) == 1 else w.contiguous()
    idx = torch.empty(R // 4, C // 4, dtype=torch.uint8, device=w.device)
    GR, GC, num_warps = tile
    grid = (triton.cdiv(R // 4, GR), triton.cdiv(C // 4, GC))
    _search_kernel[grid](w, idx, R, C, w.stride(0), GR=GR, GC=GC, num_warps=num_warps)
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


def _bench_search(out: str | None) -> None:
    # The two searches of a GPT-2 124M 2:4 step (12 stacked c_fc weights, 12 stacked c_proj), queued back to back
    # as in training; each tensor (57 MB) outgrows the 50 MB L2, so every call reads its weights from HBM.
    import functools
    import json

    from kernels.benchutil import time_ms

    res = []
    for shape in [(12 * 3072, 768), (12 * 768, 3072)]:
        w = torch.randn(shape, device="cuda")
        want = transposable_search(w)
        for tile in [SEARCH_TILE, (4, 32, 4), (8, 32, 8), (4, 64, 8)]:
            same = torch.equal(transposable_search(w, tile=tile), want)
            ms = time_ms(functools.partial(transposable_search, w, tile=tile), warmup=10, reps=100, sync_each=False)
            row = {"shape": list(shape), "tile": list(tile), "us": 1e3 * ms, "same": same,
                   "GB/s": (w.numel() * w.element_size() + want.numel()) / (ms * 1e6)}
            print(json.dumps(row))
            res.append(row)
    if out:
        with open(out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "search": res}, f, indent=1)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="time transposable_search at GPT-2 124M's stacked 2:4 weight shapes")
    ap.add_argument("--out", help="also write the rows to this JSON file")
    _bench_search(ap.parse_args().out)
