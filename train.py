"""Pretrain GPT-2, dense or with a sparse training method.

    python train.py --config configs/demo.toml                       # the built-in CPU demo
    python train.py --config configs/gpt2.toml --method mst --set mst.hsa_stride=64
    torchrun --nproc_per_node 8 train.py --config configs/gpt2.toml  # DDP

The loop reads top to bottom: LR, method schedule, micro-batches, clip, optimizer step, log, eval, checkpoint.
Everything method-specific happens inside the `method` object's hooks (sparsity/base.py).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.nn.parallel import DistributedDataParallel as DDP

from core import checkpoint
from core.config import Config, ConfigError, config_from_dict, load_config
from core.dist import DistInfo, all_reduce_mean, cleanup, init_distributed
from core.log import MetricsLogger, env_summary, format_flops, git_state
from data.loader import TokenData
from kernels.cross_entropy import CrossEntropy
from model.flops import dense_flops_per_token, peak_flops, train_flops_per_token
from model.gpt import GPT
from sparsity import REGISTRY, Method, method_class

console = Console(stderr=True, highlight=False, soft_wrap=True)


class TrainError(RuntimeError):
    """A problem with the run the user can fix (bad data folder, incompatible checkpoint, NaN loss)."""


def get_lr(step: int, cfg: Config) -> float:
    """Linear warm-up, then cosine decay to min_lr at lr_decay_steps (nanoGPT's schedule)."""
    t = cfg.train
    decay_steps = t.lr_decay_steps or t.steps
    if step < t.warmup_steps:
        return t.lr * (step + 1) / (t.warmup_steps + 1)
    if step >= decay_steps:
        return t.min_lr
    ratio = (step - t.warmup_steps) / max(1, decay_steps - t.warmup_steps)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.lr - t.min_lr)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"train.device={name} but no CUDA device is available")
    return torch.device(name)


def build_model(cfg: Config) -> GPT:
    """A fresh GPT from cfg.model, or weights from train.init_from (whose shape then defines the model)."""
    if not cfg.train.init_from:
        return GPT(cfg.model)
    from model.hf import load_model  # noqa: PLC0415 (transformers is only needed for OpenAI weights)

    try:
        model, _ = load_model(cfg.train.init_from, "cpu")
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise TrainError(f"train.init_from={cfg.train.init_from!r}: {e}") from None
    if model.config.block_size < cfg.model.block_size:
        raise TrainError(f"init_from model has block_size {model.config.block_size} < model.block_size")
    cfg.model = model.config
    return model


def check_resumable(ckpt: dict, cfg: Config) -> None:
    saved = config_from_dict(ckpt["config"])
    if saved.method != cfg.method:
        raise TrainError(f"checkpoint was trained with --method {saved.method}, not {cfg.method}; refusing to resume")
    shape = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")
    diff = [f"{k} {getattr(saved.model, k)}≠{getattr(cfg.model, k)}" for k in shape
            if getattr(saved.model, k) != getattr(cfg.model, k)]
    if diff:
        raise TrainError(f"checkpoint has another model shape ({', '.join(diff)}); refusing to resume")


def evaluate(model: torch.nn.Module, data: TokenData, cfg: Config, device: torch.device, autocast) -> float:
    """Mean loss over the same eval_steps validation batches every time."""
    model.eval()
    losses = torch.zeros(cfg.train.eval_steps, device=device)
    with torch.no_grad():
        for k in range(cfg.train.eval_steps):
            x, y = data.batch("val", k, 0, device)
            with autocast:
                _, loss = model(x, y)
            losses[k] = loss
    model.train()
    return all_reduce_mean(losses.mean()).item()


@dataclass
class Run:
    """Everything one training step touches; built once by `setup` (train.py and bench.py share it)."""

    cfg: Config
    model: GPT  # the raw module: state_dict, clipping, methods
    train_model: torch.nn.Module  # what the step calls: compiled and/or DDP-wrapped model
    method: Method
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    data: TokenData
    autocast: Any
    device: torch.device
    dist: DistInfo
    tokens_per_step: int
    graphs: bool = False  # forward and backward replay CUDA graphs (compile_mode reduce-overhead)


def setup(cfg: Config, ckpt: dict | None = None, data: TokenData | None = None) -> Run:
    """Build data, model, method, optimizer (restoring ckpt if given), then compile and DDP-wrap."""
    t = cfg.train
    device = pick_device(t.device)
    if t.loss_kernel == "triton" and device.type != "cuda":
        raise TrainError("train.loss_kernel=triton needs a CUDA device (use auto or ref)")
    dist = init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    torch.manual_seed(t.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    data = data or TokenData(cfg.data.dir, cfg.model.block_size, t.batch_size, t.seed, dist.rank)
    model = build_model(cfg)
    if data.vocab_size > cfg.model.vocab_size:
        raise TrainError(f"data vocab {data.vocab_size} > model.vocab_size {cfg.model.vocab_size}")
    model.to(device)
    model.loss_fn = CrossEntropy(t.loss_kernel)
    method = method_class(cfg.method)(cfg.method_cfg, cfg.model, t.steps, t.seed)
    if t.compile and t.compile_mode == "reduce-overhead" and method.cuda_graphs:
        raise TrainError(f"{cfg.method} cannot run with train.compile_mode=reduce-overhead: {method.cuda_graphs}")
    model = method.attach(model)

    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[t.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    optimizer = method.configure_optimizer(model, t.weight_decay, t.lr, (t.beta1, t.beta2), device.type)
    if ckpt is not None:
        model.load_state_dict(checkpoint.clean_state_dict(ckpt["model"]))
        method.load_state_dict(ckpt["method"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        checkpoint.set_rng_state(ckpt["rng"][0])

    if t.prewarm_kernels and device.type == "cuda" and dist.local_rank == 0:  # one GPU's children fill the cache
        from kernels import prewarm

        prewarm.spawn(method.kernel_warmups(t.batch_size, cfg.model.block_size), device)
    train_model = model
    if t.compile and device.type == "cuda":
        # dynamo's default limit (8 graphs a frame) would run the rest of a long MST-block run eagerly
        blocks = t.compile_scope == "blocks"  # then every block's states share the one Block.forward code
        graphs = method.compiled_graphs() * (cfg.model.n_layer if blocks else 1)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)
        train_model = (compile_blocks if blocks else torch.compile)(model, mode=t.compile_mode)
    if dist.enabled:
        train_model = DDP(train_model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    tokens_per_step = t.batch_size * cfg.model.block_size * t.grad_accum * dist.world_size
    graphs = train_model is not model and t.compile_mode == "reduce-overhead"
    return Run(cfg, model, train_model, method, optimizer, scaler, data, autocast, device, dist, tokens_per_step,
               graphs)


def compile_blocks(model: GPT, **compile_kwargs) -> GPT:
    """A view of model (same parameters, buffers and submodules) whose blocks and head run compiled, each block as
    its own region; model itself stays uncompiled for evaluation and sampling. The blocks are one class, so dynamo
    compiles Block.forward once and reuses it for every block whose state (shapes, a method's flags) it has seen."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view.transformer = copy.copy(model.transformer)
    view.transformer._modules = dict(model.transformer._modules)
    view.transformer.h = nn.ModuleList(torch.compile(b, **compile_kwargs) for b in model.transformer.h)
    view.head = torch.compile(model.head, **compile_kwargs)
    return view


def train_step(run: Run, step: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """One optimizer step: (summed micro-batch loss, grad norm, lr, counted training FLOPs). No host sync."""
    t, method, optimizer, scaler = run.cfg.train, run.method, run.optimizer, run.scaler
    lr = get_lr(step, run.cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    method.on_step_start(step)
    step_flops = train_flops_per_token(run.cfg.model, method.flop_profile(step)) * run.tokens_per_step

    loss_sum = torch.zeros((), device=run.device)
    for micro in range(t.grad_accum):
        x, y = run.data.batch("train", step, micro, run.device)
        last_micro = micro == t.grad_accum - 1
        sync = run.train_model.no_sync() if run.dist.enabled and not last_micro else nullcontext()
        with sync:
            with run.autocast:
                _, loss = run.train_model(x, y)
            scaler.scale(loss / t.grad_accum).backward()
        loss_sum += loss.detach()
        if run.graphs and micro == 0 and not last_micro:
            # The first backward's grads are outputs of a replayed graph, in its memory pool, which the next
            # micro-batch's replay overwrites: copy them out once; later micro-batches accumulate into the copies.
            for p in run.model.parameters():
                if p.grad is not None:
                    p.grad = p.grad.clone()
    method.after_backward(step)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
    if method.before_optimizer_step(step, optimizer):
        scaler.step(optimizer)
    scaler.update()
    method.after_optimizer_step(step, optimizer)
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / t.grad_accum, grad_norm, lr, step_flops


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """Run (or resume) one training run; returns the last metrics record."""
    out_dir = Path(cfg.train.out_dir)
    ckpt = None
    if resume:
        if not checkpoint.ckpt_path(out_dir).is_file():
            raise TrainError(f"--resume: no checkpoint in {out_dir}")
        ckpt = checkpoint.load(out_dir)
        check_resumable(ckpt, cfg)
    elif checkpoint.ckpt_path(out_dir).is_file() and not overwrite:
        raise TrainError(f"{out_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
    run = setup(cfg, ckpt)
    t, model, method, dist, device = cfg.train, run.model, run.method, run.dist, run.device
    start, tokens, flops, flops_dense, elapsed = 0, 0, 0.0, 0.0, 0.0
    if ckpt is not None:
        start, tokens, flops, flops_dense, elapsed = (ckpt[k] for k in ("step", "tokens", "flops", "flops_dense",
                                                                           "elapsed"))
        start += 1

    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    wandb_cfg = {"project": cfg.log.wandb_project, "name": cfg.log.wandb_run_name} if cfg.log.wandb else None
    logger = MetricsLogger(out_dir, dist.is_main, start - 1 if ckpt else None, wandb_cfg, cfg.to_dict(), console)

    tokens_per_step = run.tokens_per_step
    dense_step_flops = dense_flops_per_token(cfg.model) * tokens_per_step
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if dist.is_main:
        console.print(f"[bold]{cfg.method}[/bold] · {model.num_params() / 1e6:.1f}M params · {tokens_per_step:,} "
                      f"tokens/step · {t.steps} steps · {device} · world {dist.world_size} · {git_state()}")

    record: dict = {}
    t_log, tokens_log = time.perf_counter(), 0
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True, disable=not (dist.is_main and console.is_terminal))
    bar = progress.add_task(cfg.method, total=t.steps, completed=start)
    progress.start()
    for step in range(start, t.steps):
        loss, grad_norm, lr, step_flops = train_step(run, step)
        tokens += tokens_per_step
        tokens_log += tokens_per_step
        flops += step_flops
        flops_dense += dense_step_flops
        last = step == t.steps - 1
        is_eval = step % t.eval_interval == 0 or last
        if step % t.log_interval == 0 or is_eval:
            train_loss = all_reduce_mean(loss).item()  # syncs the device: time is exact below
            now = time.perf_counter()
            dt, elapsed = now - t_log, elapsed + now - t_log
            tok_per_s = tokens_log / dt
            record = {"step": step, "tokens": tokens, "train_loss": train_loss, "lr": lr, "flops": flops,
                      "flops_dense": flops_dense, "flops_ratio": flops / flops_dense, "tok_per_s": tok_per_s,
                      "mfu": tok_per_s * dense_step_flops / tokens_per_step / peak if peak else None,
                      "grad_norm": float(grad_norm), "elapsed_s": elapsed}
            if is_eval:
                record["val_loss"] = evaluate(method.eval_mode(model), run.data, cfg, device, run.autocast)
            record |= method.metrics()
            logger.log(record)
            bad = [f"{k} is {record[k]}" for k in ("train_loss", "val_loss") if not math.isfinite(record.get(k, 0.0))]
            if bad:
                raise TrainError(f"{bad[0]} at step {step}; stopping (the last good checkpoint stays)")
            if dist.is_main:
                console.print(_line(record, t.steps))
                progress.update(bar, description=f"{cfg.method} loss {train_loss:.3f} {tok_per_s:,.0f} tok/s")
            tokens_log, t_log = 0, time.perf_counter()  # validation time is not training time
        ckpt_due = is_eval if t.ckpt_interval == 0 else step % t.ckpt_interval == 0 or last
        if ckpt_due:
            if dist.is_main:
                save(run, out_dir, step, tokens, flops, flops_dense, elapsed + time.perf_counter() - t_log)
        progress.advance(bar)
    progress.stop()
    logger.close()
    cleanup()
    return record


def save(run: Run, out_dir: Path, step: int, tokens: int, flops: float, flops_dense: float, elapsed: float) -> None:
    checkpoint.save_atomic(
        {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
         "method": run.method.state_dict(), "rng": [checkpoint.rng_state()], "config": run.cfg.to_dict(),
         "data_meta": run.data.meta, "step": step, "tokens": tokens, "flops": flops, "flops_dense": flops_dense,
         "elapsed": elapsed, "env": env_summary()},
        checkpoint.ckpt_path(out_dir),
    )


def _line(r: dict, total: int) -> str:
    eta = (total - r["step"] - 1) * r["elapsed_s"] / max(1, r["step"] + 1)
    parts = [f"step {r['step']:>6}/{total}", f"loss {r['train_loss']:.4f}"]
    if "val_loss" in r:
        parts.append(f"[cyan]val {r['val_loss']:.4f}[/cyan]")
    parts += [f"lr {r['lr']:.2e}", f"{r['tok_per_s']:,.0f} tok/s"]
    if r["mfu"] is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    parts += [f"flops {format_flops(r['flops'])} ({r['flops_ratio']:.2f}x dense)", f"eta {eta / 60:.1f}m"]
    return " · ".join(parts)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def main(
    config: Path | None = typer.Option(None, "--config", "-c", help="TOML config (sections [model] [train] [data] "
                                       "[log] and one per method); defaults are in core/config.py and model/gpt.py"),
    method: str | None = typer.Option(None, "--method", "-m", help=f"sparsity method: {' | '.join(REGISTRY)} "
                                      "(overrides the file's `method`)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override any field: section.key=value, repeatable "
                                   "(e.g. --set train.lr=3e-4 --set mst.hsa_stride=64)"),
    steps: int | None = typer.Option(None, help="shorthand for --set train.steps=N"),
    out_dir: str | None = typer.Option(None, help="shorthand for --set train.out_dir=DIR"),
    data_dir: str | None = typer.Option(None, help="shorthand for --set data.dir=DIR (a data.prepare folder)"),
    init_from: str | None = typer.Option(None, help="start from weights: gpt2 | gpt2-medium | ... | a HF folder | "
                                         "one of our run folders (fresh optimizer and schedule)"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    compile: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile the model (CUDA)"),
    wandb: bool = typer.Option(False, "--wandb", help="also log to Weights & Biases (WANDB_MODE=offline works)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in out_dir from its checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a run already in out_dir"),
    print_config: bool = typer.Option(False, "--print-config", help="print the resolved config and exit"),
) -> None:
    """Train a GPT-2 with the chosen sparsity method; logs to <out_dir>/metrics.jsonl (and wandb)."""
    shorthands = {"train.steps": steps, "train.out_dir": out_dir, "data.dir": data_dir, "train.init_from": init_from,
                  "train.device": device, "train.compile": compile, "log.wandb": True if wandb else None}
    overrides = list(set_) + [f"{k}={v}" for k, v in shorthands.items() if v is not None]
    try:
        cfg = load_config(config, method, overrides)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if print_config:
        console.print_json(data=cfg.to_dict())
        return
    try:
        train(cfg, resume=resume, overwrite=overwrite)
    except (TrainError, FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1 if "loss is" in str(e) else 2) from None


if __name__ == "__main__":
    sys.exit(app())
