"""Report which part of a training step makes the host wait for the GPU (a sync stalls the launch pipeline).

python -m tools.find_syncs --config configs/gpt2.toml --methods dense,static,sat
"""

from __future__ import annotations

import math
import sys
import traceback

import torch
import typer

from bench import RandomTokens
from core.config import load_config
from train import get_lr, setup, train_step

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _probe(label: str, fn):
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    except RuntimeError as e:
        frames = [
            f"{f.filename.split('/work/main/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_tb(e.__traceback__)
        ]
        print(f"  SYNC in {label}: {str(e).splitlines()[0][:80]} <- {' <- '.join(reversed(frames[-4:]))}")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@app.command()
def main(
    config: str = typer.Option(None, "--config"),
    methods: str = "dense",
    set_: list[str] = typer.Option([], "--set"),
    at: int = 300,
) -> None:
    for name in methods.split(","):
        print(f"== {name}")
        probe_method(load_config(config, name, list(set_)), at)
        torch.cuda.empty_cache()


def probe_method(cfg, at: int) -> None:
    run = setup(cfg, data=RandomTokens(50257, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed))
    for s in range(at, at + 3):
        train_step(run, s)
    torch.cuda.synchronize()
    s = at + 3
    m, opt = run.method, run.optimizer
    for g in opt.param_groups:
        g["lr"] = get_lr(s, cfg)
    _probe("on_step_start", lambda: m.on_step_start(s))
    _probe("flop_profile", lambda: m.flop_profile(s))
    x, y = run.data.batch("train", s, 0, run.device)

    def fwd_bwd():
        with run.autocast:
            _, loss = run.train_model(x, y)
        loss.backward()

    _probe("forward/backward", fwd_bwd)
    _probe("after_backward", lambda: m.after_backward(s))
    _probe("clip", lambda: torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip or math.inf))
    _probe("before_optimizer_step", lambda: m.before_optimizer_step(s, opt))
    _probe("optimizer.step", lambda: opt.step())
    _probe("after_optimizer_step", lambda: m.after_optimizer_step(s, opt))
    _probe("zero_grad", lambda: opt.zero_grad(set_to_none=True))


if __name__ == "__main__":
    sys.exit(app())
