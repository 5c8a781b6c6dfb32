"""Checkpoints: one file, <out_dir>/ckpt.pt, written atomically (temp file + fsync + rename), so a run killed
while saving leaves the previous checkpoint intact and a half-written file is never loaded."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_NAME = "ckpt.pt"


def ckpt_path(path: str | Path) -> Path:
    p = Path(path)
    return p / CKPT_NAME if p.is_dir() or p.suffix != ".pt" else p


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    p = ckpt_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}")
    try:
        return torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:  # a foreign or corrupt file: say which, without a traceback
        raise ValueError(f"{p} is not a loadable checkpoint ({type(e).__name__}: {e})") from None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def clean_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the prefixes torch.compile ('_orig_mod.') and DDP ('module.') add to parameter names."""
    out = {}
    for k, v in sd.items():
        for prefix in ("_orig_mod.", "module."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out
