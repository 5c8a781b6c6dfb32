"""Fast paths for sparse training, each next to a plain-PyTorch reference that is also its CPU fallback.

Every op module exposes its implementations as `IMPLS = {"ref": ..., "triton": ...}` and picks one with
`select(impls, backend)`: `auto` takes the first fast path that can run here, a backend the user named that
cannot run raises with the reason (never a silent fallback).
"""

from __future__ import annotations

import collections
import functools
import os
from collections.abc import Callable
from typing import Any

import torch

# Autotune keys this process timed itself, and those it took from another process's pick (kernels/autotune.py).
AUTOTUNE: collections.Counter[str] = collections.Counter()


def triton_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def jit(fn: Callable[..., Any]) -> Any:
    """triton.jit(fn) where Triton is installed, else fn itself: a CPU-only install still imports a kernel module
    for its reference path."""
    try:
        import triton
    except ImportError:
        return fn
    return triton.jit(fn)


@functools.cache
def pdl_capable(device: torch.device) -> bool:
    """Whether Triton kernels on `device` can be launched programmatically dependent on the kernel before them
    (griddepcontrol, sm90 and later): not in the CPU interpreter, which has no such launch."""
    if os.environ.get("TRITON_INTERPRET") == "1" or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def launch_pdl(pdl: bool) -> dict[str, bool]:
    """A Triton launch's option for programmatic dependent launch (the interpreter takes no such option)."""
    return {"launch_pdl": True} if pdl else {}


def select(impls: dict[str, Callable[..., Any]], backend: str, can_run: dict[str, Callable[[], bool]]) -> str:
    """Name of the implementation to use. impls is ordered fastest first and always has 'ref'."""
    if backend == "auto":
        return next(name for name in impls if name == "ref" or can_run.get(name, lambda: True)())
    if backend not in impls:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of: auto, {', '.join(impls)}")
    if backend != "ref" and not can_run.get(backend, lambda: True)():
        raise RuntimeError(f"kernel backend {backend!r} cannot run here (needs CUDA and Triton); use 'ref' or 'auto'")
    return backend


# One library fragment for the torch.library ops that kernels/*.py define with `define_op`; the ops live as long as
# this object, i.e. as long as the package is loaded.
_LIB = torch.library.Library("sparse_pretrain", "FRAGMENT")


def define_op(schema: str, impl: Callable[..., Any], fake: Callable[..., Any]) -> Any:
    """Define `sparse_pretrain::<schema>` with `impl` as its CPU and CUDA kernel and `fake` for tracing (shapes
    only); returns the op's default overload. No autograd: an autograd.Function that dynamo traces calls the ops."""
    name = schema.split("(")[0]
    _LIB.define(schema)
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, impl, key)
    torch.library.register_fake(f"sparse_pretrain::{name}", fake, lib=_LIB)
    return getattr(torch.ops.sparse_pretrain, name).default


# Per-call choices a compiled graph must not freeze: a module attribute (or an attribute of a callable a module
# holds) named `runtime_mode`, an int, reaches a compiled graph as an input instead of a constant dynamo guards on,
# so flipping it neither recompiles nor needs a graph of its own; CUDA-graph replays (compile_mode reduce-overhead)
# record one graph per combination of values they meet and replay it when it comes back. Only the ops it is handed
# to read it, when they run, and their schemas type it SymInt (an `int` argument makes dynamo guard on its value:
# one graph per value again). Registered when this package is imported, before anything of ours is compiled.
RUNTIME_MODE = "runtime_mode"
_RUNTIME_SOURCE = rf".*\.{RUNTIME_MODE}$"  # dynamo's source names end in the attribute: L['self']._modules[...].x


def compile_runtime_modes() -> None:
    """Make torch.compile treat every `runtime_mode` attribute as a dynamic int (a graph input)."""
    import torch.compiler.config as compiler_config

    if not hasattr(compiler_config, "dynamic_sources"):  # older torch: each mode compiles a graph of its own
        return
    sources = [s for s in compiler_config.dynamic_sources.split(",") if s]
    if _RUNTIME_SOURCE not in sources:
        compiler_config.dynamic_sources = ",".join([*sources, _RUNTIME_SOURCE])


compile_runtime_modes()
