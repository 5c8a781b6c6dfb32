"""GPT-2 MLP that computes only the kept intermediate channels, forward and backward (SAT, sat.md §1, §6).

Reference (`mlp_ref`, the spec): the masked dense MLP  y = (gelu(x W1ᵀ + b1) ⊙ m) W2ᵀ + b2,  m = 1 on kept channels.

Fast path (`sliced_mlp`): one autograd.Function of explicit GEMMs on the kept rows of c_fc and the kept columns of
c_proj. Never autograd through `W[idx]` (0.98x measured, sat.md §6): the gather is a plain copy, and backward writes
the compact gradients into full-size ones with `index_copy_`, so omitted rows get exactly zero and every parameter
has a full `.grad` (DDP's reducer and the fused AdamW see the dense layout).

Why gather on every call instead of once per optimizer step: the gather reads k rows and casts them to the compute
dtype in one pass, which replaces the full-matrix cast that autocast does for the dense Linear anyway, so it is
cheaper than what the dense layer pays. Caching compact copies across micro-batches would need extra module state
that DDP would broadcast (as buffers) or that torch.compile would guard on (as attributes); the per-call gather
keeps the Function a pure function of (x, params, idx) and compiles to one fused gather+cast kernel.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import select


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


def meta(p: torch.Tensor | None) -> tuple | None:
    """(shape, dtype) of a parameter: backward needs only these to build its full-size gradient."""
    return None if p is None else (p.shape, p.dtype)


def _addmm(b: torch.Tensor | None, a: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    # addmm puts the bias in the cuBLAS epilogue instead of a separate elementwise pass.
    return a @ w_t if b is None else torch.addmm(b, a, w_t)


class _SlicedMLP(torch.autograd.Function):
    """y = gelu(x W1[idx]ᵀ + b1[idx]) W2[:, idx]ᵀ + b2 with explicit forward and backward GEMMs."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, idx, dtype):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (n, d)
        w1k, b1k = gather(w1, idx, 0, dtype), gather(b1, idx, 0, dtype)  # (k, d), (k,)
        w2k, b2c = gather(w2, idx, 1, dtype), None if b2 is None else b2.detach().to(dtype)  # (d, k), (d,)
        h = _addmm(b1k, x2, w1k.t())  # (n, k) pre-activation
        a = F.gelu(h, approximate="tanh")
        y = _addmm(b2c, a, w2k.t())  # (n, d)
        ctx.save_for_backward(x2, h, a, w1k, w2k, idx)
        ctx.x_dtype = x.dtype
        ctx.params = (meta(w1), meta(b1), meta(w2), meta(b2))
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, h, a, w1k, w2k, idx = ctx.saved_tensors
        w1, b1, w2, b2 = ctx.params
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)  # (n, d)
        da = dy2 @ w2k  # (n, k)
        dh = torch.ops.aten.gelu_backward(da, h, approximate="tanh")  # gelu'(h) * da in one pass
        dx = (dh @ w1k).view(*dy.shape[:-1], w1k.shape[1]).to(ctx.x_dtype) if need[0] else None
        dw1 = scatter(w1, idx, 0, dh.t() @ x2) if need[1] else None
        db1 = scatter(b1, idx, 0, dh.sum(0, dtype=b1[1])) if b1 is not None and need[2] else None
        dw2 = scatter(w2, idx, 1, dy2.t() @ a) if need[3] else None
        db2 = dy2.sum(0, dtype=b2[1]) if b2 is not None and need[4] else None
        return dx, dw1, db1, dw2, db2, None, None


def sliced_mlp(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
    idx: torch.Tensor,
) -> torch.Tensor:
    """GPT-2 MLP on the kept channels idx (sorted int64, on x's device). w1 (4d, d), w2 (d, 4d); x (..., d)."""
    return _SlicedMLP.apply(x, w1, b1, w2, b2, idx, compute_dtype(x))


def mlp_ref(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
    idx: torch.Tensor,
) -> torch.Tensor:
    """The masked dense MLP: every channel is computed, the omitted ones are zeroed before c_proj."""
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
        self.hook = None

    def set_kept(self, idx: torch.Tensor | None) -> None:
        """Set the kept channels; same-size updates are copied in place so torch.compile sees a stable tensor."""
        self.kept = _assign(self.kept, idx, self.c_fc.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hook is not None and self.training:
            self.hook(self, x)
        if self.kept is None or not self.training:
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))
        fc, proj = self.c_fc, self.c_proj
        return self.dropout(self.impl(x, fc.weight, fc.bias, proj.weight, proj.bias, self.kept))


def _assign(old: torch.Tensor | None, new: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Install index tensor `new` over `old`: in place if the shape is unchanged (torch.compile keeps its graph),
    nothing at all if `new` is `old`'s memory (SAT binds rows of its per-layer-stack buffers once per rung), else
    `new` itself when it is already a contiguous int64 tensor on the device (a view: no copy)."""
    if new is None:
        return None
    if old is not None and old.shape == new.shape:
        return old if new.data_ptr() == old.data_ptr() else old.copy_(new, non_blocking=True)
    return new.to(device=device, dtype=torch.long).contiguous()
