"""GPT-2 MLP that computes only the kept intermediate channels, forward and backward (SAT, sat.md §1, §6).

Reference (`mlp_ref`, the spec): the masked dense MLP  y = (gelu(x W1ᵀ + b1) ⊙ m) W2ᵀ + b2,  m = 1 on kept channels.

Fast path (`sliced_mlp`): one autograd.Function of explicit GEMMs on the kept rows of c_fc and the kept columns of
c_proj. Never autograd through `W[idx]` (0.98x measured, sat.md §6): the gather is a plain copy, and backward expands
the compact gradients into full-size ones (a gather through the kept set's inverse, `positions`), so omitted rows
get exactly zero and every parameter has a full `.grad` (DDP's reducer and the fused AdamW see the dense layout).

Why gather on every call instead of once per optimizer step: the gather reads k rows and casts them to the compute
dtype in one pass, which replaces the full-matrix cast that autocast does for the dense Linear anyway, so it is
cheaper than what the dense layer pays. Caching compact copies across micro-batches would need extra module state
that DDP would broadcast (as buffers) or that torch.compile would guard on (as attributes); the per-call gather
keeps the Function a pure function of (x, params, idx) and compiles to one fused gather+cast kernel.

Backward's own passes, beyond its four GEMMs: dX and the weight gradients come out of their GEMMs in fp32 (no cast
pass), and GELU's backward and c_fc's bias gradient are one Triton kernel (`gelu_backward_colsum_triton`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import define_op, select, triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the plain-PyTorch backward runs
    triton = tl = None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: autocast's (bf16 in training on GPU) when it is on, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def gather(w: torch.Tensor | None, idx: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Contiguous copy of w's slices idx along dim, already in the compute dtype (no autograd)."""
    return None if w is None else w.detach().index_select(dim, idx).to(dtype)


def scatter(like: tuple, idx: torch.Tensor, dim: int, compact: torch.Tensor) -> torch.Tensor:
    """A zero tensor of the parameter's (shape, dtype) `like`, with `compact` written at idx along dim.

    Omitted slices are exact zeros; one zero-fill plus one scatter per parameter, a few µs at GPT-2 sizes.
    """
    shape, dtype = like
    return torch.zeros(shape, dtype=dtype, device=compact.device).index_copy_(dim, idx, compact.to(dtype))


def positions(idx: torch.Tensor, size: int) -> torch.Tensor:
    """The inverse of kept sets idx (..., k) over `size` channels: pos (..., size) with pos[..., idx[..., i]] = i,
    and -1 at omitted channels."""
    rank = torch.arange(idx.shape[-1], device=idx.device).expand(idx.shape)
    return torch.full((*idx.shape[:-1], size), -1, dtype=torch.long, device=idx.device).scatter_(-1, idx, rank)


def expand(compact: torch.Tensor, pos: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """scatter() as a gather: slice j along dim is compact's slice pos[j], or zeros where pos[j] = -1 (pos from
    positions(), computed once per kept set), in dtype.

    Every output element is written once and nothing is zero-filled first, so inductor makes it one kernel per
    parameter, or folds it into a reduction that follows; the scatter is a fill kernel and a scatter kernel.
    """
    keep = (pos >= 0).view(*(-1 if i == dim else 1 for i in range(compact.dim())))
    return torch.where(keep, compact.index_select(dim, pos.clamp_min(0)), 0).to(dtype)


def meta(p: torch.Tensor | None) -> tuple | None:
    """(shape, dtype) of a parameter: backward needs only these to build its full-size gradient."""
    return None if p is None else (p.shape, p.dtype)


def _mm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b in dtype. A half-precision GEMM on CUDA writes fp32 straight from its accumulator (aten::mm.dtype):
    measured on an H200, the bf16 dX plus its cast to the fp32 residual stream was a separate ~18 µs pass at
    16k x 768 (results/raw/h200-profile-sat-mlp.txt); the dense Linear pays it too, the sliced path need not."""
    if dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda:
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


def gelu_backward_colsum_ref(da: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, part): tanh-GELU's backward dh = gelu'(h) * da, and partial column sums of dh in fp32 whose sum over
    rows, part.sum(0), is c_fc's bias gradient (here one row: the whole sum)."""
    dh = torch.ops.aten.gelu_backward(da, h, approximate="tanh")
    return dh, dh.sum(0, dtype=torch.float32)[None]


if triton is not None:

    @triton.jit
    def _gelu_bwd_colsum_kernel(da_ptr, h_ptr, dh_ptr, part_ptr, n, k,
                                ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Program (pid_n, pid_m): columns [pid_n*BLOCK_N, +BLOCK_N) of rows [pid_m*ROWS, +ROWS); writes its rows' dh
        # and one row of column partial sums (reduced by the caller: a fixed order, so deterministic; no atomics).
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(0, ROWS, BLOCK_M):
            rows = pid_m * ROWS + r0 + tl.arange(0, BLOCK_M)
            inb = (rows[:, None] < n) & (cols[None, :] < k)
            offs = rows[:, None].to(tl.int64) * k + cols[None, :]
            da = tl.load(da_ptr + offs, mask=inb, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + offs, mask=inb, other=0.0).to(tl.float32)
            # aten's tanh-GELU backward; tanh(z) = 2 sigmoid(2z) - 1 (0.7978845608 = sqrt(2/pi), 0.044715 = kappa)
            t = 2.0 * tl.sigmoid(1.5957691216 * (h + 0.044715 * h * h * h)) - 1.0
            grad = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608 * (1.0 + 0.134145 * h * h)
            dh = (da * grad).to(dh_ptr.dtype.element_ty)
            tl.store(dh_ptr + offs, dh, mask=inb)
            acc += tl.sum(dh.to(tl.float32), axis=0)
        tl.store(part_ptr + pid_m * k + cols, acc, mask=cols < k)


# (ROWS, BLOCK_M, BLOCK_N, num_warps): one 128 x 64 tile per program, picked from 12 tiles on an H200
# (results/raw/h200-sat-colsum-sweep.json). In the compiled sliced MLP (d=768, keep 25%) it made the whole call 3-6%
# faster than aten's two passes; the first try, (256, 32, 128, 4), whose row loop took 40 µs against aten's 21 + 9,
# made it 1-4% slower (results/raw/h200-sat-mlp-s18-ab.json).
COLSUM_TILE = (128, 128, 64, 4)


def gelu_backward_colsum_triton(da: torch.Tensor, h: torch.Tensor, tile: tuple[int, int, int, int] = COLSUM_TILE
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """gelu_backward_colsum_ref in one pass over (da, h): the bias gradient is summed from the dh tiles in
    registers instead of a second read of dh (a ~9 µs reduction at 16k x 768 on an H200). part has one row per
    ROWS rows of da; the caller's reduction of it fuses with the gradient's expand() into one small kernel."""
    da, h = da.contiguous(), h.contiguous()
    n, k = da.shape
    rows, block_m, block_n, warps = tile
    dh = torch.empty_like(da)
    part = da.new_empty((triton.cdiv(n, rows), k), dtype=torch.float32)
    _gelu_bwd_colsum_kernel[(triton.cdiv(k, block_n), part.shape[0])](
        da, h, dh, part, n, k, ROWS=rows, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps
    )
    return dh, part


def _colsum_fast(da: torch.Tensor) -> bool:
    return da.is_cuda and da.numel() > 0 and triton_available()  # (an empty grid is not a Triton launch)


def _gelu_colsum(da: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (gelu_backward_colsum_triton if _colsum_fast(da) else gelu_backward_colsum_ref)(da, h)


def _gelu_colsum_fake(da: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = triton.cdiv(da.shape[0], COLSUM_TILE[0]) if _colsum_fast(da) else 1
    return torch.empty_like(da), da.new_empty((rows, da.shape[1]), dtype=torch.float32)


# A custom op, so that inductor runs the kernel whole instead of tracing into the Triton launch.
_gelu_colsum_op = define_op("gelu_bwd_colsum(Tensor da, Tensor h) -> (Tensor, Tensor)", _gelu_colsum, _gelu_colsum_fake)


def _addmm(b: torch.Tensor | None, a: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    # addmm puts the bias in the cuBLAS epilogue instead of a separate elementwise pass.
    return a @ w_t if b is None else torch.addmm(b, a, w_t)


class _SlicedMLP(torch.autograd.Function):
    """y = gelu(x W1[idx]ᵀ + b1[idx]) W2[:, idx]ᵀ + b2 with explicit forward and backward GEMMs."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, idx, pos, dtype):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (n, d)
        w1k, b1k = gather(w1, idx, 0, dtype), gather(b1, idx, 0, dtype)  # (k, d), (k,)
        w2k, b2c = gather(w2, idx, 1, dtype), None if b2 is None else b2.detach().to(dtype)  # (d, k), (d,)
        h = _addmm(b1k, x2, w1k.t())  # (n, k) pre-activation
        a = F.gelu(h, approximate="tanh")
        y = _addmm(b2c, a, w2k.t())  # (n, d)
        ctx.save_for_backward(x2, h, a, w1k, w2k, pos)
        ctx.x_dtype = x.dtype
        ctx.params = (meta(w1), meta(b1), meta(w2), meta(b2))
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, h, a, w1k, w2k, pos = ctx.saved_tensors
        w1, b1, w2, b2 = ctx.params
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)  # (n, d)
        da = dy2 @ w2k  # (n, k)
        if b1 is not None and need[2]:  # gelu'(h) * da and its column sums, in one pass
            dh, part = _gelu_colsum_op(da, h)
            db1 = expand(part, pos, 1, b1[1]).sum(0)
        else:
            dh, db1 = torch.ops.aten.gelu_backward(da, h, approximate="tanh"), None
        dx = _mm_to(dh, w1k, ctx.x_dtype).view(*dy.shape[:-1], w1k.shape[1]) if need[0] else None
        dw1 = expand(_mm_to(dh.t(), x2, w1[1]), pos, 0, w1[1]) if need[1] else None
        dw2 = expand(_mm_to(dy2.t(), a, w2[1]), pos, 1, w2[1]) if need[3] else None
        db2 = dy2.sum(0, dtype=b2[1]) if b2 is not None and need[4] else None
        return dx, dw1, db1, dw2, db2, None, None, None


def sliced_mlp(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
    idx: torch.Tensor, pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """GPT-2 MLP on the kept channels idx (sorted int64, on x's device). w1 (4d, d), w2 (d, 4d); x (..., d).
    pos = positions(idx, 4d), computed here if not given (SlicedMLP keeps it with its kept set)."""
    pos = positions(idx, w1.shape[0]) if pos is None else pos
    return _SlicedMLP.apply(x, w1, b1, w2, b2, idx, pos, compute_dtype(x))


def mlp_ref(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
    idx: torch.Tensor, pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """The masked dense MLP: every channel is computed, the omitted ones are zeroed before c_proj (pos unused)."""
    mask = torch.zeros(w1.shape[0], device=x.device, dtype=x.dtype).index_fill_(0, idx, 1.0)
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh") * mask, w2, b2)


IMPLS = {"sliced": sliced_mlp, "ref": mlp_ref}


class SlicedMLP(nn.Module):
    """Drop-in for model.gpt.MLP holding the same submodules (so state_dict keys are unchanged).

    `kept` (sorted channel indices) selects the sliced path; None, or eval mode, runs the original dense code
    exactly (SAT evaluates dense and its r = 0 rung must be bit-identical to dense training). `hook`, if set, is
    called as hook(module, x) on training forwards before anything else: SAT's importance scoring lives there.
    """

    def __init__(self, mlp: nn.Module, backend: str = "auto"):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj, self.dropout = mlp.c_fc, mlp.gelu, mlp.c_proj, mlp.dropout
        self.impl = IMPLS[select(IMPLS, backend, {})]
        self.kept: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # positions(kept): where backward's gradients gather from
        self.hook = None

    def set_kept(self, idx: torch.Tensor | None, pos: torch.Tensor | None = None) -> None:
        """Set the kept channels (and their positions(), computed here if not given: SAT passes rows of its
        per-layer-stack buffer, which it rewrites in place); same-size updates are copied in place so
        torch.compile sees stable tensors."""
        self.kept = _assign(self.kept, idx, self.c_fc.weight.device)
        if idx is not None and pos is None:
            pos = positions(self.kept, self.c_fc.out_features)
        self.pos = _assign(self.pos, pos, self.c_fc.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hook is not None and self.training:
            self.hook(self, x)
        if self.kept is None or not self.training:
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))
        fc, proj = self.c_fc, self.c_proj
        return self.dropout(self.impl(x, fc.weight, fc.bias, proj.weight, proj.bias, self.kept, self.pos))


def _assign(old: torch.Tensor | None, new: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Install index tensor `new` over `old`: in place if the shape is unchanged (torch.compile keeps its graph),
    nothing at all if `new` is `old`'s memory (SAT binds rows of its per-layer-stack buffers once per rung), else
    `new` itself when it is already a contiguous int64 tensor on the device (a view: no copy)."""
    if new is None:
        return None
    if old is not None and old.shape == new.shape:
        return old if new.data_ptr() == old.data_ptr() else old.copy_(new, non_blocking=True)
    return new.to(device=device, dtype=torch.long).contiguous()
