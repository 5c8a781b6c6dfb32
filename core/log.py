"""One metrics record per logged step: always to <out_dir>/metrics.jsonl, to wandb when asked, and as a line on
the terminal. Only rank 0 logs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console

METRICS_NAME = "metrics.jsonl"


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the code that ran, so a log names what produced it."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return {"git_sha": None, "git_dirty": None}
    return {"git_sha": sha.stdout.strip() or None, "git_dirty": bool(dirty.stdout.strip())}


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    def __init__(
        self,
        out_dir: Path,
        enabled: bool,
        resume_step: int | None,
        wandb_cfg: dict[str, Any] | None,
        run_config: dict[str, Any],
        console: Console,
    ):
        self.enabled, self.console, self.wandb = enabled, console, None
        self.path = out_dir / METRICS_NAME
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        else:  # drop records the killed run wrote after its last checkpoint: they will be written again
            kept = [r for r in read_metrics(out_dir) if r.get("step", -1) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.fh = open(self.path, "a")
        if wandb_cfg is not None:
            self.wandb = self._init_wandb(out_dir, wandb_cfg, run_config)

    @staticmethod
    def _init_wandb(out_dir: Path, wandb_cfg: dict[str, Any], run_config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("--wandb needs `pip install wandb` (WANDB_MODE=offline works without network)") from None
        id_file = out_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        return wandb.init(
            project=wandb_cfg["project"],
            name=wandb_cfg["name"] or out_dir.name,
            id=run_id,
            resume="allow",
            dir=str(out_dir),
            config=run_config,
        )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.fh.write(json.dumps(clean) + "\n")
        self.fh.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.fh.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_flops(x: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def env_summary() -> dict[str, Any]:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "host": os.uname().nodename}
    if torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name()
    return info
