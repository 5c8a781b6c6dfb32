"""Typed run configuration: dataclasses with documented defaults, TOML files holding only the diffs, and
`--set section.key=value` overrides coerced by field type.

A config file is TOML with sections [model], [train], [data], [log] and one section per sparsity method named
after it ([mst], [2of4], [sat], ...); the top-level key `method` picks the method. Unknown sections, unknown
keys and values of the wrong type raise `ConfigError` with one line naming the valid choices.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.gpt import GPTConfig
from sparsity import REGISTRY, method_config_class


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    out_dir: str = "out/run"
    """Run folder: ckpt.pt, metrics.jsonl, config.json, plots."""
    seed: int = 1337
    steps: int = 1000
    """Optimizer steps of the whole run (schedules of the methods are fractions of it)."""
    batch_size: int = 12
    """Sequences per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each process; tokens/step = batch_size·block_size·grad_accum·world."""
    lr: float = 6e-4
    min_lr: float = 6e-5
    """Cosine decay ends here."""
    warmup_steps: int = 100
    """Linear LR warm-up from 0 over this many steps."""
    lr_decay_steps: int = 0
    """Step where the cosine reaches min_lr (0 = train.steps)."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    eval_interval: int = 250
    """Validation (and checkpoint) every this many steps, and at the end."""
    eval_steps: int = 20
    """Validation batches per evaluation (the same batches every time)."""
    log_interval: int = 10
    """Write a metrics record every this many steps (the progress bar updates every step)."""
    ckpt_interval: int = 0
    """Checkpoint every this many steps (0 = at every evaluation)."""
    dtype: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16 | float16."""
    compile: bool = False
    """torch.compile the model (CUDA only; ignored on CPU)."""
    compile_mode: str = "default"
    """torch.compile mode: default | reduce-overhead (CUDA-graph replays of forward and backward: no host work per op,
    worth it where a step is host-bound) | max-autotune-no-cudagraphs."""
    compile_scope: str = "model"
    """model (one torch.compile of the whole model) | blocks (each transformer block and the head compiled as its
    own region: the blocks share one compiled code, so a cold compile, and each recompile a method's schedule
    causes, covers one block instead of all of them)."""
    prewarm_kernels: bool = True
    """CUDA: compile the method's Triton kernels in child processes while the run compiles its model (ours; a cold
    Triton cache cost a block-MST run ~32 s in its first block-sparse steps). Results are the same either way."""
    loss_kernel: str = "ref"
    """The training loss (kernels/cross_entropy.py): ref (F.cross_entropy on fp32 logits, as inductor compiles it)
    | triton (two streaming kernels, CUDA) | auto (triton on CUDA, else ref). The same loss either way, to rounding.
    ref is the default until the Triton kernels have been timed on a GPU (results/raw/h200-s36.sh PART=kernel)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    init_from: str = ""
    """Start from weights instead of random init: an OpenAI size (gpt2, gpt2-medium, ...), a HF folder or one of
    our run folders / ckpt.pt files. Optimizer and schedule start fresh (continual pretraining)."""

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "eval_interval", "eval_steps", "log_interval")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "warmup_steps", "lr_decay_steps", "ckpt_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"train.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune-no-cudagraphs"):
            modes = "default, reduce-overhead or max-autotune-no-cudagraphs"
            raise ValueError(f"train.compile_mode must be {modes}, got {self.compile_mode!r}")
        if self.compile_scope not in ("model", "blocks"):
            raise ValueError(f"train.compile_scope must be model or blocks, got {self.compile_scope!r}")
        if self.loss_kernel not in ("auto", "triton", "ref"):
            raise ValueError(f"train.loss_kernel must be auto, triton or ref, got {self.loss_kernel!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"train.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class DataConfig:
    dir: str = "tokens/stdlib-byte"
    """Folder written by `python -m data.prepare` (train.bin, val.bin, meta.json)."""


@dataclass
class LogConfig:
    wandb: bool = False
    """Also log to Weights & Biases (WANDB_MODE=offline works without network)."""
    wandb_project: str = "sparse-pretrain"
    wandb_run_name: str = ""
    """Defaults to the run folder's name."""


CORE_SECTIONS: dict[str, type] = {"model": GPTConfig, "train": TrainConfig, "data": DataConfig, "log": LogConfig}


@dataclass
class Config:
    method: str = "dense"
    model: GPTConfig = field(default_factory=GPTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)
    method_cfg: Any = None
    """The chosen method's own Config dataclass (section [<method>])."""

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method}
        for name in CORE_SECTIONS:
            d[name] = dataclasses.asdict(getattr(self, name))
        d[self.method] = dataclasses.asdict(self.method_cfg) if self.method_cfg is not None else {}
        return d


def _union_args(tp: Any) -> list[Any]:
    """The member types of a union annotation (without None), or [tp]."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _coerce_one(raw: str, tp: Any) -> Any:
    origin = typing.get_origin(tp) or tp
    if tp is bool:
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(raw)
    if tp in (int, float):
        return tp(raw)
    if tp is str:
        return raw
    if origin in (list, dict, tuple):
        value = json.loads(raw)
        if not isinstance(value, list | dict):
            raise ValueError(raw)
        return value
    return raw


def _coerce(raw: str, tp: Any, key: str) -> Any:
    """Parse a command-line string as the field's type: int, float, bool, str, lists/dicts as JSON, unions in
    the order written (so `float | str` reads '0.1' as a number and 'auto' as text), 'none' for optionals."""
    if _optional(tp) and raw.lower() in ("none", "null"):
        return None
    for member in _union_args(tp):
        try:
            return _coerce_one(raw, member)
        except (ValueError, json.JSONDecodeError):
            continue
    names = " | ".join(getattr(m, "__name__", str(m)) for m in _union_args(tp))
    raise ConfigError(f"{key}: cannot read {raw!r} as {names}")


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Type-check a TOML value against the field type (ints are accepted for floats)."""
    if value is None and _optional(tp):
        return None
    for member in _union_args(tp):
        origin = typing.get_origin(member) or member
        if member is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if member is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if member is bool and isinstance(value, bool):
            return value
        if member not in (float, int, bool) and (not isinstance(origin, type) or isinstance(value, origin)):
            return value
    names = " | ".join(getattr(m, "__name__", str(m)) for m in _union_args(tp))
    raise ConfigError(f"{key}: expected {names}, got {value!r}")


def _build(cls: type, section: str, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown key {section}.{key}; valid keys: {', '.join(names) or '(none)'}")
    kwargs = {k: _check_value(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load_config(path: str | Path | None, method: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- TOML file <- --method <- --set overrides. Raises ConfigError (one line) on any bad input."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML ({e})") from None
    method = method or raw.pop("method", "dense")
    raw.pop("method", None)
    if method not in REGISTRY:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(REGISTRY)}")
    sections: dict[str, dict[str, Any]] = {}
    for name, values in raw.items():
        if name not in CORE_SECTIONS and name not in REGISTRY:
            valid = ", ".join([*CORE_SECTIONS, *REGISTRY])
            raise ConfigError(f"unknown config section [{name}]; valid sections: {valid}")
        if not isinstance(values, dict):
            raise ConfigError(f"top-level key {name!r} must be a [section]; only 'method' is a plain key")
        sections[name] = dict(values)
    method_cls = method_config_class(method)
    classes = {**CORE_SECTIONS, method: method_cls}
    for item in overrides or []:
        key, eq, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        if section not in classes:
            hint = f" (the method is {method!r})" if section in REGISTRY else ""
            valid = ", ".join(classes)
            raise ConfigError(f"unknown config section {section!r} in --set {item!r}{hint}; valid: {valid}")
        hints = typing.get_type_hints(classes[section])
        if name not in hints:
            names = ", ".join(f.name for f in dataclasses.fields(classes[section]))
            raise ConfigError(f"unknown key {section}.{name}; valid keys: {names or '(none)'}")
        sections.setdefault(section, {})[name] = _coerce(value.strip(), hints[name], key)
    cfg = Config(method=method)
    for name, cls in CORE_SECTIONS.items():
        setattr(cfg, name, _build(cls, name, sections.get(name, {})))
    for name in sections.keys() & REGISTRY.keys() - {method}:  # other methods' sections must be valid too
        _build(method_config_class(name), name, sections[name])
    cfg.method_cfg = _build(method_cls, method, sections.get(method, {}))
    return cfg


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config saved with Config.to_dict (checkpoints, config.json)."""
    method = d.get("method", "dense")
    cfg = Config(method=method)
    for name, cls in CORE_SECTIONS.items():
        setattr(cfg, name, _build(cls, name, d.get(name, {})))
    cfg.method_cfg = _build(method_config_class(method), method, d.get(method, {}))
    return cfg
