"""Swap modules of a model by qualified name (torchao's walk), keeping parameter names and identities."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

import torch.nn as nn


def select_modules(model: nn.Module, patterns: Iterable[str], kind: type = nn.Linear) -> dict[str, nn.Module]:
    """Modules of type `kind` whose qualified name matches any fnmatch pattern, in model order."""
    patterns = list(patterns)
    return {
        n: m for n, m in model.named_modules() if isinstance(m, kind) and any(fnmatch.fnmatch(n, p) for p in patterns)
    }


def swap_modules(model: nn.Module, names: Iterable[str], make: Callable[[str, nn.Module], nn.Module]) -> nn.Module:
    """Replace each named submodule by make(name, old). The new module should adopt old's parameters."""
    for name in list(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, getattr(parent, child)))
    return model
