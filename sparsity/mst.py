"""Mixed Sparsity Training (MST, arXiv 2408.11746) and the dynamic-sparse baselines it is compared with.

Spec: shared/research/mst.md (section numbers below refer to it). Tags in comments: [C] checked in the official
code, [P] paper claim, "ours" a value we chose where the paper's is unknown ([P?]).

One engine, `DST`, does everything; the three registered methods differ only in their config defaults:
- `MST` ("mst"): sparsity variation (dense start -> warm-up ramp -> long ultra-sparse middle -> restoration that
  mirrors the warm-up), Mixed-Growing topology updates (prune by |W|, grow by |dense grad| for a (1-R) share and at
  random for an R share), Hybrid Sparse Attention early in the run.
- `RigL` ("rigl"): constant sparsity, gradient growth only (R = 0), cosine drop fraction (§5).
- `Static` ("static", the paper's SS): a fixed random ER mask, no topology updates (§5).

Every nn.Linear weight is sparse (per block c_attn, attn.c_proj, c_fc, mlp.c_proj, plus lm_head, tied to wte, §1);
wpe and the LayerNorms stay dense. Masks live in the method (never in the model's state_dict): a 0/1 tensor in the
weight's dtype and device per layer, rebuilt only at topology updates, so a normal step costs one fused multiply of
the gradients (after backward) and one of the weights (after the optimizer step; none with zero_pruned_moments, the
block default). With granularity 'element' the layers still run as dense GEMMs (the savings are counted in FLOPs, §7,
not in time); with 'block' they run kernels/block_sparse.py's kernels, which skip the empty blocks, eagerly or inside
one compiled graph: a topology update rewrites the layers' index tensors in place (no recompile, no CUDA-graph
re-record). Block layers above block_dense_above run as dense GEMMs, and update steps take dense weight gradients:
both are runtime modes of the layers' ops (`BlockSparseLinear.runtime_mode`), as is the switch from HSA to dense
attention (`HsaAttention.runtime_mode`), so the whole schedule runs one compiled graph; CUDA-graph replays record
one graph per combination of modes. The tied lm_head keeps element masks unless block_lm_head.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn

from model.flops import FlopProfile, LinearCost, linear_shapes
from model.gpt import GPTConfig
from sparsity.base import Method
from sparsity.swap import select_modules, swap_modules

PHASE_WARMUP, PHASE_SPARSE, PHASE_RESTORE = 0, 1, 2
PHASE_NAMES = ("warmup", "sparse", "restore")


# ---------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class DSTConfig:
    """Knobs shared by MST, RigL and static sparse training. Subclasses only change defaults."""

    section: ClassVar[str] = "dst"

    # Sparsity Variation, §2. s(t) is a continuous function of the step, sampled into a staircase.
    sparsity: float = 0.9
    """Peak (ultra-sparse) global sparsity, parameter-weighted over the sparse linears."""
    initial_sparsity: float = 0.0
    """Sparsity at step 0, where the warm-up ramp starts (0 = dense start). Unused when warmup_frac = 0."""
    final_sparsity: float = 0.0
    """Sparsity the restoration ramp ends at (reached at the last step). Unused when restore_frac = 0."""
    warmup_frac: float = 0.0
    """Fraction of the run spent ramping initial_sparsity -> sparsity (0 = start at the peak)."""
    restore_frac: float = 0.0
    """Fraction of the run, at its end, spent ramping sparsity -> final_sparsity (0 = no restoration)."""
    ramp: str = "cubic"
    """Shape of the ramps: 'cubic' (GMP's s_p + (s_0 - s_p)(1 - u)^3, mirrored in time for restoration) or 'linear'."""
    stair_interval: int = 1000
    """Steps between samples of s(t) [C: 1000 iterations]; short runs use total_steps // 100 if that is smaller."""
    distribution: str = "er"
    """Per-layer allocation: 'er' (Erdos-Renyi, density ~ (rows + cols) / (rows * cols), [C] §1) or 'uniform'."""
    include_lm_head: bool = True
    """Sparsify lm_head, and so the tied token embedding [C] §1."""
    init: str = "random"
    """Initial mask: 'random' (uniform per layer, [C] sparsify_type='random') or 'magnitude' (top-|W|)."""

    # Mixed-Growing topology updates, §3.
    delta_t: int = 100
    """Steps between topology updates ΔT [C]; updates run at steps ΔT, 2ΔT, ... < total_steps. 0 = never (static)."""
    zeta: float = 0.3
    """Drop fraction ζ0 at the start of its cosine [C]."""
    zeta_schedule: str = "cosine"
    """'cosine' over the whole run [C], or 'stepwise': a cosine restarted at ζ0 at each phase start [P, Fig. 4]."""
    anneal_coeff: float = 1.0
    """c in the stepwise cosine ζ0/2·(1 + cos(π c (t - t_i) / (t_{i+1} - t_i))) [C]; 1 reaches 0 at the phase end."""
    random_frac: float = 0.25
    """R, the share of grown connections drawn at random; 1 - R grow by |dense grad| [C: grad_rand_ratio ρ=3 ->
    R = 1/(ρ+1) = 0.25]. 0 is RigL, 1 is SET."""
    zero_grown_moments: bool = False
    """Zero AdamW's exp_avg/exp_avg_sq at grown entries. Off as in the code, whose reset_momentum touches only SGD's
    momentum_buffer [C]; on is a deviation from the paper."""
    zero_pruned_moments: bool | None = None
    """Zero AdamW's exp_avg at pruned entries at each update, so that (their gradients being zero) the optimizer
    leaves them exactly 0 and no per-step re-masking of the weights is needed. The code re-masks the weights after
    every step and lets a pruned entry's exp_avg decay (by β1 a step, ~3e-5 of it left after ΔT=100 steps, which a
    regrown entry starts with). Unset: on with granularity='block' (ours: one pass over every sparse weight saved a
    step), off with 'element' (as the code)."""
    block_adamw: bool = False
    """granularity='block' with zero_pruned_moments: AdamW steps only the nonzero blocks of the block layers
    (kernels/block_adamw.py), and brings a pruned block's exp_avg_sq up to date (times β2 per step skipped) at each
    topology update, so it trains as plain AdamW does. Off (ours): on the H200 it made GPT-2 124M's sparse-phase
    step 22.35 -> 22.24 ms, within run-to-run noise (results/raw/h200-mst-block-wholerun-s34-6000-blockadamw.json)."""

    # Hybrid Sparse Attention, §4. Active for hsa_start·T <= step < hsa_end·T (T = total steps).
    hsa_start: float = 0.0
    """Fraction of the run where the strided attention mask starts."""
    hsa_end: float = 0.0
    """Fraction of the run where attention goes back to dense causal (hsa_end <= hsa_start: HSA off)."""
    hsa_stride: int = 128
    """Stride l of the strided mask: the previous l positions plus every l-th one before them [C default 128]."""
    hsa_mode: str = "sparse"
    """Mask pattern: 'sparse' (unfactorized strided, [C] default), 'local', 'strided', 'fixed' or 'dense'."""
    hsa_backend: str = "auto"
    """Kernel backend of the masked attention (kernels.hsa_attention)."""

    # Structured variant (issue 8), off by default.
    granularity: str = "element"
    """'element' (unstructured, the paper) or 'block': the same schedule and rules on block_size² tiles."""
    block_size: int = 64
    """Tile edge for granularity='block'; every sparse weight's dimensions must be multiples of it."""
    block_lm_head: bool = False
    """granularity='block': tile the tied lm_head/wte too (fastest: its GEMMs are 27% of GPT-2 124M's). Off (ours):
    it keeps element masks on a dense GEMM, because tiles of it drop whole groups of block_size tokens, embedding
    and logits both (a CPU test, mini GPT on bytes, 90%: val loss 3.2 against 2.1 with a dense lm_head and 1.8 for
    element MST)."""
    block_dense_above: float = 0.5
    """granularity='block': a layer whose block density is above this runs as a dense GEMM on its masked weight
    (same products; the block kernels are slower than cuBLAS there: ours, from the H200 crossover, ~1.0x at 0.5 and
    0.6-0.75x at 0.75-1.0). 1 = always the block kernels."""

    def __post_init__(self) -> None:
        s = self.section
        for knob in ("sparsity", "initial_sparsity", "final_sparsity"):
            if not 0.0 <= getattr(self, knob) < 1.0:
                raise ValueError(f"{s}.{knob} must be in [0, 1), got {getattr(self, knob)}")
        for knob in ("warmup_frac", "restore_frac", "hsa_start", "hsa_end", "random_frac", "zeta", "block_dense_above"):
            if not 0.0 <= getattr(self, knob) <= 1.0:
                raise ValueError(f"{s}.{knob} must be in [0, 1], got {getattr(self, knob)}")
        if self.warmup_frac + self.restore_frac > 1.0:
            total = self.warmup_frac + self.restore_frac
            raise ValueError(f"{s}.warmup_frac + {s}.restore_frac must be <= 1, got {total}")
        choices = {
            "ramp": ("cubic", "linear"),
            "distribution": ("er", "uniform"),
            "init": ("random", "magnitude"),
            "zeta_schedule": ("cosine", "stepwise"),
            "granularity": ("element", "block"),
            "hsa_mode": ("sparse", "local", "strided", "fixed", "dense"),
        }
        for knob, allowed in choices.items():
            if getattr(self, knob) not in allowed:
                raise ValueError(f"{s}.{knob} must be one of {', '.join(allowed)}, got {getattr(self, knob)!r}")
        if self.block_size not in (32, 64, 128):  # the block-sparse kernels' tile sizes
            raise ValueError(f"{s}.block_size must be one of 32, 64, 128, got {self.block_size}")
        for knob in ("stair_interval", "hsa_stride"):
            if getattr(self, knob) < 1:
                raise ValueError(f"{s}.{knob} must be >= 1, got {getattr(self, knob)}")
        if self.delta_t < 0:
            raise ValueError(f"{s}.delta_t must be >= 0 (0 = no topology updates), got {self.delta_t}")
        if self.delta_t == 0 and (self.warmup_frac > 0 or self.restore_frac > 0):
            raise ValueError(f"{s}.delta_t must be > 0 when the sparsity changes (warmup_frac or restore_frac > 0)")
        if self.anneal_coeff <= 0:
            raise ValueError(f"{s}.anneal_coeff must be > 0, got {self.anneal_coeff}")
        if self.block_adamw and not (self.granularity == "block" and self.zero_pruned):
            raise ValueError(f"{s}.block_adamw needs {s}.granularity='block' and {s}.zero_pruned_moments: AdamW "
                             "may skip pruned entries only where their weights, gradients and exp_avg are zero")

    @property
    def zero_pruned(self) -> bool:
        """zero_pruned_moments with its default resolved: on with granularity='block', off with 'element'."""
        return self.granularity == "block" if self.zero_pruned_moments is None else self.zero_pruned_moments


@dataclass
class MSTConfig(DSTConfig):
    """MST's defaults. The paper's Table 5 is [P?]; ours give its shape and <= 1/4 of dense training FLOPs at
    GPT-2 124M (0.194x with these values, see tools/flop_match.py and the test that asserts it)."""

    section: ClassVar[str] = "mst"

    sparsity: float = 0.9  # ours: "ultra-sparse" [P]; 0.9 is the released config's value [C config/mst.py, unread]
    initial_sparsity: float = 0.0  # ours: dense start [P]
    final_sparsity: float = 0.0  # ours: restoration mirrors the warm-up [P], so it ends dense
    warmup_frac: float = 0.1  # ours
    restore_frac: float = 0.1  # ours: mirrors warm-up [P]
    ramp: str = "cubic"  # ours
    zeta_schedule: str = "stepwise"  # piecewise cosine [P, Fig. 4]; restart values per phase are [P?], ours = ζ0
    random_frac: float = 0.25  # [C] ρ=3
    hsa_start: float = 0.0  # ours: sparse attention early [P]
    hsa_end: float = 0.9  # ours: dense causal from the restoration start ("as the model becomes denser" [P])
    hsa_stride: int = 256  # ours: Strided-256 is "comparable to dense" [P]; the code's default is 128 [C]


@dataclass
class RigLConfig(DSTConfig):
    """RigL baseline (§5): constant sparsity, gradient growth, cosine ζ from 0.3, ΔT=100 [C defaults]."""

    section: ClassVar[str] = "rigl"

    sparsity: float = 0.8  # [P?] an unverified third-party note says the baselines run at 80%
    random_frac: float = 0.0  # [C] grow_mix=False: pure gradient growth


@dataclass
class StaticConfig(DSTConfig):
    """Static sparse (SS) baseline (§5): a random ER mask drawn once, never changed ([C] static_topo, ζ=0)."""

    section: ClassVar[str] = "static"

    sparsity: float = 0.8  # [P?] as RigL
    delta_t: int = 0  # no topology updates
    zeta: float = 0.0  # [C] static_topo sets ζ=0


# ---------------------------------------------------------------------------------------------------------------
# Schedules: pure functions of the step, shared by the method and the FLOP planner (tools/flop_match.py)


class DSTSchedule:
    """Sparsity Variation s(t), its staircase, phases, drop fraction ζ(t), HSA window and update steps."""

    def __init__(self, cfg: DSTConfig, total_steps: int):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.cfg, self.total = cfg, total_steps
        # ours: at least 100 stairs per run, so a short run keeps the ramp's shape ([C] steps every 1000 iterations).
        self.stair = min(cfg.stair_interval, max(1, total_steps // 100))
        self.warmup_end = cfg.warmup_frac * total_steps
        self.restore_start = (1.0 - cfg.restore_frac) * total_steps

    def _ramp(self, u: float) -> float:
        return 1.0 - (1.0 - u) ** 3 if self.cfg.ramp == "cubic" else u

    def sparsity(self, t: float) -> float:
        """Continuous target: ramp up over the warm-up, hold, ramp back down (time-mirrored) over the restoration."""
        c = self.cfg
        if t < self.warmup_end:
            return c.initial_sparsity + (c.sparsity - c.initial_sparsity) * self._ramp(t / self.warmup_end)
        if c.restore_frac > 0 and t >= self.restore_start:
            v = max(0.0, (self.total - t) / (self.total - self.restore_start))
            return c.final_sparsity + (c.sparsity - c.final_sparsity) * self._ramp(v)
        return c.sparsity

    def target(self, step: int) -> float:
        """The staircase the method follows: s(t) sampled every `stair` steps (§2).

        Warm-up stairs sample the ramp at their start and restoration stairs at their end (capped at the run's
        end), so the staircase mirrors in time as the ramps do: the first stair is dense (s(0) = initial) and so is
        the last (s(T) = final). Sampling the restoration at stair starts left the run's last stair at the first
        warm-up stair's sparsity (0.24 of 0.9 in configs/small), never dense.
        """
        start = step // self.stair * self.stair
        if self.cfg.restore_frac > 0 and start >= self.restore_start:
            return self.sparsity(min(start + self.stair, self.total))
        return self.sparsity(start)

    def phase(self, step: int) -> int:
        if step < self.warmup_end:
            return PHASE_WARMUP
        if self.cfg.restore_frac > 0 and step >= self.restore_start:
            return PHASE_RESTORE
        return PHASE_SPARSE

    def zeta(self, step: int) -> float:
        """Drop fraction (§3): one cosine over the run, or one per phase restarted at ζ0 ('stepwise')."""
        c = self.cfg
        if c.zeta_schedule == "cosine":
            return c.zeta / 2 * (1 + math.cos(math.pi * step / self.total))
        bounds = sorted({0.0, self.warmup_end, self.restore_start if c.restore_frac > 0 else 0.0, float(self.total)})
        start = max(b for b in bounds if b <= step)
        end = min((b for b in bounds if b > step), default=float(self.total))
        return c.zeta / 2 * (1 + math.cos(math.pi * c.anneal_coeff * (step - start) / (end - start)))

    def is_update(self, step: int) -> bool:
        """Topology updates at ΔT, 2ΔT, ... < T_end [C: the counter is 0.5 at iteration 0, so never at step 0]."""
        d = self.cfg.delta_t
        return d > 0 and step >= d and step % d == 0 and step < self.total

    def mask_sparsity(self, step: int) -> float:
        """Target of the mask in effect during `step`: set by the last update before it, or the initial mask."""
        d = self.cfg.delta_t
        last = (step - 1) // d * d if d > 0 and step > d else 0
        return self.target(last)

    def hsa_on(self, step: int) -> bool:
        return self.cfg.hsa_start * self.total <= step < self.cfg.hsa_end * self.total


def er_densities(shapes: Mapping[str, tuple[int, int]], sparsity: float) -> dict[str, float]:
    """Erdos-Renyi densities p_l = ε (rows + cols) / (rows cols), ε set so the parameter-weighted global sparsity is
    `sparsity`; layers whose p_l would exceed 1 become dense and ε is re-solved (§1). Density clamped to (0, 1]."""
    size = {k: r * c for k, (r, c) in shapes.items()}
    raw = {k: (r + c) / (r * c) for k, (r, c) in shapes.items()}
    keep = (1.0 - sparsity) * sum(size.values())
    dense: set[str] = set()
    eps = 0.0
    while len(dense) < len(size):
        free = [k for k in size if k not in dense]
        eps = (keep - sum(size[k] for k in dense)) / sum(size[k] * raw[k] for k in free)
        over = {k for k in free if eps * raw[k] > 1.0}
        if not over:
            break
        dense |= over
    return {k: 1.0 if k in dense else min(1.0, max(eps * raw[k], 0.0)) for k in size}


def layer_counts(
    shapes: Mapping[str, tuple[int, int]], units: Mapping[str, int], sparsity: float, distribution: str
) -> dict[str, int]:
    """Active units (elements or blocks) per layer at a global sparsity, at least one per layer (§8: sparsity < 1).
    `shapes` are element shapes (they set ER's densities); `units` the mask sizes the densities apply to."""
    if distribution == "er":
        dens = er_densities(shapes, sparsity)
    else:
        dens = dict.fromkeys(shapes, 1.0 - sparsity)
    return {k: min(units[k], max(1, round(dens[k] * units[k]))) for k in shapes}


def growth_counts(n_on: int, n_target: int, zeta: float, random_frac: float) -> tuple[int, int, int, int]:
    """Algorithm 1 counts, in integers (§3 steps 1, 2, 5): (n_prune, n_grow, n_grad, n_random).

    Δ = n_on - n_target is exact (the code's int((S* - S)·N) is off by one); prune max(⌊ζ n_on⌋, Δ), grow n_prune - Δ,
    so the layer ends with n_target active units and prune != grow whenever the target moves."""
    delta = n_on - n_target
    n_prune = min(n_on, max(int(zeta * n_on), delta))
    n_grow = n_prune - delta
    n_grad = math.floor(n_grow * (1.0 - random_frac) + 1e-9)
    return n_prune, n_grow, n_grad, n_grow - n_grad


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores along the last dimension."""
    if k > 0:
        return torch.topk(score, k, dim=-1, sorted=False).indices
    return score.new_empty((*score.shape[:-1], 0), dtype=torch.long)


def _stack(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(ts)  # one layer: a view, no copy


def _group_by(names: Iterable[str], key: Callable[[str], Any]) -> dict[Any, list[str]]:
    groups: dict[Any, list[str]] = {}
    for name in names:
        groups.setdefault(key(name), []).append(name)
    return groups


@torch.no_grad()
def mixed_growing(
    mask: torch.Tensor,
    w_score: torch.Tensor,
    g_score: torch.Tensor,
    n_target: int,
    zeta: float,
    random_frac: float,
    generator: torch.Generator,
    n_on: int | None = None,
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """One Mixed-Growing update (§3, Algorithm 1) of one layer, or of a batch of layers with the same counts.

    mask: bool (N,) over a layer's N units, the current topology, or (G, N) for G layers updated at once (one rule
    per row; one launch per op for all of them); w_score/g_score: |W| and |dense grad| per unit (>= 0), the same
    shape. Keep the top (n_on - n_prune) active units by |W|; grow n_grad of the rest (just-pruned included) by |G|,
    then n_random uniformly among what is still free. Returns the new mask and the counts (per layer). n_on: the
    active units of each row, where the caller knows it (each int() of a device tensor waits for the GPU)."""
    if n_on is None:
        on = mask.sum(-1).flatten()
        if (on != on[0]).any():
            raise ValueError(f"a batch of masks must have equal active counts, got {on.tolist()}")
        n_on = int(on[0])
    n_prune, n_grow, n_grad, n_rand = growth_counts(n_on, n_target, zeta, random_frac)
    new = torch.zeros_like(mask)
    # Scores are >= 0, so -1 ranks excluded units last; topk never reaches them since enough units are eligible.
    new.scatter_(-1, _top(torch.where(mask, w_score, -1.0), n_on - n_prune), True)
    new.scatter_(-1, _top(torch.where(new, -1.0, g_score), n_grad), True)
    rand = torch.rand(mask.shape, generator=generator, device=mask.device)
    new.scatter_(-1, _top(torch.where(new, -1.0, rand), n_rand), True)
    return new, (n_prune, n_grow, n_grad, n_rand)


def plan_profile(model_cfg: GPTConfig, cfg: DSTConfig, total_steps: int, step: int) -> FlopProfile:
    """The FlopProfile a run with this config will report at `step`, without a model (for FLOP planning).
    Mixed-Growing always lands exactly on the target counts, so the realised densities are known in advance."""
    sched = DSTSchedule(cfg, total_steps)
    shapes = sparse_shapes(model_cfg, cfg)
    units = _units(shapes, tiles(shapes, cfg))
    counts = layer_counts(shapes, units, sched.mask_sparsity(step), cfg.distribution)
    density = {k: counts[k] / units[k] for k in shapes}
    return _profile(density, sched.is_update(step), _attn_density(model_cfg, cfg, sched, step))


def sparse_shapes(model_cfg: GPTConfig, cfg: DSTConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of the sparse linears, by module name (§1: all of them; lm_head per include_lm_head)."""
    return {k: (o, i) for k, (i, o) in linear_shapes(model_cfg).items() if cfg.include_lm_head or k != "lm_head"}


def tiles(shapes: Mapping[str, tuple[int, int]], cfg: DSTConfig) -> dict[str, int]:
    """The mask unit's edge per layer: block_size for the block layers, 1 (elements) for the rest."""
    block = cfg.granularity == "block"
    return {k: cfg.block_size if block and (k != "lm_head" or cfg.block_lm_head) else 1 for k in shapes}


def _units(shapes: Mapping[str, tuple[int, int]], tile: Mapping[str, int]) -> dict[str, int]:
    """Mask units per layer: its tile² blocks (elements where the tile is 1)."""
    return {k: (o // tile[k]) * (i // tile[k]) for k, (o, i) in shapes.items()}


def _profile(density: Mapping[str, float], update: bool, attn: float) -> FlopProfile:
    # §7: sparse forward, input grad and weight grad (3dF); the dense weight gradient on update steps ((2d+1)F).
    return FlopProfile(linear={k: LinearCost(d, d, 1.0 if update else d) for k, d in density.items()}, attn=attn)


def _attn_density(model_cfg: GPTConfig, cfg: DSTConfig, sched: DSTSchedule, step: int) -> float:
    return _hsa_density(model_cfg.block_size, cfg.hsa_stride, cfg.hsa_mode) if sched.hsa_on(step) else 1.0


@functools.lru_cache(maxsize=64)
def _hsa_density(T: int, stride: int, mode: str) -> float:
    from kernels.hsa_attention import hsa_density

    return float(hsa_density(T, stride, mode))


# ---------------------------------------------------------------------------------------------------------------
# The method


class DST(Method):
    """Dynamic sparse training engine: masks, sparsity schedule, Mixed-Growing updates, HSA switching."""

    name: ClassVar[str] = "dst"
    Config: ClassVar[type] = DSTConfig

    def __init__(self, cfg: DSTConfig, model_cfg: GPTConfig, total_steps: int, seed: int = 0):
        super().__init__(cfg, model_cfg, total_steps, seed)
        if 0 < cfg.delta_t and total_steps <= cfg.delta_t:  # updates run at ΔT, 2ΔT, ... < total_steps
            warnings.warn(
                f"{cfg.section}.delta_t={cfg.delta_t} leaves no topology update in a run of {total_steps} steps: the "
                f"masks keep their initial sparsity; lower {cfg.section}.delta_t to follow the schedule",
                stacklevel=2,
            )
        self.schedule = DSTSchedule(cfg, total_steps)
        self.shapes = sparse_shapes(model_cfg, cfg)
        self.tile = tiles(self.shapes, cfg)
        self.units = _units(self.shapes, self.tile)
        if cfg.granularity == "block":
            bad = [k for k, (o, i) in self.shapes.items() if o % self.tile[k] or i % self.tile[k]]
            if bad:
                raise ValueError(f"{cfg.section}.block_size={cfg.block_size} does not divide the weights of {bad}")
        self._counts_cache: dict[float, dict[str, int]] = {}
        self._step = 0
        self._last_update: dict[str, float] = {}
        self._grown: dict[str, torch.Tensor] = {}  # keep-masks of moments, zero_grown_moments
        self._pruned: dict[str, torch.Tensor] = {}  # keep-masks of exp_avg, zero_pruned_moments
        self.zero_pruned = cfg.zero_pruned
        self.block_adamw = cfg.block_adamw
        self._skipped: dict[str, torch.Tensor] = {}  # block masks off since the last update (block_adamw)
        self._hsa_on = False
        self._attention = None  # the blocks' HsaAttention, from the first step with HSA on

    # --- setup ---------------------------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> nn.Module:
        modules = select_modules(model, self.shapes)
        if list(modules) != list(self.shapes):
            raise ValueError(f"expected sparse linears {list(self.shapes)}, found {list(modules)}")
        if self.cfg.granularity == "block":
            model, modules = self._swap_block_sparse(model, modules)
        self.modules = modules
        self.block_modules = {k: m for k, m in modules.items() if self.tile[k] > 1}
        self.weights = [m.weight for m in modules.values()]
        # Layers by (shape, tile), in module order: the mask updates batch each group.
        self.groups = _group_by(modules, lambda k: (self.shapes[k], self.tile[k]))
        # Weights another module also uses (lm_head's is wte's): their gradients carry that module's part too.
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        self._shared = {k for k, m in modules.items() if uses[id(m.weight)] > 1}
        self.blocks = list(model.transformer.h)
        device = self.weights[0].device
        # One generator, seeded from the run seed, identical on every rank; masks are also broadcast (§8 DDP bug).
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)
        counts = self._counts(self.schedule.target(0))
        unit_masks = {}
        for name, w in zip(self.modules, self.weights, strict=True):
            if self.cfg.init == "random":
                score = torch.rand(self.units[name], generator=self.generator, device=device)
            else:
                score = self._scores(name, w.detach())
            mask = torch.zeros(self.units[name], dtype=torch.bool, device=device)
            mask[_top(score, counts[name])] = True
            unit_masks[name] = mask
        self._set_masks(self._broadcast(unit_masks))
        with torch.no_grad():
            torch._foreach_mul_(self.weights, self.masks)
        return model

    def configure_optimizer(self, model, weight_decay, lr, betas, device_type) -> torch.optim.Optimizer:
        if not (self.block_adamw and self.block_modules):
            return super().configure_optimizer(model, weight_decay, lr, betas, device_type)
        from kernels.block_adamw import BlockAdamW

        make = functools.partial(BlockAdamW, blocks={m.weight: m for m in self.block_modules.values()})
        return model.configure_optimizer(weight_decay, lr, betas, device_type, make=make)

    def _swap_block_sparse(self, model: nn.Module, modules: dict[str, nn.Module]):
        from kernels.block_sparse import BlockSparseLinear

        # from_dense adopts the parameter objects: the wte/lm_head tie and the state_dict names survive.
        names = [k for k in modules if self.tile[k] > 1]
        make = lambda name, old: BlockSparseLinear.from_dense(old, self.tile[name])
        swap_modules(model, names, make)
        swapped = select_modules(model, names, kind=BlockSparseLinear)
        target = self._counts(self.cfg.sparsity)
        for name, module in swapped.items():  # dW's split-K is sized for the density of the sparse phase
            module.dw_density = max(target[name], 1) / self.units[name]
        return model, {k: swapped.get(k, m) for k, m in modules.items()}

    def _counts(self, sparsity: float) -> dict[str, int]:
        key = round(sparsity, 12)
        if key not in self._counts_cache:
            self._counts_cache[key] = layer_counts(self.shapes, self.units, key, self.cfg.distribution)
        return self._counts_cache[key]

    def _scores(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """|t| per unit, flat: elements, or per block the sum of |t| (issue 8: a block is ranked by the sum of the
        element scores element-MG compares, so b=1 is element MG). t: (out, in), or (G, out, in) -> (G, units)."""
        if self.tile[name] == 1:
            return t.detach().abs().flatten(-2).float()
        from kernels.block_sparse import block_scores

        return block_scores(t, self.tile[name], "sum").flatten(-2)

    def _set_masks(self, unit_masks: dict[str, torch.Tensor]) -> None:
        """Keep the unit masks (bool) and build the element masks in the weights' dtype, once per update."""
        self.unit_masks = unit_masks
        # Per group of same-shape layers, and one device-to-host copy each for the counts and the block masks: a
        # sync per layer left the GPU idle between ~50 small transfers at every update.
        masks, sums = {}, []
        for names in self.groups.values():
            g = _stack([unit_masks[k] for k in names])
            sums.append(g.sum(-1))
            dtype = self.modules[names[0]].weight.dtype
            masks.update(zip(names, self._element_mask(names[0], g, dtype).unbind(0), strict=True))
        order = [k for names in self.groups.values() for k in names]
        counts = dict(zip(order, torch.cat(sums).tolist(), strict=True))
        self.n_on = {k: counts[k] for k in self.modules}
        self.masks = [masks[k] for k in self.modules]
        dense = self._dense_paths(self.n_on)
        if self.block_modules:
            names = list(self.block_modules)
            host = torch.cat([unit_masks[k] for k in names]).cpu().split([self.units[k] for k in names])
            for k, mask in zip(names, host, strict=True):
                o, i, b = *self.shapes[k], self.tile[k]
                self.block_modules[k].set_block_mask(mask.view(o // b, i // b))
                self.block_modules[k].dense_path = dense[k]
        # Which gradients after_backward must mask: a block kernel's dW is already exact zeros off the mask (one
        # pass over 85M of GPT-2 124M's gradients saved a step), unless the weight is shared or runs dense.
        self._mask_grad = [k not in self.block_modules or dense[k] or k in self._shared for k in self.modules]

    def _dense_paths(self, n_on: Mapping[str, int]) -> dict[str, bool]:
        """Which block layers run as dense GEMMs at these block counts (block_dense_above). The weights are exact
        zeros off the mask after every step and their gradients are masked after backward, so both paths train the
        same; FLOPs are still counted at the mask's density (§7), as for element masks that also run dense."""
        return {k: n / self.units[k] > self.cfg.block_dense_above for k, n in n_on.items() if self.tile[k] > 1}

    def _element_mask(self, name: str, unit_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(out, in) 0/1 mask in `dtype` from a flat unit mask (blocks expanded to their tiles); (G, units) masks
        of G layers shaped like `name` give (G, out, in)."""
        o, i, b = *self.shapes[name], self.tile[name]
        lead = unit_mask.shape[:-1]
        if b > 1:
            unit_mask = unit_mask.view(*lead, o // b, 1, i // b, 1).expand(*lead, o // b, b, i // b, b)
        return unit_mask.reshape(*lead, o, i).to(dtype)

    def _broadcast(self, unit_masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rank 0's masks win: ranks can differ in float reductions of the grad scores (the code's per-rank random
        growth made them diverge, §8)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return unit_masks
        flat = torch.cat([unit_masks[k].to(torch.uint8) for k in self.modules])
        dist.broadcast(flat, src=0)
        return dict(zip(self.modules, flat.bool().split(list(self.units.values())), strict=True))

    # --- per step -----------------------------------------------------------------------------------------------

    def on_step_start(self, step: int) -> None:
        self._step = step
        on = self.schedule.hsa_on(step)
        if on != self._hsa_on:
            self._set_attention(on)
        if self.block_modules:
            update = self.schedule.is_update(step)
            # The dense gradient scores the update; not paid on other steps. A runtime mode of the layers' ops:
            # update steps run the same compiled graph (and, replayed, a CUDA graph of their own).
            for module in self.block_modules.values():
                module.dense_wgrad = update

    def _set_attention(self, on: bool) -> None:
        """HSA on or off: one HsaAttention for every block, whose runtime mode turns it into dense causal attention
        (a compiled model takes the mode as an input, so the switch compiles nothing on the Triton path)."""
        if self._attention is None:
            from kernels.hsa_attention import HsaAttention

            self._attention = HsaAttention(self.cfg.hsa_stride, self.cfg.hsa_mode, self.cfg.hsa_backend)
            for block in self.blocks:
                block.attn.attend = self._attention
        self._attention.runtime_mode = 0 if on else 1
        self._hsa_on = on

    def phase(self, step: int) -> str:
        return PHASE_NAMES[self.schedule.phase(step)]

    def _hsa_ever(self) -> bool:
        """Whether HSA is on at some step of the run (its window starts at step 0 or at hsa_start)."""
        s = self.schedule
        return any(s.hsa_on(t) for t in {0, math.ceil(self.cfg.hsa_start * s.total)} if t < s.total)

    def compiled_graphs(self) -> int:
        """The most graphs a compiled run of this schedule builds: one, and one more at each HSA bound inside the
        run. Layer paths and update steps are runtime modes of the block-sparse ops, and so is HSA's switch on the
        Triton path; the reference attention (CPU, other modes, dropout) branches on it in Python, and the first
        step with HSA on installs its attention in place of the dense one."""
        s, cfg = self.schedule, self.cfg
        if not self._hsa_ever():
            return 1
        bounds = {math.ceil(cfg.hsa_start * s.total), math.ceil(cfg.hsa_end * s.total)}
        return 1 + sum(0 < t < s.total for t in bounds)

    def kernel_warmups(self, batch_size: int, seq_len: int) -> list[dict[str, Any]]:
        """Each block layer's kernels at its sparse-phase block count (the kernels' variants depend on the layer's
        shape and dw_density, not on its mask), where that runs the block kernels; HSA's if it is ever on."""
        specs = []
        target = self._counts(self.cfg.sparsity)
        for name, module in self.block_modules.items():
            if target[name] / self.units[name] > self.cfg.block_dense_above:
                continue  # a dense GEMM even at the peak sparsity
            out, inp = self.shapes[name]
            specs.append({"kind": "block_sparse", "out": out, "in": inp, "block": self.tile[name],
                          "blocks": target[name], "dw_density": module.dw_density, "tokens": batch_size * seq_len,
                          "bias": module.bias is not None})  # fmt: skip
        if self._hsa_ever() and self.cfg.hsa_mode == "sparse" and self.cfg.hsa_backend != "ref":
            m = self.model_cfg
            specs.append({"kind": "hsa", "batch": batch_size, "heads": m.n_head, "T": seq_len,
                          "head_dim": m.n_embd // m.n_head, "stride": self.cfg.hsa_stride})  # fmt: skip
        return specs

    def flop_profile(self, step: int) -> FlopProfile:
        density = {k: self.n_on[k] / self.units[k] for k in self.modules}
        return _profile(density, self.schedule.is_update(step), self._attn_density())

    def _attn_density(self) -> float:
        return _attn_density(self.model_cfg, self.cfg, self.schedule, self._step)

    def after_backward(self, step: int) -> None:
        if self.schedule.is_update(step):
            self._update(step)
            return
        pairs = [(w.grad, m) for w, m, need in zip(self.weights, self.masks, self._mask_grad, strict=True)
                 if need and w.grad is not None]
        if pairs:
            grads, masks = zip(*pairs, strict=True)
            torch._foreach_mul_(list(grads), list(masks))  # one fused launch for every sparse layer

    def before_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        if not self.schedule.is_update(step):
            return True
        # Update iterations only score the topology: their (dense) gradients never reach the weights [C].
        # zero_grown_moments: grown entries start with fresh moments; zero_pruned_moments: nothing is left to move a
        # pruned weight.
        if self._skipped and hasattr(optimizer, "decay_skipped_"):  # BlockAdamW: first, before any moment is reset
            for name, skipped in self._skipped.items():
                optimizer.decay_skipped_(self.modules[name].weight, skipped)
        self._skipped = {}
        for keeps, keys in ((self._grown, ("exp_avg", "exp_avg_sq")), (self._pruned, ("exp_avg",))):
            for name, keep in keeps.items():
                state = optimizer.state.get(self.modules[name].weight, {})
                for key in keys:
                    if key in state:
                        state[key].mul_(keep)
        self._grown, self._pruned = {}, {}
        return False

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.zero_pruned:  # zero weight, gradient and exp_avg off the mask: AdamW's update there is exactly 0
            return
        # Masked weights may move under AdamW's stale moments; zero them again so they are exactly 0 after each step.
        with torch.no_grad():
            torch._foreach_mul_(self.weights, self.masks)

    @torch.no_grad()
    def _update(self, step: int) -> None:
        """Mixed-Growing on every sparse layer from the dense gradient of this step's micro-batches (§3)."""
        target = self.schedule.target(step)
        counts = self._counts(target)
        zeta = self.schedule.zeta(step)
        old_masks = self.unit_masks
        if self.block_adamw:  # the blocks BlockAdamW skipped since the last update: their exp_avg_sq is owed
            for k in self.block_modules:
                (o, i), b = self.shapes[k], self.tile[k]
                self._skipped[k] = ~old_masks[k].view(o // b, i // b)
        weights = dict(zip(self.modules, self.weights, strict=True))
        for name, w in weights.items():
            if w.grad is None:
                raise RuntimeError(f"{name}.weight has no gradient on topology-update step {step}")
        # Layers of one shape hold the same counts (ER sizes layers by shape), so each such group is updated by one
        # batched Mixed-Growing: a dozen launches per group instead of per layer (49 layers in GPT-2 124M, whose
        # update steps were host-bound). Rows follow the same rules as one layer alone; only the order in which
        # the random growth is drawn differs.
        groups = _group_by(self.modules, lambda k: (self.shapes[k], self.tile[k], self.n_on[k], counts[k]))
        new_masks, totals = {}, [0, 0, 0, 0]
        for (_, _, n_on, n_target), names in groups.items():
            new, c = mixed_growing(
                _stack([old_masks[k] for k in names]),
                self._scores(names[0], _stack([weights[k] for k in names])),
                self._scores(names[0], _stack([weights[k].grad for k in names])),
                n_target,
                zeta,
                self.cfg.random_frac,
                self.generator,
                n_on,
            )
            new_masks.update(zip(names, new.unbind(0), strict=True))
            totals = [a + len(names) * b for a, b in zip(totals, c, strict=True)]
        self._set_masks(self._broadcast({k: new_masks[k] for k in self.modules}))
        flipped = []
        for names in self.groups.values():
            old, new = _stack([old_masks[k] for k in names]), _stack([self.unit_masks[k] for k in names])
            flipped.append((old ^ new).sum())
            dtype = weights[names[0]].dtype
            # Units new to the mask start at 0; pruned-and-regrown ones keep their value (REINIT_WHEN_SAME=False).
            keep = self._element_mask(names[0], old & new, dtype).unbind(0)
            torch._foreach_mul_([weights[k] for k in names], list(keep))
            if self.cfg.zero_grown_moments:
                self._grown.update(zip(names, self._element_mask(names[0], ~(new & ~old), dtype).unbind(0)))
            if self.zero_pruned:
                self._pruned.update(zip(names, self._element_mask(names[0], ~(old & ~new), dtype).unbind(0)))
        p = self.name
        self._last_update = {
            f"{p}/update_step": float(step),
            f"{p}/flip_rate": int(torch.stack(flipped).sum()) / sum(self.units.values()),
            f"{p}/pruned": float(totals[0]),
            f"{p}/grown": float(totals[1]),
            f"{p}/grown_grad": float(totals[2]),
            f"{p}/grown_random": float(totals[3]),
        }

    # --- reporting and checkpoints ------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        p, step = self.name, self._step
        on, total = sum(self.n_on.values()), sum(self.units.values())
        out = {
            f"{p}/phase": float(self.schedule.phase(step)),
            f"{p}/sparsity": 1.0 - on / total,
            f"{p}/target_sparsity": self.schedule.target(step),
            f"{p}/attn_density": self._attn_density(),
            f"{p}/zeta": self.schedule.zeta(step),
        }
        for k in self.modules:
            out[f"{p}/sparsity/{k.removeprefix('transformer.')}"] = 1.0 - self.n_on[k] / self.units[k]
        # An update's counts reach the first record logged after it, even when log_interval does not divide ΔT.
        out |= self._last_update
        self._last_update = {}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {k: m.cpu().clone() for k, m in self.unit_masks.items()},
            "generator": self.generator.get_state(),
            "step": self._step,
            "hsa_on": self._hsa_on,
            "counts_cache": {s: dict(c) for s, c in self._counts_cache.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.weights[0].device
        self._set_masks({k: state["masks"][k].to(device) for k in self.modules})
        self.generator.set_state(state["generator"])
        self._step = state["step"]
        self._counts_cache = {s: dict(c) for s, c in state["counts_cache"].items()}
        if state["hsa_on"] != self._hsa_on:
            self._set_attention(state["hsa_on"])
        with torch.no_grad():
            torch._foreach_mul_(self.weights, self.masks)


class MST(DST):
    """Mixed Sparsity Training: SV schedule + Mixed-Growing + Hybrid Sparse Attention (MST's defaults)."""

    name: ClassVar[str] = "mst"
    Config: ClassVar[type] = MSTConfig


class RigL(DST):
    """RigL baseline: constant sparsity, gradient growth, cosine drop fraction."""

    name: ClassVar[str] = "rigl"
    Config: ClassVar[type] = RigLConfig


class Static(DST):
    """Static sparse (SS) baseline: a fixed random ER mask."""

    name: ClassVar[str] = "static"
    Config: ClassVar[type] = StaticConfig
