"""Per-tensor e4m3 quantization for the fp8 2:4 linear (`2of4.fp8`, spec 2of4.md §10 lever 7).

t ≈ q·scale with scale = amax|t| / 448 (e4m3's largest value), computed from the tensor itself each call ("current
scaling"): no amax history to checkpoint, and a resumed run quantizes exactly as an uninterrupted one. The GEMMs
need their operands k-contiguous, so a tensor is written in one layout or both (`layout` 'row', 'col', 'both').

`quant_ref` is the reference and the CPU path. On CUDA, `quant_fused` reads t twice: a Triton amax (a block max per
program, folded by an atomic max) and a Triton cast writing q and/or qᵀ from one read. The cast multiplies by
1/scale, so it may land one e4m3 step from the reference's division (tests/kernels/test_fp8.py).
"""

from __future__ import annotations

import torch

from kernels import triton_available

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0

try:  # defined wherever triton imports (also under its CPU interpreter, for the tests); run only on CUDA
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _cast_kernel(t_ptr, scale_ptr, q_ptr, qt_ptr, M, K, BM: tl.constexpr, BK: tl.constexpr,
                     ROW: tl.constexpr, COL: tl.constexpr):
        # One (BM, BK) tile read once, written as e4m3 row-major (ROW) and/or transposed (COL).
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rk = tl.program_id(1) * BK + tl.arange(0, BK)
        inb = (rm[:, None] < M) & (rk[None, :] < K)
        inv = 1.0 / tl.load(scale_ptr)
        q = (tl.load(t_ptr + rm[:, None] * K + rk[None, :], mask=inb, other=0.0).to(tl.float32) * inv).to(
            tl.float8e4nv)
        if ROW:
            tl.store(q_ptr + rm[:, None] * K + rk[None, :], q, mask=inb)
        if COL:
            tl.store(qt_ptr + rk[:, None] * M + rm[None, :], tl.trans(q), mask=tl.trans(inb))

    @triton.jit
    def _scale_bias_kernel(y_ptr, s_ptr, b_ptr, n, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        # y = y·s (+ b per column), in place, fp32 math: one read and one write of y.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        v = tl.load(y_ptr + offs, mask=inb, other=0.0).to(tl.float32) * tl.load(s_ptr)
        if HAS_BIAS:
            v += tl.load(b_ptr + offs % N, mask=inb, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=inb)

    @triton.jit
    def _amax_kernel(t_ptr, amax_ptr, n, BLOCK: tl.constexpr):
        # |t| >= 0, so its fp32 bits order as int32: an integer atomic max does, no float atomic needed.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.abs(tl.load(t_ptr + offs, mask=offs < n, other=0.0).to(tl.float32))
        tl.atomic_max(amax_ptr, tl.max(v, 0).to(tl.int32, bitcast=True))


LAYOUTS = ("row", "col", "both")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"fp8 layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def amax_scale(t: torch.Tensor) -> torch.Tensor:
    """amax|t| / 448 as a 0-dim fp32 tensor (floored at 1e-12, so an all-zero tensor quantizes to zeros)."""
    return (t.abs().amax().float() / E4M3_MAX).clamp_min(1e-12)


def quant_ref(t: torch.Tensor, layout: str = "both") -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(q, qᵀ contiguous, scale), the layout not asked for None, with t ≈ q·scale."""
    _check_layout(layout)
    scale = amax_scale(t)
    q = (t.float() / scale).to(E4M3)
    return (q if layout != "col" else None), (q.t().contiguous() if layout != "row" else None), scale


def quant_triton(t: torch.Tensor, scale: torch.Tensor | None = None, layout: str = "both", bm: int = 64,
                 bk: int = 128) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """quant_ref with the cast and the transpose in one pass; the scale is aten's amax unless given."""
    _check_layout(layout)
    scale = amax_scale(t) if scale is None else scale
    M, K = t.shape
    row, col = layout != "col", layout != "row"
    q = torch.empty(M, K, device=t.device, dtype=E4M3) if row else None
    qt = torch.empty(K, M, device=t.device, dtype=E4M3) if col else None
    _cast_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](  # a layout not written gets the other's pointer
        t.contiguous(), scale, q if row else qt, qt if col else q, M, K, BM=bm, BK=bk, ROW=row, COL=col)
    return q, qt, scale


def scale_triton(t: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """amax_scale in one read of t."""
    amax = torch.zeros(1, device=t.device, dtype=torch.int32)
    _amax_kernel[(triton.cdiv(t.numel(), block),)](t.contiguous(), amax, t.numel(), BLOCK=block)
    return (amax.view(torch.float32)[0] / E4M3_MAX).clamp_min(1e-12)


def quant_fused(t: torch.Tensor, layout: str = "both"):
    """quant_triton with the amax in Triton too: two reads of t in all, the floor of current scaling."""
    return quant_triton(t, scale_triton(t), layout)


def quant(t: torch.Tensor, layout: str = "both"):
    """(q, qᵀ, scale): Triton on CUDA, the reference elsewhere."""
    return quant_fused(t, layout) if t.is_cuda and triton_available() else quant_ref(t, layout)


def dequant(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def fake_quant(t: torch.Tensor) -> torch.Tensor:
    """t rounded through e4m3 with its per-tensor scale, back in t's dtype: what the fp8 GEMMs see of t."""
    q, _, scale = quant(t, "row")
    return dequant(q, scale, t.dtype)


def scale_bias_ref(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y·scale (+ bias, broadcast over rows) in place, computed in fp32: a 2-D contiguous y, a 0-dim scale."""
    out = y.float() * scale
    if bias is not None:
        out += bias.float()
    return y.copy_(out)


def scale_bias_(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                block: int = 4096) -> torch.Tensor:
    """scale_bias_ref in one Triton pass on CUDA. aten's `y.mul_(scale)` with a bf16 y and an fp32 scale runs at
    ~1 TB/s on an H200 (raw/h200-fp8-24.json: 0.25 ms for a 16k x 4096 output); the scale and the bias add share
    this pass, so on the forward the scale costs nothing over the bias add it replaces."""
    if not (y.is_cuda and triton is not None):
        return scale_bias_ref(y, scale, bias)
    if not y.is_contiguous() or y.dim() != 2:
        raise ValueError(f"scale_bias_ needs a contiguous 2-D tensor, got {tuple(y.shape)} {y.stride()}")
    n, N = y.numel(), y.shape[1]
    _scale_bias_kernel[(triton.cdiv(n, block),)](y, scale, bias if bias is not None else y, n, N,
                                                 HAS_BIAS=bias is not None, BLOCK=block)
    return y
