"""Total training FLOPs of a DST run (MST, RigL, static) and the dense GPT-2 that costs the same: the paper's `tiny`
baseline (mst.md §5, Table 8 [P?]).

    python -m tools.flop_match --config configs/mst-gpt2.toml [--set mst.sparsity=0.95] [--out configs/tiny-gpt2.toml]

The run's cost is summed step by step with model.flops (mst.md §7): sparse GEMMs at the realised per-layer
densities, the dense weight gradient on topology-update steps, attention at the HSA mask's density while it is on.
Mixed-Growing lands exactly on its per-layer targets, so the densities are known without training. The tiny model
then searches width (n_embd a multiple of 64, n_head = n_embd / 64) and depth for a dense GPT-2 whose total over the
same tokens is within 2%; among those it takes the one closest to GPT-2 124M's aspect ratio (n_embd / n_layer = 64),
then the closest in FLOPs.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from model.flops import dense_flops_per_token, train_flops_per_token
from model.gpt import GPTConfig
from sparsity.mst import MST, DSTConfig, DSTSchedule, RigL, Static, plan_profile

METHODS = {cls.name: cls for cls in (MST, RigL, Static)}
GPT2_ASPECT = 768 / 12  # n_embd / n_layer of GPT-2 124M
MODEL_KEYS = ("preset", "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


@dataclass
class RunConfig:
    """What the FLOP count needs from a run's TOML: the model, steps, tokens per step and the method's knobs."""

    method: str
    model: GPTConfig
    train: dict[str, Any]
    method_cfg: Any

    @property
    def steps(self) -> int:
        return int(self.train["steps"])

    @property
    def tokens_per_step(self) -> int:
        return int(self.train["batch_size"]) * int(self.train.get("grad_accum", 1)) * self.model.block_size


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def load_config(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run TOML (top-level `method`, [model], [train], [<method>]) with `section.key=value` overrides."""
    raw = tomllib.loads(Path(path).read_text())
    for item in sets:
        key, _, value = item.partition("=")
        section, _, knob = key.partition(".")
        if not knob:
            raw[section] = _parse_value(value)
        else:
            raw.setdefault(section, {})[knob] = _parse_value(value)
    method = raw.get("method", "dense")
    model = GPTConfig(**raw.get("model", {}))
    method_cfg = METHODS[method].Config(**raw.get(method, {})) if method in METHODS else None
    return RunConfig(method, model, dict(raw.get("train", {})), method_cfg)


def method_total_flops(model_cfg: GPTConfig, method_cfg: DSTConfig, steps: int, tokens_per_step: int) -> float:
    """Σ over steps of FLOPs/token × tokens/step. The profile is constant between events (topology updates and the
    step after each, HSA switches), so it is evaluated once per segment, and once per distinct state."""
    sched = DSTSchedule(method_cfg, steps)
    events = {0, steps}
    if method_cfg.delta_t > 0:
        for u in range(method_cfg.delta_t, steps, method_cfg.delta_t):
            events |= {u, u + 1}
    for frac in (method_cfg.hsa_start, method_cfg.hsa_end):
        events.add(min(steps, max(0, math.ceil(frac * steps))))
    bounds = sorted(events)
    per_token: dict[tuple[float, bool, bool], float] = {}
    total = 0.0
    for a, b in zip(bounds, bounds[1:], strict=False):
        key = (sched.mask_sparsity(a), sched.is_update(a), sched.hsa_on(a))
        if key not in per_token:
            per_token[key] = train_flops_per_token(model_cfg, plan_profile(model_cfg, method_cfg, steps, a))
        total += per_token[key] * (b - a)
    return total * tokens_per_step


def run_total_flops(cfg: RunConfig) -> float:
    """Total training FLOPs of the run a config describes (dense when its method is not a DST method)."""
    if cfg.method_cfg is None:
        return dense_flops_per_token(cfg.model) * cfg.steps * cfg.tokens_per_step
    return method_total_flops(cfg.model, cfg.method_cfg, cfg.steps, cfg.tokens_per_step)


def mst_total_flops(cfg: RunConfig) -> float:
    """Total training FLOPs of an MST (or RigL/static) run config."""
    if cfg.method_cfg is None:
        raise ValueError(f"method {cfg.method!r} is not one of {', '.join(METHODS)}")
    return run_total_flops(cfg)


def match_dense(base: GPTConfig, flops_per_token: float, tol: float = 0.02, max_layers: int = 48) -> GPTConfig:
    """Dense GPT-2 (same T, vocab, bias) with dense FLOPs/token within `tol` of `flops_per_token`."""
    found = []
    for n_layer in range(1, max_layers + 1):
        for n_embd in range(64, 64 * 64 + 1, 64):
            cand = dataclasses.replace(base, preset="", n_layer=n_layer, n_embd=n_embd, n_head=n_embd // 64)
            err = dense_flops_per_token(cand) / flops_per_token - 1.0
            if abs(err) <= tol:
                found.append((abs(math.log(n_embd / n_layer / GPT2_ASPECT)), abs(err), cand))
    if not found:
        raise ValueError(f"no dense GPT-2 within {tol:.0%} of {flops_per_token:.4g} FLOPs/token")
    return min(found, key=lambda f: f[:2])[2]


def tiny_toml(model: GPTConfig, train: dict[str, Any], source: str, sparse_total: float, dense_total: float) -> str:
    """A dense run config for `model` with the source run's [train] section (same tokens)."""
    ratio = dense_total / sparse_total
    lines = [
        f"# Tiny dense baseline (mst.md §5): FLOP-matched to {source} by `python -m tools.flop_match`.",
        f"# {source}: {sparse_total:.4g} training FLOPs; this model: {dense_total:.4g} ({ratio:.4f}x).",
        'method = "dense"',
        "",
        "[model]",
    ]
    for key in MODEL_KEYS[1:]:
        value = getattr(model, key)
        lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    lines += ["", "[train]"]
    for key, value in train.items():
        lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    return "\n".join(lines) + "\n"


app = typer.Typer(add_completion=False)


@app.command()
def main(
    config: Path = typer.Option(..., help="TOML of the MST (or RigL/static) run to match"),
    set_: list[str] = typer.Option([], "--set", help="override, section.key=value (repeatable)"),
    out: Path | None = typer.Option(None, help="write the matched dense config here (e.g. configs/tiny-gpt2.toml)"),
    tol: float = typer.Option(0.02, help="relative FLOP tolerance of the match"),
) -> None:
    run = load_config(config, set_)
    sparse_total = mst_total_flops(run)
    dense_total = dense_flops_per_token(run.model) * run.steps * run.tokens_per_step
    tiny = match_dense(run.model, sparse_total / (run.steps * run.tokens_per_step), tol)
    tiny_total = dense_flops_per_token(tiny) * run.steps * run.tokens_per_step
    print(f"{run.method}: {sparse_total:.4g} FLOPs = {sparse_total / dense_total:.4f} of dense ({dense_total:.4g})")
    print(
        f"tiny: n_layer={tiny.n_layer} n_head={tiny.n_head} n_embd={tiny.n_embd}: {tiny_total:.4g} FLOPs "
        f"({tiny_total / sparse_total - 1:+.2%} vs {run.method})"
    )
    text = tiny_toml(tiny, run.train, str(config), sparse_total, tiny_total)
    if out is None:
        print(text, end="")
    else:
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    app()
