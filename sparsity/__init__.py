"""Sparsity methods behind one interface (see sparsity/base.py) and their registry.

The registry maps a `--method` name to "module:Class"; modules are imported only when chosen, so a method's
heavy dependencies (Triton kernels) never load for the others.
"""

from __future__ import annotations

import importlib
from typing import Any

from sparsity.base import Dense, Method

REGISTRY: dict[str, str] = {
    "dense": "sparsity.base:Dense",
    "mst": "sparsity.mst:MST",
    "rigl": "sparsity.mst:RigL",
    "static": "sparsity.mst:Static",
    "2of4": "sparsity.semi24:Semi24",
    "sat": "sparsity.sat:SAT",
}


def method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def method_config_class(name: str) -> type[Any]:
    return method_class(name).Config


__all__ = ["REGISTRY", "Dense", "Method", "method_class", "method_config_class"]
