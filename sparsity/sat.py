"""SAT: Sparsity-Accelerated Training (Ma et al., arXiv 2406.01392; spec ../shared/research/sat.md).

Each step, SAT scores every MLP channel and attention head, samples which to keep (softmax(s̃/T) without
replacement) and computes only those, forward and backward (kernels/sliced_mlp.py, kernels/sliced_attention.py).
The omission rate follows a ladder (LORS) down to a dense last rung. No code is public and the paper body gave no
formulas: everything marked [I] below is our reconstruction, exposed as a knob in `SATConfig`.

Scoring variants (`sat.variant`, sat.md §2):
- "predict" [R] (default): statistics are collected on a token subsample during the forward of step t-1 (the dense
  first projection on 1/`subsample` of the tokens, no grad) and the kept sets of step t are chosen in
  on_step_start(t), once per optimizer step, identical for all micro-batches; the fast path is then fully sparse
  and compiles to one graph per rung. The first step that needs statistics and has none runs dense.
- "observe" [I] (the abstract's reading): each micro-batch computes its first projection densely, scores, selects
  and then runs sliced. Selection happens inside the forward, once per micro-batch, so torch.compile graph-breaks
  there (once per sliced layer; the selection itself runs eagerly).
`magnitude` uses only weights and always selects in on_step_start.

Randomness: every selection draws from a torch.Generator on the parameters' device, re-seeded from (seed, step,
layers, micro-batch), so it depends on nothing but the scores, which are all-reduced across DDP ranks: ranks agree,
resume reproduces.

Speed: selection never leaves the device and never syncs the host. All MLP layers (and all attention layers) share
n and k, so their statistics are rows of one (L, ·) tensor (each module's `stat` is a view), and one normalize +
Gumbel + topk + sort selects for the whole stack; the kept sets are written in place into one (L, k) buffer whose
rows the modules hold. That is ~10 device ops per step instead of ~40 host ops and 2 H2D copies per layer after a
`.cpu()` sync (the first whole-step H100 bench: SAT 0.72x of dense). Logging-only quantities (overlaps) are
computed from the kept index tensors in metrics(), which runs only when train.py already syncs to log.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from kernels.sliced_attention import SlicedAttention, head_slices
from kernels.sliced_mlp import SlicedMLP, positions
from model.flops import FlopProfile, LinearCost
from model.gpt import MLP, CausalSelfAttention, GPTConfig
from sparsity.base import Method
from sparsity.swap import select_modules, swap_modules

METRICS = ("magnitude", "wanda", "maxip")
AGGREGATIONS = ("l2", "mean_abs", "max")
NORMS = ("max", "minmax", "sum")


@dataclass
class SATConfig:
    """Knobs of SAT ([P] paper, [I] reconstructed, [R] our recommendation; sat.md)."""

    metric: str = "maxip"
    """Importance metric [P names]: magnitude (Σ|W1[i,:]|), wanda (Σ_j |W1[i,j]|·‖X_j‖₂), maxip (‖σ(X W1[i]ᵀ+b)‖)."""
    aggregation: str = "l2"
    """maxip's reduction of a channel's (head's) activations over tokens [I]: l2 | mean_abs | max."""
    magnitude_w2: bool = False
    """magnitude also adds Σ_j |W2[j,i]| (c_proj columns) [I]."""
    variant: str = "predict"
    """predict: score on a subsample of the previous step's batch, select once per step [R];
    observe: dense first projection on each micro-batch, then select (slower, not compile-friendly) [I]."""
    subsample: int = 16
    """predict: score on every subsample-th token (MLP) / sequence (heads) [R]."""
    norm: str = "max"
    """Score normalization before softmax(s̃/T) [I]: max (s/max s) | minmax | sum."""
    selection: str = "sample"
    """topk | sample (Gumbel-top-k, = multinomial without replacement); sampling wins in the paper [P]."""
    temperature: float = 0.05
    """Sampling temperature T on normalized scores [P: 0.05 from {0.1, 0.05, 0.01}]."""
    omission_rate: float = 0.5
    """r0: fraction of channels/heads omitted in the sparse stage [I: the paper sweeps r; values unknown]."""
    schedule: str = "lors"
    """Omission-rate schedule: lors (ladder, dense last rung) [P] | constant | linear (r0 -> 0) [I]."""
    lors_frac: float = 0.5
    """LORS: fraction f of the omission phase at constant r0 before the ladder starts [I]."""
    lors_rungs: int = 4
    """LORS: number K of ladder rungs; rung j has r0·(1-(j+1)/K), so the last one is dense [I]."""
    warmup_frac: float = 0.1
    """Dense fraction of the run before omission starts (ours): scores of a fresh init mean nothing; set 0 when
    continuing from a pretrained model, SAT's setting. The schedule runs over the remaining steps."""
    channel_multiple: int = 128
    """Kept MLP channels are rounded up to a multiple of this (tensor-core tiles, fewer compiled shapes) [R]."""
    omit_mlp: bool = True
    """Omit MLP intermediate channels [P]."""
    omit_heads: bool = True
    """Omit whole attention heads (at least one is kept) [P]. Compiled whole steps at r0 = 0.5 on the H100 ran
    1.44x of dense with heads omitted against 1.21x without at 350M, and 1.18x against 1.13x at 124M
    (results/raw/h100-sat-v4.json)."""
    optimizer_mode: str = "zero_grad"
    """zero_grad: omitted rows get zero grads, AdamW still decays them and their moments (paper-like) [I];
    lazy: omitted rows and their optimizer state are left untouched by the step (sat.md §7)."""

    def __post_init__(self) -> None:
        choices = dict(metric=METRICS, aggregation=AGGREGATIONS, variant=("predict", "observe"), norm=NORMS,
                       selection=("topk", "sample"), schedule=("lors", "constant", "linear"),
                       optimizer_mode=("zero_grad", "lazy"))
        for knob, allowed in choices.items():
            if getattr(self, knob) not in allowed:
                raise ValueError(f"sat.{knob} must be one of {', '.join(allowed)}, got {getattr(self, knob)!r}")
        if not self.temperature > 0:
            raise ValueError(f"sat.temperature must be > 0, got {self.temperature}")
        if not 0 <= self.omission_rate < 1:
            raise ValueError(f"sat.omission_rate must be in [0, 1), got {self.omission_rate}")
        if not 0 <= self.lors_frac < 1:
            raise ValueError(f"sat.lors_frac must be in [0, 1), got {self.lors_frac}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"sat.warmup_frac must be in [0, 1), got {self.warmup_frac}")
        for knob in ("lors_rungs", "subsample", "channel_multiple"):
            if getattr(self, knob) < 1:
                raise ValueError(f"sat.{knob} must be >= 1, got {getattr(self, knob)}")
        if not (self.omit_mlp or self.omit_heads):
            raise ValueError("sat.omit_mlp and sat.omit_heads are both false: nothing to omit (use --method dense)")


# ---------------------------------------------------------------------------- schedule, counts, selection


def omission_rate(cfg: SATConfig, step: int, total_steps: int) -> float:
    """r(step): 0 during the dense warm-up, then the schedule over the remaining S' steps (sat.md §4)."""
    t0 = round(cfg.warmup_frac * total_steps)
    if step < t0:
        return 0.0
    tau, span = step - t0, max(total_steps - t0, 1)
    if cfg.schedule == "constant":
        return cfg.omission_rate
    if cfg.schedule == "linear":
        return cfg.omission_rate * max(0.0, 1.0 - tau / span)
    t1 = cfg.lors_frac * span
    if tau < t1:
        return cfg.omission_rate
    rung = min(math.floor((tau - t1) * cfg.lors_rungs / (span - t1)), cfg.lors_rungs - 1)
    return cfg.omission_rate * (1.0 - (rung + 1) / cfg.lors_rungs)


def kept_count(n: int, rate: float, multiple: int = 1) -> int:
    """k = n - round(r·n) (half up), rounded up to a multiple, clamped to [1, n]."""
    k = n - math.floor(rate * n + 0.5)
    return max(1, min(n, math.ceil(k / multiple) * multiple))


def normalize(scores: torch.Tensor, norm: str) -> torch.Tensor:
    """Scale-free scores, so that one temperature means the same for every layer and metric [I].

    scores (..., n): each row on its own. Degenerate rows (all zero) become uniform; torch.where instead of an
    `if` keeps it on the device without a host sync."""
    s = scores.float()
    if norm == "max":
        top = s.amax(-1, keepdim=True)
        return torch.where(top > 0, s / top, 1.0)
    if norm == "minmax":
        lo = s.amin(-1, keepdim=True)
        span = s.amax(-1, keepdim=True) - lo
        return torch.where(span > 0, (s - lo) / span, 1.0)
    total = s.sum(-1, keepdim=True)
    return torch.where(total > 0, s / total, 1.0 / s.shape[-1])


def select_kept(
    scores: torch.Tensor, k: int, selection: str = "sample", temperature: float = 0.05, norm: str = "max",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """k sorted unique indices per row: top-k of normalized scores, or k draws without replacement from
    softmax(s̃/T). scores (..., n) -> (..., k).

    Sampling is Gumbel-top-k (topk of s̃/T + Gumbel noise), the same distribution as
    torch.multinomial(softmax(s̃/T), k, replacement=False), in fp32 on the scores' device (the generator must be
    on that device too): fixed k, no host sync.
    """
    n = scores.shape[-1]
    if k >= n:
        return torch.arange(n, device=scores.device).expand(scores.shape)
    keys = normalize(scores, norm)
    if selection == "sample":
        noise = torch.empty(keys.shape, dtype=torch.float32, device=keys.device).exponential_(generator=generator)
        keys = keys / temperature - noise.log()  # -log(Exp(1)) is Gumbel(0, 1)
    return keys.topk(k, dim=-1).indices.sort(dim=-1).values


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def _jaccard(a: torch.Tensor, b: torch.Tensor, n: int) -> float:
    ma, mb = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    ma[a.cpu()], mb[b.cpu()] = True, True
    return (ma & mb).sum().item() / max((ma | mb).sum().item(), 1)


# ---------------------------------------------------------------------------- scoring (runs inside the forward)


def _reduce_into(stat: torch.Tensor, act: torch.Tensor, dims: tuple[int, ...], aggregation: str) -> None:
    """Fold |activations| into the running per-channel statistic (sums of squares / of |a| / max |a|)."""
    a = act.float()
    if aggregation == "max":
        stat.copy_(torch.maximum(stat, a.abs().amax(dims)))
    else:
        stat.add_((a * a if aggregation == "l2" else a.abs()).sum(dims))


@torch.no_grad()
def _observe_mlp(mod: SlicedMLP, x: torch.Tensor, metric: str, aggregation: str, stride: int, then=None) -> None:
    xs = x.detach().reshape(-1, x.shape[-1])[::stride]  # (n/stride, d)
    if metric == "wanda":
        _reduce_into(mod.stat, xs, (0,), "l2")
    else:
        _reduce_into(mod.stat, mod.gelu(mod.c_fc(xs)), (0,), aggregation)
    if then is not None:
        then(mod)


@torch.no_grad()
def _observe_attn(mod: SlicedAttention, x: torch.Tensor, metric: str, aggregation: str, stride: int,
                  then=None) -> None:
    xs = x.detach()[::stride]  # whole sequences: attention is causal over T
    if metric == "wanda":
        _reduce_into(mod.stat, xs.reshape(-1, xs.shape[-1]), (0,), "l2")
    else:
        B, T, C = xs.shape
        q, k, v = (t.view(B, T, mod.n_head, mod.head_dim).transpose(1, 2) for t in mod.c_attn(xs).split(C, dim=2))
        _reduce_into(mod.stat, mod.attend(q, k, v), (0, 2, 3), aggregation)  # o_h: (B, nh, T, hs) -> (nh,)
    if then is not None:
        then(mod)


# ---------------------------------------------------------------------------- the method


@dataclass(eq=False)
class _Layer:
    name: str  # "h.3.mlp" / "h.3.attn"
    index: int  # position in the layer list: part of the sampling seed
    module: SlicedMLP | SlicedAttention
    n: int  # channels or heads
    hooks: dict = field(default_factory=dict)  # scoring hooks for variant predict / observe
    row: int = 0  # position in its group

    @property
    def is_mlp(self) -> bool:
        return isinstance(self.module, SlicedMLP)


@dataclass(eq=False)
class _Group:
    """All layers of one kind (MLP or attention): same n and k, so one (L, ·) tensor holds their statistics and one
    topk selects for all of them."""

    layers: list[_Layer]
    stat: torch.Tensor  # (L, width); layers[i].module.stat is the view stat[i]
    kept: torch.Tensor | None = None  # (L, k) on the device; the modules hold its rows (and rows/cols for heads)
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    pos: torch.Tensor | None = None  # MLPs: (L, 4d) positions(kept), where the sliced backward gathers from


class SAT(Method):
    name = "sat"
    Config = SATConfig

    def __init__(self, cfg: SATConfig, model_cfg: GPTConfig, total_steps: int, seed: int = 0):
        super().__init__(cfg, model_cfg, total_steps, seed)
        self.layers: list[_Layer] = []
        self.groups: dict[bool, _Group] = {}  # is_mlp -> its layers
        self.rate = 0.0
        self.step = -1
        self.micro: dict[str, int] = {}  # observe: micro-batches selected so far this step, per layer
        self.k_mlp, self.k_head = 4 * model_cfg.n_embd, model_cfg.n_head
        self.kept: dict[str, torch.Tensor] = {}  # the kept sets of this step (device), for metrics and checkpoints
        self.prev: dict[str, torch.Tensor] = {}
        self.scores: dict[str, torch.Tensor] = {}  # the scores they were drawn from (topk_overlap, in metrics)
        self.active: dict[bool, torch.Tensor] = {}  # lazy: union of kept sets over this step's micro-batches
        self.observing = False  # this step's forward collects statistics for the next step's selection
        self.has_stats = False
        self._generators: dict[torch.device, torch.Generator] = {}
        self._saved: list[tuple] = []

    @property
    def needs_data(self) -> bool:
        return self.cfg.metric != "magnitude"

    def attach(self, model: nn.Module) -> nn.Module:
        if self.cfg.omit_mlp:
            swap_modules(model, select_modules(model, ["transformer.h.*.mlp"], MLP), lambda n, m: SlicedMLP(m))
        if self.cfg.omit_heads:
            names = select_modules(model, ["transformer.h.*.attn"], CausalSelfAttention)
            swap_modules(model, names, lambda n, m: SlicedAttention(m))
        for name, mod in model.named_modules():
            if isinstance(mod, SlicedMLP | SlicedAttention):
                n = mod.c_fc.out_features if isinstance(mod, SlicedMLP) else mod.n_head
                fn = _observe_mlp if isinstance(mod, SlicedMLP) else _observe_attn
                knobs = dict(metric=self.cfg.metric, aggregation=self.cfg.aggregation)
                hooks = {"predict": functools.partial(fn, stride=self.cfg.subsample, **knobs),
                         "observe": functools.partial(fn, stride=1, then=self._observed, **knobs)}
                self.layers.append(_Layer(name.removeprefix("transformer."), len(self.layers), mod, n, hooks))
        for is_mlp in (True, False):
            layers = [layer for layer in self.layers if layer.is_mlp == is_mlp]
            if not layers:
                continue
            mod = layers[0].module
            width = mod.c_fc.in_features if is_mlp else mod.n_embd
            stat = torch.zeros(len(layers), width if self.cfg.metric == "wanda" else layers[0].n,
                               device=next(mod.parameters()).device)
            for row, layer in enumerate(layers):
                layer.row, layer.module.stat = row, stat[row]
            self.groups[is_mlp] = _Group(layers, stat)
        return model

    # ---- selection

    def _k(self, layer: _Layer) -> int:
        return self.k_mlp if layer.is_mlp else self.k_head

    def _scores(self, layer: _Layer) -> torch.Tensor:
        """Per-channel (per-head) importance, fp32, on the parameters' device (sat.md §2)."""
        mod, cfg = layer.module, self.cfg
        if layer.is_mlp:
            w1, w2 = mod.c_fc.weight.detach().float(), mod.c_proj.weight.detach().float()
            if cfg.metric == "maxip":
                return mod.stat.sqrt() if cfg.aggregation == "l2" else mod.stat.clone()
            s = w1.abs() @ mod.stat.sqrt() if cfg.metric == "wanda" else w1.abs().sum(1)
            return s + w2.abs().sum(0) if cfg.metric == "magnitude" and cfg.magnitude_w2 else s
        nh, hd = mod.n_head, mod.head_dim
        if cfg.metric == "maxip":
            return mod.stat.sqrt() if cfg.aggregation == "l2" else mod.stat.clone()
        wa = mod.c_attn.weight.detach().float().abs()  # (3d, d): q, k, v row blocks
        rows = wa @ mod.stat.sqrt() if cfg.metric == "wanda" else wa.sum(1)
        s = rows.view(3, nh, hd).sum((0, 2))
        if cfg.metric == "magnitude" and cfg.magnitude_w2:
            s = s + mod.c_proj.weight.detach().float().abs().sum(0).view(nh, hd).sum(1)
        return s

    def _stat(self, layers: list[_Layer]) -> torch.Tensor:
        """(L, width) statistics of `layers`: their group's tensor itself, or one row of it (observe)."""
        group = self.groups[layers[0].is_mlp]
        return group.stat if len(layers) == len(group.layers) else layers[0].module.stat[None]

    def _group_scores(self, layers: list[_Layer]) -> torch.Tensor:
        """(L, n) scores of layers of one kind; maxip reads them straight off the statistics, no per-layer ops."""
        if self.cfg.metric != "maxip":
            return torch.stack([self._scores(layer) for layer in layers])
        stat = self._stat(layers)
        return stat.sqrt() if self.cfg.aggregation == "l2" else stat.clone()

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device].manual_seed(seed)

    def _select(self, layers: list[_Layer], micro: int = 0) -> None:
        """Choose and install the kept sets of `layers` (all of one kind: the whole group, or one layer for
        observe) from their current scores; reset their statistics. Device-only: no host sync."""
        stat = self._stat(layers)
        if self.needs_data and dist.is_available() and dist.is_initialized():
            mx = self.cfg.metric == "maxip" and self.cfg.aggregation == "max"
            dist.all_reduce(stat, op=dist.ReduceOp.MAX if mx else dist.ReduceOp.SUM)
        scores = self._group_scores(layers)
        k = self._k(layers[0])
        seed = _seed(self.seed, self.step, tuple(layer.index for layer in layers), micro)
        kept = select_kept(scores, k, self.cfg.selection, self.cfg.temperature, self.cfg.norm,
                           self._generator(scores.device, seed))  # (L, k)
        stat.zero_()
        for i, layer in enumerate(layers):  # views only, no device work
            self.kept[layer.name], self.scores[layer.name] = kept[i], scores[i]
        group = self.groups[layers[0].is_mlp]
        if layers[0].is_mlp in self.active:
            active = self.active[layers[0].is_mlp]
            active = active if len(layers) == len(group.layers) else active[layers[0].row][None]
            active.scatter_(1, kept, True)
        if len(layers) < len(group.layers):
            layers[0].module.set_kept(kept[0].clone())  # the module's buffer is rewritten in place later
            return
        if group.kept is None or group.kept.shape != kept.shape:  # a new rung: fresh buffers, bound once
            group.kept = kept.clone()
            group.rows, group.cols = (None, None) if layers[0].is_mlp else \
                head_slices(group.kept, layers[0].module.n_head, layers[0].module.head_dim)
            group.pos = positions(group.kept, layers[0].n) if layers[0].is_mlp else None
            for layer in layers:
                args = (group.kept[layer.row], group.pos[layer.row]) if layer.is_mlp else \
                    (group.kept[layer.row], group.rows[layer.row], group.cols[layer.row])
                layer.module.set_kept(None)
                layer.module.set_kept(*args)
            return
        group.kept.copy_(kept)
        if layers[0].is_mlp:
            group.pos.copy_(positions(kept, layers[0].n))
        else:
            rows, cols = head_slices(kept, layers[0].module.n_head, layers[0].module.head_dim)
            group.rows.copy_(rows)
            group.cols.copy_(cols)

    @torch.compiler.disable
    def _observed(self, mod: nn.Module) -> None:
        """variant=observe: the micro-batch's statistics are in; select for it now.

        Kept out of torch.compile: selection reads host state that changes every call (step, micro-batch, seed) and
        re-seeds a torch.Generator, so tracing it recompiled on every micro-batch until dynamo's cache limit sent
        the frames back to eager; disabled, it is one graph break per sliced layer, the same graphs every step."""
        layer = next(layer for layer in self.layers if layer.module is mod)
        self._select([layer], self.micro[layer.name])
        self.micro[layer.name] += 1

    def on_step_start(self, step: int) -> None:
        cfg = self.cfg
        self.step, self.micro = step, {layer.name: 0 for layer in self.layers}
        self.prev = dict(self.kept)
        rate = omission_rate(cfg, step, self.total_steps)
        if rate > 0 and self.needs_data and cfg.variant == "predict" and not self.has_stats:
            rate = 0.0  # nothing observed yet: run dense once and observe
        self.rate = rate
        self.k_mlp = kept_count(4 * self.model_cfg.n_embd, rate, cfg.channel_multiple)
        self.k_head = kept_count(self.model_cfg.n_head, rate)
        sparse = {is_mlp: g for is_mlp, g in self.groups.items() if self._k(g.layers[0]) < g.layers[0].n}
        self.active = {is_mlp: torch.zeros(len(g.layers), g.layers[0].n, dtype=torch.bool, device=g.stat.device)
                       for is_mlp, g in sparse.items()} if cfg.optimizer_mode == "lazy" else {}
        self.kept, self.scores = {}, {}
        for is_mlp, group in self.groups.items():
            if is_mlp not in sparse and group.kept is not None:
                group.kept = group.rows = group.cols = group.pos = None
                for layer in group.layers:
                    layer.module.set_kept(None)  # the exact dense path
        observe_now = bool(sparse) and self.needs_data and cfg.variant == "observe"
        if not observe_now:
            for group in sparse.values():
                self._select(group.layers)
        next_rate = omission_rate(cfg, step + 1, self.total_steps) if step + 1 < self.total_steps else 0.0
        self.observing = self.needs_data and cfg.variant == "predict" and next_rate > 0
        for is_mlp, group in self.groups.items():
            # the hook objects are built once in attach: torch.compile guards on their identity
            hook = "observe" if observe_now and is_mlp in sparse else "predict" if self.observing else None
            for layer in group.layers:
                layer.module.hook = None if hook is None else layer.hooks[hook]
            if hook is not None:
                group.stat.zero_()
        self.has_stats = self.observing

    def flop_profile(self, step: int) -> FlopProfile:
        """Omitted channels/heads cost nothing forward or backward; the scoring passes are counted too."""
        profile = FlopProfile(linear={}, attn={})
        observe_now = self.cfg.variant == "observe" and self.needs_data
        maxip = self.cfg.metric == "maxip"
        for layer in self.layers:
            p = self._k(layer) / layer.n
            # scoring: maxip runs the dense first projection on the observed tokens (all of them for "observe",
            # 1/subsample for "predict", approximating the sequence stride of heads by the same fraction)
            seen = (1.0 if observe_now and p < 1 else 1.0 / self.cfg.subsample if self.observing else 0.0) * maxip
            i = int(layer.name.split(".")[1])
            prefix = f"transformer.{layer.name}"
            first, second = (f"{prefix}.c_fc", f"{prefix}.c_proj") if layer.is_mlp else \
                (f"{prefix}.c_attn", f"{prefix}.c_proj")
            profile.linear[first] = LinearCost(p + seen, p, p)
            profile.linear[second] = LinearCost(p, p, p)
            if not layer.is_mlp:
                profile.attn[i] = p + seen / 3  # forward is a third of attention's fwd+bwd work
        return profile

    # ---- optimizer modes

    def _omitted_slices(self, layer: _Layer) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        # lazy mode only: the union over micro-batches has a data-dependent size, so this syncs once per layer
        om = (~self.active[layer.is_mlp][layer.row]).nonzero().flatten()
        mod = layer.module
        if layer.is_mlp:
            rows = cols = om
            first, second = mod.c_fc, mod.c_proj
        else:
            rows, cols = head_slices(om, mod.n_head, mod.head_dim)
            first, second = mod.c_attn, mod.c_proj
        slices = [(first.weight, 0, rows), (second.weight, 1, cols)]
        return slices + ([(first.bias, 0, rows)] if first.bias is not None else [])

    def before_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        self._saved = []
        if self.cfg.optimizer_mode != "lazy":
            return True
        for layer in self.layers:
            if layer.is_mlp not in self.active:
                continue
            for p, dim, idx in self._omitted_slices(layer):
                state = {key: v.index_select(dim, idx) for key, v in optimizer.state.get(p, {}).items()
                         if torch.is_tensor(v) and v.shape == p.shape}
                self._saved.append((p, dim, idx, p.detach().index_select(dim, idx), state))
        return True

    @torch.no_grad()
    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """lazy: put back the omitted rows and their moments (fresh moments of omitted rows are exactly 0)."""
        for p, dim, idx, rows, state in self._saved:
            p.index_copy_(dim, idx, rows)
            for key, v in state.items():
                optimizer.state[p][key].index_copy_(dim, idx, v)
        self._saved = []

    def eval_mode(self, model: nn.Module) -> nn.Module:
        """Evaluation is dense [I]: the sliced modules run the dense code whenever model.eval() is set."""
        return model

    # ---- logging and checkpoints

    def metrics(self) -> dict[str, float]:
        out = {"sat/omission_rate": float(self.rate)}
        overlap: dict[bool, list[float]] = {True: [], False: []}
        topk: dict[bool, list[float]] = {True: [], False: []}
        for layer in self.layers:
            out[f"sat/kept/{layer.name}"] = float(self._k(layer))
            cur, prev = self.kept.get(layer.name), self.prev.get(layer.name)
            if cur is not None and prev is not None:
                overlap[layer.is_mlp].append(_jaccard(cur, prev, layer.n))
            if layer.name in self.scores:
                best = select_kept(self.scores[layer.name], cur.numel(), "topk", norm=self.cfg.norm)
                topk[layer.is_mlp].append(_jaccard(cur, best, layer.n))
        for is_mlp, kind in ((True, "mlp"), (False, "attn")):
            if overlap[is_mlp]:
                out[f"sat/overlap/{kind}"] = sum(overlap[is_mlp]) / len(overlap[is_mlp])
            if topk[is_mlp]:
                out[f"sat/topk_overlap/{kind}"] = sum(topk[is_mlp]) / len(topk[is_mlp])
        return out

    def state_dict(self) -> dict[str, Any]:
        """Statistics gathered for the next selection, kept sets and flags. The sampling generators are re-seeded
        from (seed, step, layer, micro) at every draw, so they carry no state."""
        return {
            "step": self.step,
            "has_stats": self.has_stats,
            "kept": {k: v.cpu().clone() for k, v in self.kept.items()},
            "stats": {layer.name: layer.module.stat.detach().cpu().clone() for layer in self.layers},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.has_stats = state["step"], state["has_stats"]
        self.kept = {k: v.clone() for k, v in state["kept"].items()}
        for layer in self.layers:
            layer.module.stat.copy_(state["stats"][layer.name])
