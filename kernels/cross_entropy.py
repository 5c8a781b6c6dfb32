"""Cross-entropy of the lm_head's logits: the mean token loss, and its gradient, in two streaming Triton kernels.

Why: at GPT-2's vocabulary the logits are the largest tensor of a step (16k tokens x 50304 = 1.6 GB in bf16), and
inductor's fused log-softmax read them at ~1.5 TB/s on an H200 (1.12 ms of a 31 ms dense step; its backward 1.02
ms, results/raw/h200-profile-s33-detach.txt). Here the forward reads each row once (an online max and sum over
chunks of the vocabulary) and keeps only the row's log-sum-exp; the backward reads the row again and writes
softmax - onehot, scaled by the upstream gradient over the number of counted targets. The same math as
F.cross_entropy(logits.float(), targets, ignore_index) with mean reduction, which is the reference and the CPU path.
Targets outside [0, V) other than ignore_index are not checked on the Triton path (a host sync per call would be):
such a row counts its log-sum-exp as its loss. The trainer uses it with train.loss_kernel=triton or auto (every
method: it replaces GPT.loss_fn). Status: checked against the reference in Triton's CPU interpreter and compiled
for sm_90a on the CPU (tools/kernel_resources.py); not yet run or timed on a GPU, hence not the default. The block
and warps below are a first guess from the compiled kernels' resources, for `--sweep` to replace.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels import define_op, jit, select, triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path still works
    triton = tl = None

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# What a kernel reads of the module must be a constexpr (the interpreter would take a plain float; a GPU build not).
_LOG2E, _LN2 = (LOG2E, LN2) if tl is None else (tl.constexpr(LOG2E), tl.constexpr(LN2))
BACKENDS = ("auto", "triton", "ref")
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests): CPU tensors allowed
# Elements of a row per loop trip and warps per program, per kernel, until `python -m kernels.bench_cross_entropy
# --sweep` (16k x 50304 bf16) picks them on a GPU: 8192 x 8 warps keeps 5 programs (80 KB of loads) on an SM.
FWD_BLOCK, FWD_WARPS = 8192, 8
BWD_BLOCK, BWD_WARPS = 8192, 8


def cross_entropy_ref(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """The mean loss over the targets that are not ignore_index, in fp32: logits (N, V), targets (N,)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


@jit
def _ce_fwd_kernel(X, Tgt, Loss, LSE, stride_x, V, ignore_index, BLOCK: tl.constexpr):
    """One row: LSE = log2-sum-exp2 of x * log2(e), Loss = ln(sum exp(x)) - x[target] (0 where ignored)."""
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    cols = tl.arange(0, BLOCK)
    # A finite floor: a chunk past V (masked to -inf) must not make -inf - -inf in the rescale.
    m = tl.full([], -1.0e30, tl.float32)
    s = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK):
        x = tl.load(X + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32) * _LOG2E
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new), 0)
        m = m_new
    lse = m + tl.log2(s)
    t = tl.load(Tgt + row)
    counted = t != ignore_index
    hit = counted & (t >= 0) & (t < V)
    x_t = tl.load(X + tl.where(hit, t, 0)).to(tl.float32)
    tl.store(LSE + row, lse)
    tl.store(Loss + row, tl.where(counted, lse * _LN2 - tl.where(hit, x_t, 0.0), 0.0))


@jit
def _ce_bwd_kernel(X, Tgt, LSE, Scale, DX, stride_x, stride_dx, V, ignore_index, BLOCK: tl.constexpr):
    """One row: dX = (softmax(x) - onehot(target)) * Scale, 0 where the target is ignored."""
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    DX += row * stride_dx
    t = tl.load(Tgt + row)
    scale = tl.where(t != ignore_index, tl.load(Scale), 0.0)
    lse = tl.load(LSE + row)
    cols = tl.arange(0, BLOCK)
    for v0 in range(0, V, BLOCK):
        c = v0 + cols
        ok = c < V
        x = tl.load(X + c, mask=ok, other=0.0).to(tl.float32)
        g = (tl.exp2(x * _LOG2E - lse) - tl.where(c == t, 1.0, 0.0)) * scale
        tl.store(DX + c, g.to(DX.dtype.element_ty), mask=ok)


def _fwd_impl(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    N, V = logits.shape
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    if N:
        _ce_fwd_kernel[(N,)](logits, targets, loss, lse, logits.stride(0), V, ignore_index, BLOCK=FWD_BLOCK,
                             num_warps=FWD_WARPS)  # fmt: skip
    return loss, lse


def _bwd_impl(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
              ignore_index: int) -> torch.Tensor:  # fmt: skip
    N, V = logits.shape
    dx = torch.empty_like(logits)
    if N:
        _ce_bwd_kernel[(N,)](logits, targets, lse, scale, dx, logits.stride(0), dx.stride(0), V, ignore_index,
                             BLOCK=BWD_BLOCK, num_warps=BWD_WARPS)  # fmt: skip
    return dx


def _fwd_fake(logits, targets, ignore_index):
    N = logits.size(0)
    return logits.new_empty(N, dtype=torch.float32), logits.new_empty(N, dtype=torch.float32)


def _bwd_fake(logits, targets, lse, scale, ignore_index):
    return torch.empty_like(logits)


# torch.library ops, tied together by an autograd.Function that dynamo traces (as kernels/hsa_attention.py's).
_ce_fwd_op = define_op("ce_fwd(Tensor logits, Tensor targets, int ignore_index) -> (Tensor, Tensor)", _fwd_impl,
                       _fwd_fake)  # fmt: skip
_ce_bwd_op = define_op(
    "ce_bwd(Tensor logits, Tensor targets, Tensor lse, Tensor scale, int ignore_index) -> Tensor", _bwd_impl, _bwd_fake
)


class _CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        loss, lse = _ce_fwd_op(logits, targets, ignore_index)
        counted = (targets != ignore_index).sum().float()  # no host sync: the mean divides on the device
        ctx.save_for_backward(logits, targets, lse, counted)
        ctx.ignore_index = ignore_index
        return loss.sum() / counted

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse, counted = ctx.saved_tensors
        return _ce_bwd_op(logits, targets, lse, (grad / counted).float(), ctx.ignore_index), None, None


def triton_unsupported(logits: torch.Tensor, targets: torch.Tensor) -> str | None:
    """Why the Triton path cannot take this call, or None."""
    if not logits.is_cuda and not _INTERPRETED:
        return "logits are not on a CUDA device"
    if triton is None or (logits.is_cuda and not triton_available()):
        return "Triton is not available"
    if logits.dim() != 2 or targets.dim() != 1 or targets.size(0) != logits.size(0):
        return f"needs logits (N, V) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
    if not logits.is_floating_point() or logits.stride(1) != 1:
        return "needs floating-point logits with unit stride along the vocabulary"
    return None


def cross_entropy_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    return _CrossEntropyFn.apply(logits, targets, ignore_index)


IMPLS: dict[str, Callable[..., torch.Tensor]] = {"triton": cross_entropy_triton, "ref": cross_entropy_ref}


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                  backend: str = "auto") -> torch.Tensor:  # fmt: skip
    """Mean cross-entropy over the counted targets through the fastest implementation that can run this call
    (backend 'auto'), or the one named."""
    if backend == "ref":  # the trainer's default: nothing else to look at, in eager calls or while dynamo traces
        return cross_entropy_ref(logits, targets, ignore_index)
    why_not = triton_unsupported(logits, targets)
    if backend == "triton" and why_not is not None:
        raise RuntimeError(f"loss kernel 'triton' cannot run this call: {why_not}; use 'ref' or 'auto'")
    name = select(IMPLS, backend, {"triton": lambda: why_not is None})
    return IMPLS[name](logits, targets, ignore_index)


class CrossEntropy:
    """GPT.loss_fn with a chosen backend: (logits (N, V), targets (N,)) -> mean loss over targets != -1."""

    def __init__(self, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"loss kernel must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, targets, -1, self.backend)

    def __repr__(self) -> str:
        return f"CrossEntropy(backend={self.backend!r})"
