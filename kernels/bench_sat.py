"""Benchmark SAT's sliced MLP and attention against the dense GPT-2 modules (sat.md §6, §8.10).

    python -m kernels.bench_sat --out results/bench_sat.json
    python -m kernels.bench_sat --quick --out results/bench_sat_quick.json   # the headline rows only

bf16 autocast with fp32 parameters, as in training; 16k tokens (16 x 1024); every timed iteration is forward +
backward with .grad reset to None (grad_accum = 1: the gather and the full-size gradient scatter are paid on every
call). Timing: CUDA events around each iteration after warm-up, median. Sliced rows use random sorted kept sets and
are checked against the masked dense reference inside the run (max relative error over y and every gradient).
The last section times whole GPT-2 124M training steps with the trainer's own step (train.setup/train_step on
bench.py's RandomTokens; forward, backward, clipping, AdamW, SAT's scoring and selection included): train.steps
1000 with SAT's defaults (10% dense warm-up, LORS at r0 = 0.5), timed from step 300, inside the sparse phase.
Compiled variants are skipped once the time budget is spent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
import typer

from bench import RandomTokens
from core.config import load_config
from kernels.benchutil import time_ms
from kernels.sliced_attention import SlicedAttention, attention_ref
from kernels.sliced_mlp import SlicedMLP, mlp_ref
from model.gpt import MLP, CausalSelfAttention, GPTConfig
from train import setup, train_step

WIDTHS = {768: 12, 1024: 16, 1280: 20}  # GPT-2 124M / 350M / 774M: d -> heads
B, T = 16, 1024


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        for p in module.parameters():
            p.grad = None
        x.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            y = module(x)
        y.backward(dy)

    return step


def rel_err(fast: Callable[[], list], ref: Callable[[], list]) -> float:
    """Largest ‖a - b‖ / ‖b‖ over the output and every gradient."""
    return max(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
               for a, b in zip(fast(), ref(), strict=True))


def outputs(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dy: torch.Tensor, params: list) -> list:
    x = x.detach().clone().requires_grad_()
    for p in params:
        p.grad = None
    with torch.autocast("cuda", torch.bfloat16):
        y = fn(x)
    y.backward(dy)
    return [y, x.grad] + [p.grad.clone() for p in params]


def main(out: str = "results/bench_sat.json", budget_s: float = 150.0, iters: int = 20,
         quick: bool = typer.Option(False, "--quick", help="only MLP d=768/1280, attention d=768 (eager) and the "
                                    "whole step at r0 = 0.5 (eager and compiled)")) -> None:
    """Time dense vs sliced MLP / attention fwd+bwd and whole SAT training steps on CUDA; write JSON."""
    if not torch.cuda.is_available():
        raise typer.BadParameter("needs a CUDA device")
    t_start = time.time()
    torch.manual_seed(0)
    rows: list[dict] = []

    def record(**row) -> None:
        rows.append(row)
        ms = f"{row['ms']:.3f}" if row.get("ms") is not None else "-"
        sp = f"{row['speedup']:.2f}x" if row.get("speedup") is not None else "-"
        err = f"{row['max_rel_err']:.1e}" if row.get("max_rel_err") is not None else "-"
        print(f"{row['op']:<10} d={row['d']:<5} keep={row['keep']:<5} {'compiled' if row['compiled'] else 'eager':<8}"
              f" {ms:>8} ms {sp:>7}  err {err}  {' '.join(row.get('overrides', []))} {row.get('error', '')}",
              flush=True)

    def run(op: str, d: int, keep: float, compiled: bool, module: torch.nn.Module, x, dy, dense_ms, check=None):
        if compiled and time.time() - t_start > budget_s:
            return record(op=op, d=d, keep=keep, compiled=compiled, ms=None, error="skipped: time budget")
        try:
            fn = torch.compile(module) if compiled else module
            ms = time_ms(fwd_bwd(fn, x, dy), 5 if compiled else 3, iters)
            err = check(fn, x, dy) if check is not None else None
            record(op=op, d=d, keep=keep, compiled=compiled, ms=ms, max_rel_err=err,
                   speedup=None if dense_ms is None else dense_ms / ms)
            return ms
        except Exception as e:  # a failing variant is a result too; the others still run
            record(op=op, d=d, keep=keep, compiled=compiled, ms=None, error=f"{type(e).__name__}: {e}"[:300])
        finally:
            torch._dynamo.reset()

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  {B * T} tokens, bf16 autocast", flush=True)
    # eager everything first, then the compiled whole steps, then the compiled modules: the budget cuts the tail
    modules(False, run, quick)
    train_steps(False, t_start, budget_s, record, quick)
    train_steps(True, t_start, budget_s, record, quick)
    if not quick:
        modules(True, run, quick)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": B * T,
              "dtype": "bf16 autocast, fp32 params", "results": rows}
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out} in {time.time() - t_start:.0f} s")


def modules(compiled: bool, run: Callable[..., float | None], quick: bool = False) -> None:
    """MLP at keep 100% (the dense module), 50%, 25%; attention at 100% and 50% of the heads; every width."""
    for d, n_head in WIDTHS.items():
        if quick and d not in (768, 1280):
            continue
        cfg = GPTConfig(n_layer=1, n_head=n_head, n_embd=d, block_size=T, bias=True)
        x = torch.randn(B, T, d, device="cuda", requires_grad=True)  # dx is computed, as inside a model
        dy = torch.randn(B, T, d, device="cuda", dtype=torch.bfloat16)
        mlp = MLP(cfg).cuda()
        dense = run("mlp", d, 1.0, compiled, mlp, x, dy, None)
        for keep in (0.5, 0.25):
            sliced = SlicedMLP(mlp)
            sliced.set_kept(torch.randperm(4 * d)[: int(keep * 4 * d)].sort().values)
            w = [mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias]

            def check(fn, x, dy, sliced=sliced, w=w):
                ref = lambda inp: mlp_ref(inp, *w, sliced.kept)
                return rel_err(lambda: outputs(fn, x, dy, w), lambda: outputs(ref, x, dy, w))

            run("mlp", d, keep, compiled, sliced, x, dy, dense, check)
        if quick and d != 768:
            continue
        attn = CausalSelfAttention(cfg).cuda()
        dense = run("attn", d, 1.0, compiled, attn, x, dy, None)
        sliced = SlicedAttention(attn)
        sliced.set_kept(torch.randperm(n_head)[: n_head // 2].sort().values)
        w = [attn.c_attn.weight, attn.c_attn.bias, attn.c_proj.weight, attn.c_proj.bias]

        def check_attn(fn, x, dy, sliced=sliced, w=w):
            ref = lambda inp: attention_ref(inp, *w, sliced.rows, sliced.cols, sliced.head_dim)
            return rel_err(lambda: outputs(fn, x, dy, w), lambda: outputs(ref, x, dy, w))

        run("attn", d, 0.5, compiled, sliced, x, dy, dense, check_attn)


def train_steps(compiled: bool, t_start: float, budget_s: float, record: Callable[..., None],
                quick: bool = False) -> None:
    """Whole GPT-2 124M steps (B=16, T=1024) through train.train_step: dense, then SAT at r0 = 0.5 (and 0.75
    with heads omitted too, eager, in the full run) with the default scoring (maxip on 1/16 of the tokens, sampling
    at T=0.05, selection every step)."""
    base = ["model.preset=gpt2", "model.block_size=1024", "train.batch_size=16", "train.steps=1000",
            "train.grad_accum=1", "train.device=cuda", f"train.compile={str(compiled).lower()}"]
    variants = [("dense", 1.0, []), ("sat", 0.5, [])]
    if not (quick or compiled):
        variants += [("sat", 0.25, ["sat.omission_rate=0.75"]), ("sat", 0.5, ["sat.omit_heads=true"])]
    dense_ms = None
    for method, keep, extra in variants:
        row = dict(op="step", d=768, keep=keep, compiled=compiled, method=method, overrides=extra)
        if compiled and time.time() - t_start > budget_s:
            record(**row, ms=None, error="skipped: time budget")
            continue
        try:
            cfg = load_config(None, method, base + extra)
            run = setup(cfg, data=RandomTokens(50257, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed))
            steps = iter(range(300, cfg.train.steps))  # SAT: warm-up ends at 100, LORS holds r0 until 550
            ms = time_ms(lambda run=run, steps=steps: train_step(run, next(steps)), 5, 10)
            if method == "dense":
                dense_ms = ms
            speedup = None if method == "dense" or dense_ms is None else dense_ms / ms
            extra_row = {"sat/omission_rate": run.method.metrics()["sat/omission_rate"]} if method == "sat" else {}
            record(**row, ms=ms, speedup=speedup, **extra_row)
        except Exception as e:
            record(**row, ms=None, error=f"{type(e).__name__}: {e}"[:300])
        finally:
            torch._dynamo.reset()


if __name__ == "__main__":
    typer.run(main)
