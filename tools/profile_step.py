"""Profile the trainer's step of one or more methods (CUDA kernels and host ops), to find where time goes.

    python -m tools.profile_step --config configs/gpt2.toml --methods dense,static --set train.batch_size=16
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

import torch
import typer
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench import RandomTokens, for_method
from core.config import load_config
from train import setup, train_step

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    config: str = typer.Option(None, "--config"),
    methods: str = "dense",
    set_: list[str] = typer.Option([], "--set"),
    at: int = typer.Option(300, help="first step (inside the sparse phase). MST's masks change only at update "
                           "steps (every mst.delta_t), so start at one, as the default 300 is: the warm-up then "
                           "installs the scheduled masks (from 304, say, the steps would run the dense start's)"),
    warmup: int = 5,
    rows: int = 25,
) -> None:
    """Print the top CUDA kernels and host ops of one profiled step per method."""
    for name in methods.split(","):
        cfg = load_config(config, name, for_method(list(set_), name))
        run = setup(cfg, data=RandomTokens(50257, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed))
        for s in range(at, at + warmup):
            train_step(run, s)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(at + warmup, at + 2 * warmup):
            train_step(run, s)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) / warmup * 1e3  # unprofiled: the profiler slows the host down
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for s in range(at + 2 * warmup, at + 2 * warmup + 2):
                train_step(run, s)
            torch.cuda.synchronize()
        kernels_table(prof, name, wall_ms, rows)
        print(f"===== {name}: top by CUDA time (2 steps)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))
        print(f"===== {name}: top by CPU time")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=70))
        del run
        torch.cuda.empty_cache()


def kernels_table(prof, name: str, wall_ms: float, rows: int) -> None:
    """GPU kernels alone (no wrapper ops), summed per name, and the GPU's busy time per step against the step's
    wall time: busy well under wall means the step waits on the host."""
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            per_name[e.name][0] += e.device_time_total / 2e3  # ms per step (2 profiled steps)
            per_name[e.name][1] += 1
    busy = sum(ms for ms, _ in per_name.values())
    print(f"===== {name}: step wall {wall_ms:.2f} ms (unprofiled), GPU kernels busy {busy:.2f} ms/step "
          f"({busy / wall_ms:.0%} of wall)")
    print(f"{'ms/step':>8} {'calls':>6}  kernel")
    for kname, (ms, calls) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"{ms:8.3f} {calls // 2:6d}  {kname[:150]}")


if __name__ == "__main__":
    sys.exit(app())
