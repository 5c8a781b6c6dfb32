"""`--method 2of4`: 2:4 sparse pretraining (Hu et al. 2024, spec 2of4.md) with transposable masks.

Per optimizer step (the trainer's hook order, sparsity/base.py):
- the FFN linears (`mlp.c_fc`, `mlp.c_proj`) run as `Linear24`: Y = X W̃ᵀ, dX = dY W̃, dW = MVUE(dYᵀ) X with
  W̃ = M⊙W, straight-through (the dense dW reaches the dense W, so pruned weights keep learning and can return);
- before_optimizer_step (after clipping): masked decay on the gradient, g += λ(1−M)⊙W, so Adam's moments see it;
- after_optimizer_step: one transposable search per group of same-shaped layers (all c_fc at once, all c_proj at
  once) gives the shadow masks m(w_t); their difference to m(w_{t-1}) is the flip rate (spec §4), kept on the device
  until metrics() is read. Every `mask_interval`
  steps the shadow mask becomes M; the packed W̃ is rebuilt from W under M at the next forward, every step;
- the last `dense_ft_fraction` of the steps is the dense fine-tune: plain F.linear, no decay.

With `cuda_graph` (experimental, off by default), each block's MLP whose c_fc and c_proj are both 2:4 becomes a
`SparseMLP24`: on a GPU with the cuSPARSELt path, its fwd+bwd is replayed from CUDA graphs once the micro-batch
shape has been seen twice (cuSPARSELt's per-call host overhead otherwise eats the sparse speed-up); elsewhere it is
the plain MLP.

λ can be found by `search_decay` (spec §3, rule [I]): short trials of each candidate on copies of the model at the
start of warm-up, keeping the smallest λ whose flip rate has peaked and is falling.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from kernels import semi24 as kernels24
from kernels.semi24 import Linear24, SparseMLP24, flipped_entries, transposable_search_stacked
from model.flops import FlopProfile, LinearCost
from model.gpt import GPTConfig
from sparsity.base import Method
from sparsity.swap import select_modules, swap_modules

# λ of the released code by GPT-2 size, keyed by (n_layer, n_embd) [spec §3, C/README].
PAPER_DECAY = {(12, 768): 6e-5, (24, 1024): 2e-4, (36, 1280): 6e-5, (48, 1600): 2e-4}


@dataclass
class Semi24Config:
    """Knobs of the `[2of4]` config section; defaults are the paper's released code unless marked."""

    patterns: list[str] = field(default_factory=lambda: ["*.mlp.c_fc", "*.mlp.c_proj"])
    """fnmatch patterns of the linears made 2:4 (the paper: the two FFN linears only)."""
    mask_interval: int = 40
    """Recompute the transposable mask from |W| every this many optimizer steps; values re-pack every step."""
    decay: float | str = "auto"
    """Masked-decay factor λ on gradients; 'auto' = 6e-5 for 124M/774M, 2e-4 for 350M/1558M (6e-5 otherwise)."""
    dense_ft_fraction: float = 1 / 6
    """Fraction of the run at the end trained dense (F.linear on W, no decay; optimizer and LR continue)."""
    mvue: bool = True
    """Prune dYᵀ with MVUE 2:4 along tokens for the weight-gradient GEMM; False = dense dW."""
    fp8: bool = False
    """[ours, off: whole step 0.86x of dense at GPT-2 774M on an H200, see README Speed] Run the three GEMMs of
    each 2:4 linear on e4m3
    operands with per-tensor scales computed each call (kernels/fp8.py): Y and dX on cuSPARSELt's fp8 2:4 kernels,
    dW on the dense fp8 tensor cores from the unpruned dYᵀ (so `mvue` does not apply). On the CPU or with the 'ref'
    backend the same rounding runs in fp32 (a simulation). The dense fine-tune stays bf16."""
    backend: str = "auto"
    """Kernels: 'auto' (cuSPARSELt + Triton on a capable GPU, each GEMM dense where measured slower), 'ref'
    (masked dense matmuls, the reference), 'cusparselt' (every GEMM sparse, no fallback measurement)."""
    decay_search: list[float] = field(default_factory=list)
    """Candidate λs for `search_decay` (ours, spec §3 [I]), e.g. [2e-5, 6e-5, 2e-4, 6e-4]; empty = off."""
    decay_search_steps: int = 300
    """Optimizer steps of each decay-search trial (ours); should cover a good part of the LR warm-up."""
    log_layers: bool = True
    """Log the flip rate of every sparse layer besides the mean."""
    cuda_graph: bool = False
    """[ours, experimental, off: measured on the H100 at 0.43-0.90x of dense once the per-step repack is counted,
    1.10-1.14x without it; see results/. Since the MLP became a custom op its capture fails on the H100 (GPU tests
    in tests/kernels/test_semi24.py and tests/sparsity/test_semi24_compile.py, xfail): the MLPs then run eagerly,
    with a logged warning. The 2of4 step is GPU-bound, so graphs would not speed it up]
    Replay each sparse MLP's fwd+bwd (c_fc -> GELU -> c_proj) from CUDA graphs,
    captured lazily after two eager micro-batches of a fixed shape. Only acts on CUDA with the cuSPARSELt backend (a
    no-op on CPU / 'ref'); a failed capture logs one warning and training continues eagerly. Costs GPU memory: each
    block's MLP keeps its backward's intermediates in its graph pool (~ 2 x tokens x 4d x 2 bytes per block)."""

    def __post_init__(self) -> None:
        if isinstance(self.decay, str) and self.decay != "auto":
            try:
                self.decay = float(self.decay)
            except ValueError:
                raise ValueError(f"2of4.decay must be 'auto' or a number >= 0, got {self.decay!r}") from None
        if not isinstance(self.decay, str) and self.decay < 0:
            raise ValueError(f"2of4.decay must be 'auto' or a number >= 0, got {self.decay}")
        if self.mask_interval < 1:
            raise ValueError(f"2of4.mask_interval must be >= 1, got {self.mask_interval}")
        if not 0.0 <= self.dense_ft_fraction < 1.0:
            raise ValueError(f"2of4.dense_ft_fraction must be in [0, 1), got {self.dense_ft_fraction}")
        if self.backend not in ("auto", "ref", "cusparselt"):
            raise ValueError(f"2of4.backend must be one of auto, ref, cusparselt, got {self.backend!r}")
        if any(not float(v) > 0 for v in self.decay_search):
            raise ValueError(f"2of4.decay_search must hold positive numbers, got {self.decay_search}")
        if self.decay_search_steps < 2:
            raise ValueError(f"2of4.decay_search_steps must be >= 2, got {self.decay_search_steps}")
        if not self.patterns:
            raise ValueError("2of4.patterns must name at least one linear")


def _is_gpt_mlp(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, k, None), nn.Module) for k in ("c_fc", "gelu", "c_proj", "dropout"))


def choose_decay(curves: dict[float, list[float]]) -> tuple[float, dict[float, str]]:
    """Spec §3 rule [I] on per-step mean flip-rate curves of trials with equal length.

    A curve is smoothed (moving mean over a tenth of its length). 'frozen': its peak is under 5% of the highest
    peak among the candidates (stays near 0 from the start, λ too large). 'exploding': its end is within 90% of
    its peak (still rising or flat, λ too small). Otherwise 'healthy' (peaked, now falling). Returns the smallest
    healthy λ; without one, the largest exploding λ (the least bad), else the smallest frozen one.
    """
    smooth = {}
    for lam, r in curves.items():
        t = torch.tensor(r, dtype=torch.float64)
        k = max(1, len(r) // 10)
        smooth[lam] = t.unfold(0, k, 1).mean(1) if len(r) >= k else t
    top = max(float(s.max()) for s in smooth.values())
    verdict = {}
    for lam, s in smooth.items():
        peak, end = float(s.max()), float(s[-1])
        if peak < 0.05 * top or top == 0.0:
            verdict[lam] = "frozen"
        elif end >= 0.9 * peak:
            verdict[lam] = "exploding"
        else:
            verdict[lam] = "healthy"
    by = {v: sorted(lam for lam in curves if verdict[lam] == v) for v in ("healthy", "exploding", "frozen")}
    lam = by["healthy"][0] if by["healthy"] else by["exploding"][-1] if by["exploding"] else by["frozen"][0]
    return lam, verdict


class Semi24(Method):
    name = "2of4"
    cuda_graphs = ("the 2:4 ops keep packed operands and MVUE seeds in the module, outside the graph's inputs; its "
                   "compiled step is GPU-bound anyway (python -m tools.profile_step), so replays would not speed it up")
    Config = Semi24Config

    def __init__(self, cfg: Semi24Config, model_cfg: GPTConfig, total_steps: int, seed: int = 0):
        super().__init__(cfg, model_cfg, total_steps, seed)
        auto = PAPER_DECAY.get((model_cfg.n_layer, model_cfg.n_embd), 6e-5)
        self.decay = auto if cfg.decay == "auto" else float(cfg.decay)
        self.df_start = total_steps - round(total_steps * cfg.dense_ft_fraction)  # first dense fine-tune step
        self.phase = 0  # 0 sparse, 1 dense fine-tune
        self.layers: dict[str, Linear24] = {}
        self.groups: list[list[str]] = []  # sparse layers of one weight shape: searched together
        self._shadow: list[torch.Tensor] = []  # per group: m(w_{t-1}) of its layers as pattern indices, stacked
        self._group_pos: list[torch.Tensor] = []  # per group: its layers' positions in self.flips
        self.flips: torch.Tensor | None = None  # (layers,) int64 on the device: entries flipped by the last step
        self.decay_curves: dict[float, list[float]] = {}
        self.decay_verdict: dict[float, str] = {}

    # -------------------------------------------------------------------------------------------- hooks
    def attach(self, model: nn.Module) -> nn.Module:
        names = list(select_modules(model, self.cfg.patterns))
        if not names:
            raise ValueError(f"2of4.patterns {self.cfg.patterns} match no nn.Linear of the model")
        for i, name in enumerate(names):
            w = model.get_submodule(name).weight
            if w.shape[0] % 4 or w.shape[1] % 4:
                raise ValueError(f"2:4 layer {name} has weight {tuple(w.shape)}; both sizes must be multiples of 4")
            make = lambda n, old, i=i: Linear24.from_dense(
                old, self.cfg.backend, self.cfg.mvue, self.seed, i, self.cfg.fp8)
            swap_modules(model, [name], make)
        self.layers = {n: model.get_submodule(n) for n in names}
        if self.cfg.cuda_graph:
            mlps = [n.removesuffix(".c_fc") for n in names if n.endswith(".c_fc")]
            mlps = [p for p in mlps if f"{p}.c_proj" in self.layers and _is_gpt_mlp(model.get_submodule(p))]
            swap_modules(model, mlps, lambda n, old: SparseMLP24(old))
        device = next(iter(self.layers.values())).weight.device
        self.flips = torch.zeros(len(names), dtype=torch.int64, device=device)
        shapes: dict[tuple[int, ...], list[str]] = {}
        for name, m in self.layers.items():
            shapes.setdefault(tuple(m.weight.shape), []).append(name)
        self.groups = list(shapes.values())
        self._group_pos = [torch.tensor([names.index(n) for n in g], device=device) for g in self.groups]
        self._shadow = [self._search(g) for g in self.groups]
        for name, idx in self.shadow.items():
            self.layers[name].set_mask(idx)
        self._broadcast_masks()
        return model

    def on_step_start(self, step: int) -> None:
        self.phase = int(step >= self.df_start)
        for m in self.layers.values():
            m.dense = bool(self.phase)
            m.begin_step(step)

    def flop_profile(self, step: int) -> FlopProfile:
        if self.phase:
            return FlopProfile()
        # the 3 FFN GEMMs at half work (spec §1); dW is dense without MVUE, and in fp8
        cost = LinearCost(0.5, 0.5, 0.5 if self.cfg.mvue and not self.cfg.fp8 else 1.0)
        return FlopProfile(linear={name: cost for name in self.layers})

    @torch.no_grad()
    def before_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        if self.phase == 0 and self.decay > 0:
            live = [m for m in self.layers.values() if m.weight.grad is not None]
            if live:  # g += λ(1−M)⊙W, after clipping (spec §3); one multi-tensor add for every layer
                torch._foreach_add_([m.weight.grad for m in live], [m.weight.masked_fill(m.mask, 0.0) for m in live],
                                    alpha=self.decay)
        return True

    @torch.no_grad()
    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        refresh = self.phase == 0 and (step + 1) % self.cfg.mask_interval == 0
        for g, names in enumerate(self.groups):
            idx = self._search(names)
            self.flips.index_copy_(0, self._group_pos[g], flipped_entries(self._shadow[g], idx, len(names)))
            self._shadow[g] = idx
        shadow = self.shadow if refresh else {}
        for name, m in self.layers.items():
            if refresh:
                m.set_mask(shadow[name])
            m.invalidate()  # W changed: re-pack W̃ from W under the (frozen) mask at the next forward
        if refresh:
            self._broadcast_masks()

    def kernel_report(self) -> dict[str, Any]:
        """Every GEMM plan made in this process for this run's layer shapes: sparse or dense, why, and the times
        it was decided on (plans are per shape, so a later run of the same shapes reuses them)."""
        shapes = {tuple(m.weight.shape) for m in self.layers.values()}
        return {"gemm_plans": {"/".join(map(str, k)): p.__dict__.copy() for k, p in kernels24.PLANS.items()
                               if tuple(k[1:3]) in shapes}}

    def metrics(self) -> dict[str, float]:
        if self.flips is None:
            return {}
        flips = self.flips.tolist()  # the one device->host transfer of this method per logged step
        sizes = [m.weight.numel() for m in self.layers.values()]
        out = {
            "2of4/flip_rate": sum(flips) / sum(sizes),
            "2of4/density": 1.0 if self.phase else 0.5,
            "2of4/decay": float(self.decay),
            "2of4/phase": float(self.phase),
        }
        if self.cfg.log_layers:
            for name, f, n in zip(self.layers, flips, sizes, strict=True):
                out[f"2of4/flip_rate/{name.removeprefix('transformer.')}"] = f / n
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "mask_index": {n: m.mask_index.cpu() for n, m in self.layers.items()},
            "shadow": {n: t.cpu() for n, t in self.shadow.items()},
            "flips": self.flips.cpu(),
            "decay": self.decay,
            "phase": self.phase,
            "decay_curves": self.decay_curves,
            "decay_verdict": self.decay_verdict,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, m in self.layers.items():
            m.set_mask(state["mask_index"][n].to(m.weight.device))
        self._shadow = [torch.cat([state["shadow"][n] for n in g]).to(self.flips.device) for g in self.groups]
        self.flips = state["flips"].to(self.flips.device)
        self.decay, self.phase = state["decay"], state["phase"]
        self.decay_curves, self.decay_verdict = state["decay_curves"], state["decay_verdict"]
        for m in self.layers.values():
            m.dense = bool(self.phase)

    # ------------------------------------------------------------------------------------------ helpers
    def _search(self, names: list[str]) -> torch.Tensor:
        ws = [self.layers[n].weight for n in names]
        return transposable_search_stacked(ws, "ref" if self.cfg.backend == "ref" else "auto")

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """m(w_{t-1}) per layer: views of the stacked per-group masks."""
        return {n: t for names, stacked in zip(self.groups, self._shadow, strict=True)
                for n, t in zip(names, stacked.chunk(len(names)), strict=True)}

    def _broadcast_masks(self) -> None:
        # Identical weights give identical masks, but a rank-0 broadcast makes agreement a guarantee.
        if dist.is_available() and dist.is_initialized():
            for m in self.layers.values():
                dist.broadcast(m.mask_index, src=0)
                m.set_mask(m.mask_index)

    def search_decay(
        self,
        model: nn.Module,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        lr_at: Callable[[int], float] | None = None,
        grad_clip: float = 1.0,
    ) -> float:
        """Pick λ from `decay_search` by short trials (spec §3 [I]) and set it. Call after attach, before step 0.

        Each candidate trains a deep copy of `model` (the attached model; it is not modified) for
        `decay_search_steps` steps on the same batches (x, y), with its own optimizer from make_optimizer and the
        warm-up LR lr_at(step); the per-step mean flip rates go to choose_decay. Returns the chosen λ.
        """
        steps = self.cfg.decay_search_steps
        batches = list(itertools.islice(iter(batches), steps))
        if len(batches) < steps:
            raise ValueError(f"search_decay needs {steps} batches, got {len(batches)}")
        trial_cfg = replace(self.cfg, decay_search=[], dense_ft_fraction=0.0, log_layers=False)
        for lam in self.cfg.decay_search:
            trial_model = copy.deepcopy(model)
            trial = Semi24(replace(trial_cfg, decay=float(lam)), self.model_cfg, self.total_steps, self.seed)
            trial.attach(trial_model)
            opt = make_optimizer(trial_model)
            rates = []
            for step, (x, y) in enumerate(batches):
                if lr_at is not None:
                    for group in opt.param_groups:
                        group["lr"] = lr_at(step)
                trial.on_step_start(step)
                with torch.autocast(x.device.type, torch.bfloat16, enabled=x.is_cuda):
                    _, loss = trial_model(x, y)
                loss.backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trial_model.parameters(), grad_clip)
                if trial.before_optimizer_step(step, opt):
                    opt.step()
                trial.after_optimizer_step(step, opt)
                opt.zero_grad(set_to_none=True)
                rates.append(trial.flips.sum())
            sizes = sum(m.weight.numel() for m in trial.layers.values())
            self.decay_curves[float(lam)] = (torch.stack(rates).double() / sizes).tolist()
        self.decay, self.decay_verdict = choose_decay(self.decay_curves)
        return self.decay
