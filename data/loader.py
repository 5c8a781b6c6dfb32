"""Random training windows from the uint16 memmaps written by data.prepare.

A batch is a pure function of (seed, split, step, micro-step, rank): no loader state to checkpoint, a resumed run
sees exactly the batches the uninterrupted run would have, every method sees the same data order for the same
seed, and DDP ranks draw different windows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

SPLITS = {"train": 0, "val": 1}


class TokenData:
    def __init__(self, path: str | Path, block_size: int, batch_size: int, seed: int, rank: int = 0):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"no prepared dataset at {self.path} (missing meta.json); run `python -m data.prepare <source> "
                f"--out {self.path}` first"
            )
        self.meta = json.loads(meta_file.read_text())
        self.block_size, self.batch_size, self.seed, self.rank = block_size, batch_size, seed, rank
        self.splits = {s: np.memmap(self.path / f"{s}.bin", dtype=np.uint16, mode="r") for s in SPLITS}
        for s, arr in self.splits.items():
            if len(arr) <= block_size + 1:
                raise ValueError(f"{self.path}/{s}.bin has {len(arr)} tokens, fewer than block_size+2={block_size + 2}")

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def batch(self, split: str, step: int, micro: int = 0, device: str | torch.device = "cpu"):
        """(x, y) of shape (batch_size, block_size), int64; y is x shifted by one token."""
        data = self.splits[split]
        rng = np.random.default_rng([self.seed, SPLITS[split], step, micro, self.rank])
        ix = rng.integers(0, len(data) - self.block_size - 1, size=self.batch_size)
        buf = np.stack([data[i : i + self.block_size + 1] for i in ix]).astype(np.int64)
        xy = torch.from_numpy(buf)
        if torch.device(device).type == "cuda":
            xy = xy.pin_memory().to(device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]
