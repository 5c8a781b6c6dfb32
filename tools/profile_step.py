"""Profile the trainer's step of one or more methods (CUDA kernels and host ops), to find where time goes.

    python -m tools.profile_step --config configs/gpt2.toml --methods dense,static --set train.batch_size=16
"""

from __future__ import annotations

import sys

import torch
import typer
from torch.profiler import ProfilerActivity, profile

from bench import RandomTokens
from core.config import load_config
from train import setup, train_step

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    config: str = typer.Option(None, "--config"),
    methods: str = "dense",
    set_: list[str] = typer.Option([], "--set"),
    at: int = typer.Option(300, help="first step (inside the sparse phase)"),
    warmup: int = 5,
    rows: int = 25,
) -> None:
    """Print the top CUDA kernels and host ops of one profiled step per method."""
    for name in methods.split(","):
        cfg = load_config(config, name, list(set_))
        run = setup(cfg, data=RandomTokens(50257, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed))
        for s in range(at, at + warmup):
            train_step(run, s)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for s in range(at + warmup, at + warmup + 2):
                train_step(run, s)
            torch.cuda.synchronize()
        print(f"===== {name}: top by CUDA time (2 steps)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))
        print(f"===== {name}: top by CPU time")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=70))
        del run
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(app())
