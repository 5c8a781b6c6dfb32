"""AdamW that updates only the nonzero blocks of block-sparse weights (block MST, issue 8).

In a block MST run at 90% sparsity most of every sparse weight is pruned: the weight and its gradient are exact
zeros there, and with `mst.zero_pruned_moments` so is exp_avg, so AdamW's step leaves those entries at zero and
only multiplies their exp_avg_sq by β2. The fused AdamW reads and writes 28 bytes a parameter over all of them
anyway (1.2 ms of GPT-2 124M's 22.6 ms block-MST step on the H200, by its profile). `BlockAdamW` is torch's AdamW for
every parameter except the weights of the block modules it is given, which it steps over their nonzero blocks
only (one launch per weight, `adamw_blocks`). What it skips it owes to exp_avg_sq alone, and pays exactly: at each
topology update, before the mask changes, the caller hands `decay_skipped_` the blocks that were off since the
last one, and their exp_avg_sq is multiplied by β2^n for the n optimizer steps taken since (`state["synced"]`
holds the step count it is current at). So a regrown block starts with the moments plain AdamW would have given it
(up to the rounding of one power against n products). The state has AdamW's keys (plus `synced`), so optimizer
checkpoints and MST's moment resets work unchanged. Measured in block MST's whole run on the H200 it gains next
to nothing (sparse-phase step 22.35 -> 22.24 ms, `results/raw/h200-mst-block-wholerun-s34-6000-blockadamw.json`),
so `mst.block_adamw` is off by default.

The update is torch's fused AdamW's, in fp32: p -= lr·wd·p; m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²;
p -= lr / (1-β1^t) · m / (sqrt(v) / sqrt(1-β2^t) + eps). The plain-PyTorch reference (`adamw_blocks_ref`, the
mask expanded to elements) is the spec and the CPU fallback.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn

from kernels import select, triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path still works
    triton = tl = None

CHUNK = 4096  # elements a program updates: a 64x64 block, a quarter of a 128x128 one


def adamw_blocks_ref(p, g, m, v, block_mask, block, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """AdamW on the entries of the nonzero blocks of `block_mask` (R, C), in place; `step` is the step count after
    this step (a 0-dim tensor)."""
    from kernels.block_sparse import expand_block_mask

    keep = expand_block_mask(block_mask.to(p.device), block)
    s = step.to(torch.float32)
    bc1, bc2_sqrt = 1 - beta1**s, torch.sqrt(1 - beta2**s)
    pf, gf = p.float(), g.float()
    new_m = beta1 * m.float() + (1 - beta1) * gf
    new_v = beta2 * v.float() + (1 - beta2) * gf * gf
    new_p = pf - lr * weight_decay * pf
    new_p = new_p - (lr / bc1) * new_m / (torch.sqrt(new_v) / bc2_sqrt + eps)
    for t, new in ((p, new_p), (m, new_m), (v, new_v)):
        t.copy_(torch.where(keep, new.to(t.dtype), t))


if triton is not None:

    @triton.jit
    def _adamw_blocks_kernel(P, G, M, V, ROWS, COLS, STEP, lr, beta1, beta2, log2_beta1, log2_beta2, eps,
                             weight_decay, stride, g_stride0, g_stride1, BLOCK: tl.constexpr,
                             ROWS_PER: tl.constexpr):  # fmt: skip
        """Program (i, j): rows j·ROWS_PER .. of the i-th nonzero block (ROWS[i], COLS[i]). P, M, V are row-major
        (`stride`); G has strides of its own (a dense GEMM's dW may come out column-major)."""
        i, j = tl.program_id(0), tl.program_id(1)
        r, c = tl.load(ROWS + i).to(tl.int64), tl.load(COLS + i).to(tl.int64)
        rows = r * BLOCK + j * ROWS_PER + tl.arange(0, ROWS_PER)
        cols = c * BLOCK + tl.arange(0, BLOCK)
        offs = rows[:, None] * stride + cols[None, :]
        g_offs = rows[:, None] * g_stride0 + cols[None, :] * g_stride1
        t = tl.load(STEP).to(tl.float32)
        bc1 = 1.0 - tl.exp2(t * log2_beta1)
        bc2_sqrt = tl.sqrt(1.0 - tl.exp2(t * log2_beta2))
        p = tl.load(P + offs).to(tl.float32)
        g = tl.load(G + g_offs).to(tl.float32)
        m = beta1 * tl.load(M + offs).to(tl.float32) + (1.0 - beta1) * g
        v = beta2 * tl.load(V + offs).to(tl.float32) + (1.0 - beta2) * g * g
        p = p - lr * weight_decay * p
        p = p - (lr / bc1) * m / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(P + offs, p.to(P.dtype.element_ty))
        tl.store(M + offs, m.to(M.dtype.element_ty))
        tl.store(V + offs, v.to(V.dtype.element_ty))


def adamw_blocks_triton(p, g, m, v, info, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """The same update, one program per CHUNK elements of each nonzero block in `info` (a BlockMaskInfo)."""
    n = info.n_blocks
    if n == 0:
        return
    b = info.block
    rows_per = max(1, min(b, CHUNK // b))
    grid = (n, b // rows_per)
    _adamw_blocks_kernel[grid](p, g, m, v, info.blk_rows, info.blk_cols, step, lr, beta1, beta2, math.log2(beta1),
                               math.log2(beta2), eps, weight_decay, p.stride(0), g.stride(0), g.stride(1), BLOCK=b,
                               ROWS_PER=rows_per, num_warps=4)  # fmt: skip


def _triton_ok(p, g, m, v) -> bool:
    return triton_available() and all(t.is_cuda for t in (p, g, m, v)) and all(t.is_contiguous() for t in (p, m, v))


def adamw_blocks(p, g, m, v, module, lr, beta1, beta2, eps, weight_decay, step, backend: str = "auto") -> None:
    """AdamW over the nonzero blocks of `module` (a BlockSparseLinear, whose block mask says which), in place."""
    impls = {"triton": adamw_blocks_triton, "ref": None}
    name = select(impls, backend, {"triton": lambda: _triton_ok(p, g, m, v)})
    if name == "triton":
        adamw_blocks_triton(p, g, m, v, module.block_mask_info(), lr, beta1, beta2, eps, weight_decay, step)
    else:
        adamw_blocks_ref(p, g, m, v, module.block_mask, module.block, lr, beta1, beta2, eps, weight_decay, step)


class BlockAdamW(torch.optim.AdamW):
    """torch's AdamW, except that the weights of `blocks` (param -> its BlockSparseLinear) are stepped over their
    nonzero blocks only. Each param group holding such weights is split in two with the same options; the block
    half is marked `block_sparse`. No amsgrad, maximize or closure (nothing here uses them)."""

    def __init__(self, params, blocks: Mapping[nn.Parameter, nn.Module], backend: str = "auto", **kwargs):
        if kwargs.get("amsgrad") or kwargs.get("maximize"):
            raise ValueError("BlockAdamW supports neither amsgrad nor maximize")
        self.modules = {id(p): m for p, m in blocks.items()}
        self.backend = backend
        split = []
        for group in params:
            ps = list(group["params"])
            split.append({**group, "params": [p for p in ps if id(p) not in self.modules]})
            split.append({**group, "params": [p for p in ps if id(p) in self.modules], "block_sparse": True})
        super().__init__([g for g in split if g["params"]], **kwargs)

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["synced"] = torch.zeros((), dtype=torch.int64, device=p.device)  # int: not cast to p's dtype
        return state

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("BlockAdamW.step takes no closure")
        groups = self.param_groups
        for group in (g for g in groups if g.get("block_sparse")):
            params = [p for p in group["params"] if p.grad is not None]
            states = [self._state(p) for p in params]
            if not params:
                continue
            torch._foreach_add_([s["step"] for s in states], 1.0)
            beta1, beta2 = group["betas"]
            for p, s in zip(params, states, strict=True):
                adamw_blocks(p, p.grad, s["exp_avg"], s["exp_avg_sq"], self.modules[id(p)], group["lr"], beta1,
                             beta2, group["eps"], group["weight_decay"], s["step"], self.backend)  # fmt: skip
        self.param_groups = [g for g in groups if not g.get("block_sparse")]
        try:
            super().step()
        finally:
            self.param_groups = groups

    def load_state_dict(self, state_dict: dict) -> None:
        # Optimizer.load_state_dict casts every state tensor but "step" to its parameter's dtype, which would round
        # a bf16 weight's `synced` count; put back the saved integers.
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = dict(zip(ids, (p for g in self.param_groups for p in g["params"]), strict=True))
        synced = {i: s["synced"].clone() for i, s in state_dict["state"].items() if "synced" in s}
        super().load_state_dict(state_dict)
        for i, t in synced.items():
            self.state[params[i]]["synced"] = t.to(params[i].device, torch.int64)

    @torch.no_grad()
    def decay_skipped_(self, p: nn.Parameter, skipped: torch.Tensor) -> None:
        """Bring exp_avg_sq of the blocks `skipped` ((R, C) bool: off since the last call) up to date: times β2 for
        each optimizer step taken since then, as plain AdamW would have multiplied it."""
        state = self.state.get(p)
        if not state:
            return
        beta2 = next(g["betas"][1] for g in self.param_groups if any(q is p for q in g["params"]))
        factor = torch.pow(beta2, state["step"] - state["synced"].to(torch.float32))
        b = self.modules[id(p)].block
        r, c = skipped.shape
        scale = torch.where(skipped.to(p.device), factor, torch.ones_like(factor))
        state["exp_avg_sq"].view(r, b, c, b).mul_(scale.view(r, 1, c, 1).to(state["exp_avg_sq"].dtype))
        state["synced"].copy_(state["step"])
