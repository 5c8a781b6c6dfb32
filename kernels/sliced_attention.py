"""GPT-2 causal self-attention that computes only the kept heads (SAT, sat.md §1, §6.7).

Reference (`attention_ref`, the spec): dense attention with the omitted heads' outputs zeroed before c_proj.

Fast path (`sliced_attention`): gather the q, k and v rows of the kept heads from c_attn (rows [h·hs, (h+1)·hs) of
each of the three d-row blocks, and their biases), run causal SDPA on the kept heads only, and c_proj on the kept
columns. The two projections are autograd.Functions with explicit GEMMs that write full-size parameter gradients
(zeros for the omitted slices, see kernels/sliced_mlp.py for why); SDPA keeps its own flash backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kernels import select
from kernels.sliced_mlp import _addmm, _assign, compute_dtype, gather, meta, scatter
from model.gpt import causal_attention


class _RowSlicedLinear(torch.autograd.Function):
    """y = x W[rows]ᵀ + b[rows]: a Linear that produces only the output features `rows`."""

    @staticmethod
    def forward(ctx, x, w, b, rows, dtype):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (n, in)
        wk, bk = gather(w, rows, 0, dtype), gather(b, rows, 0, dtype)  # (k, in), (k,)
        y = _addmm(bk, x2, wk.t())  # (n, k)
        ctx.save_for_backward(x2, wk, rows)
        ctx.x_dtype, ctx.params = x.dtype, (meta(w), meta(b))
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, wk, rows = ctx.saved_tensors
        w, b = ctx.params
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)  # (n, k)
        dx = (dy2 @ wk).view(*dy.shape[:-1], wk.shape[1]).to(ctx.x_dtype) if need[0] else None
        dw = scatter(w, rows, 0, dy2.t() @ x2) if need[1] else None
        db = scatter(b, rows, 0, dy2.sum(0, dtype=b[1])) if b is not None and need[2] else None
        return dx, dw, db, None, None


class _ColSlicedLinear(torch.autograd.Function):
    """y = x W[:, cols]ᵀ + b: a Linear that reads only the input features `cols` (x holds just those)."""

    @staticmethod
    def forward(ctx, x, w, b, cols, dtype):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (n, k)
        wk = gather(w, cols, 1, dtype)  # (out, k)
        y = _addmm(None if b is None else b.detach().to(dtype), x2, wk.t())  # (n, out)
        ctx.save_for_backward(x2, wk, cols)
        ctx.x_dtype, ctx.params = x.dtype, (meta(w), meta(b))
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, wk, cols = ctx.saved_tensors
        w, b = ctx.params
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)  # (n, out)
        dx = (dy2 @ wk).view(*dy.shape[:-1], wk.shape[1]).to(ctx.x_dtype) if need[0] else None
        dw = scatter(w, cols, 1, dy2.t() @ x2) if need[1] else None
        db = dy2.sum(0, dtype=b[1]) if b is not None and need[2] else None
        return dx, dw, db, None, None


def head_slices(heads: torch.Tensor, n_head: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_attn rows, c_proj columns) of the kept heads: q, k, v row blocks in that order, each head's hs rows.

    heads (..., kh) -> rows (..., 3·kh·hs), cols (..., kh·hs), on heads' device (SAT computes them for all layers
    at once on the GPU, with no host round trip)."""
    d = n_head * head_dim
    cols = (heads[..., None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten(-2)  # (..., kh·hs)
    rows = torch.cat([cols, cols + d, cols + 2 * d], dim=-1)  # (..., 3·kh·hs)
    return rows, cols


def sliced_attention(
    x: torch.Tensor, w_attn: torch.Tensor, b_attn: torch.Tensor | None, w_proj: torch.Tensor,
    b_proj: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor, head_dim: int,
    attend=causal_attention, dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal attention over the kept heads given by head_slices(...). x (B, T, d) -> (B, T, d)."""
    B, T, _ = x.shape
    kh = cols.shape[0] // head_dim
    dtype = compute_dtype(x)
    qkv = _RowSlicedLinear.apply(x, w_attn, b_attn, rows, dtype)  # (B, T, 3·kh·hs)
    q, k, v = (t.view(B, T, kh, head_dim).transpose(1, 2) for t in qkv.split(kh * head_dim, dim=2))  # (B, kh, T, hs)
    y = attend(q, k, v, dropout_p=dropout_p).transpose(1, 2).reshape(B, T, kh * head_dim)  # (B, T, kh·hs)
    return _ColSlicedLinear.apply(y, w_proj, b_proj, cols, dtype)


def attention_ref(
    x: torch.Tensor, w_attn: torch.Tensor, b_attn: torch.Tensor | None, w_proj: torch.Tensor,
    b_proj: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor, head_dim: int,
    attend=causal_attention, dropout_p: float = 0.0,
) -> torch.Tensor:
    """Dense attention of all heads; the omitted heads' outputs are zeroed before c_proj."""
    B, T, C = x.shape
    nh = C // head_dim
    q, k, v = (t.view(B, T, nh, head_dim).transpose(1, 2) for t in (x @ w_attn.t() + (0 if b_attn is None else b_attn))
               .split(C, dim=2))
    y = attend(q, k, v, dropout_p=dropout_p).transpose(1, 2).reshape(B, T, C)  # (B, T, d)
    mask = torch.zeros(C, device=x.device, dtype=y.dtype).index_fill_(0, cols, 1.0)
    return torch.nn.functional.linear(y * mask, w_proj, b_proj)


IMPLS = {"sliced": sliced_attention, "ref": attention_ref}


class SlicedAttention(nn.Module):
    """Drop-in for model.gpt.CausalSelfAttention holding the same submodules (state_dict keys unchanged).

    `kept` (sorted head indices) selects the sliced path; None, or eval mode, runs the original dense code
    exactly. `hook(module, x)` runs first on training forwards (SAT's scoring). `attend` is the block's kernel.
    """

    def __init__(self, attn: nn.Module, backend: str = "auto"):
        super().__init__()
        self.c_attn, self.c_proj, self.resid_dropout = attn.c_attn, attn.c_proj, attn.resid_dropout
        self.n_head, self.n_embd, self.dropout, self.attend = attn.n_head, attn.n_embd, attn.dropout, attn.attend
        self.head_dim = self.n_embd // self.n_head
        self.impl = IMPLS[select(IMPLS, backend, {})]
        self.kept: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.cols: torch.Tensor | None = None
        self.hook = None

    def set_kept(self, heads: torch.Tensor | None, rows: torch.Tensor | None = None,
                 cols: torch.Tensor | None = None) -> None:
        """Set the kept heads and their c_attn rows / c_proj columns (head_slices(heads) unless given); copied in
        place when the count is unchanged, bound without a copy when they already live on the device."""
        dev = self.c_attn.weight.device
        self.kept = _assign(self.kept, heads, dev)
        if heads is not None and rows is None:
            rows, cols = head_slices(self.kept, self.n_head, self.head_dim)
        self.rows, self.cols = _assign(self.rows, rows, dev), _assign(self.cols, cols, dev)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hook is not None and self.training:
            self.hook(self, x)
        dropout_p = self.dropout if self.training else 0.0
        if self.kept is None or not self.training:
            B, T, C = x.size()
            q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
            q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            y = self.attend(q, k, v, dropout_p=dropout_p)  # (B, nh, T, hs)
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            return self.resid_dropout(self.c_proj(y))
        a, p = self.c_attn, self.c_proj
        y = self.impl(x, a.weight, a.bias, p.weight, p.bias, self.rows, self.cols, self.head_dim, self.attend,
                      dropout_p)
        return self.resid_dropout(y)
