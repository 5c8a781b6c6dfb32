"""The seam between the trainer and a sparsity method.

The trainer knows one object, a `Method`, and calls it at fixed points of every step; `Dense` is the null
object, so train.py has no `if method == ...` branches:

    method = make_method(name, cfg, model_cfg, train_cfg)
    model = method.attach(model)                 # once, before the optimizer, compile and DDP
    optimizer = method.configure_optimizer(model, ...)   # AdamW (block MST: over the nonzero blocks)
    for step in ...:
        method.on_step_start(step)               # schedules: target density, phase, kept neurons
        flops += step_flops(method.flop_profile(step))
        for micro in ...: forward_backward()     # gradients summed over micro-batches
        method.after_backward(step)              # e.g. mask gradients, MST topology update from dense grads
        clip_grad_norm_()
        if method.before_optimizer_step(step, optimizer):   # e.g. 2:4 masked decay; False skips the step
            optimizer.step()
        method.after_optimizer_step(step, optimizer)        # e.g. re-apply masks, refresh 2:4 masks
        log(core | method.metrics())

`state_dict()` goes into the checkpoint; `load_state_dict()` restores it after `attach` on resume, before the
first step. All hooks run on every rank; a method that draws random numbers uses its own generator seeded
identically on every rank (or broadcasts from rank 0), so ranks never disagree on masks or kept sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from model.flops import FlopProfile
from model.gpt import GPTConfig


@dataclass
class DenseConfig:
    """Dense training has no knobs."""


class Method:
    """Base class and null object: every hook does nothing. Subclasses override what they need."""

    name: ClassVar[str] = "dense"
    Config: ClassVar[type] = DenseConfig
    cuda_graphs: ClassVar[str] = ""
    """Why the model cannot be replayed from CUDA graphs (train.compile_mode=reduce-overhead); empty if it can: all
    per-step state reaches the compiled model as tensors it takes as inputs or updates in place."""

    def __init__(self, cfg: Any, model_cfg: GPTConfig, total_steps: int, seed: int = 0):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.total_steps = total_steps  # optimizer steps of the whole run: schedules are fractions of it
        self.seed = seed

    def attach(self, model: nn.Module) -> nn.Module:
        """Prepare the (unwrapped) model: swap modules, register masks. Returns the model to train."""
        return model

    def configure_optimizer(
        self, model: nn.Module, weight_decay: float, lr: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.Optimizer:
        """The run's optimizer, built after attach: the model's AdamW groups (a method may step some of its
        parameters its own way, e.g. block MST's BlockAdamW over the nonzero blocks only)."""
        return model.configure_optimizer(weight_decay, lr, betas, device_type)

    def on_step_start(self, step: int) -> None:
        """Called before the micro-batches of optimizer step `step` (0-based)."""

    def flop_profile(self, step: int) -> FlopProfile:
        """Per-GEMM densities of this step, for the FLOP count (called after on_step_start)."""
        return FlopProfile()

    def after_backward(self, step: int) -> None:
        """Gradients of all micro-batches are summed (and all-reduced under DDP) in .grad; not yet clipped."""

    def before_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """After clipping. Return False to skip the optimizer step (MST's topology-update iterations)."""
        return True

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """After the optimizer step (or the skipped one)."""

    def phase(self, step: int) -> str:
        """The schedule's phase at `step` (e.g. MST's warmup / sparse / restore), for per-phase timings; "" if one."""
        return ""

    def compiled_graphs(self) -> int:
        """The most graphs a compiled run of this method may build over its schedule: each state of the attributes
        the compiled model reads is a graph of its own (`runtime_mode` attributes excepted: kernels/__init__.py).
        The trainer raises dynamo's recompile limit to it, so a long run never falls back to eager midway."""
        return 1

    def kernel_warmups(self, batch_size: int, seq_len: int) -> list[dict[str, Any]]:
        """The Triton kernels this method's model will launch, as kernels.prewarm specs, for child processes to
        compile while the run compiles its model (CUDA only)."""
        return []

    def eval_mode(self, model: nn.Module) -> nn.Module:
        """The module to use for validation and sampling (SAT evaluates dense; masks stay applied for MST)."""
        return model

    def metrics(self) -> dict[str, float]:
        """Extra numbers for this step's log record, namespaced by the method (`mst/sparsity`, ...)."""
        return {}

    def kernel_report(self) -> dict[str, Any]:
        """What the method's kernels decided at run time (e.g. which GEMMs went sparse), for benchmark files."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Dense(Method):
    pass
