"""Benchmark SAT's sliced MLP and attention against the dense GPT-2 modules, and whole SAT training steps (sat.md §6,
§8.10).

    python -m kernels.bench_sat --out results/bench_sat.json
    python -m kernels.bench_sat --quick --out results/bench_sat_quick.json   # the headline rows only

Modules: bf16 autocast with fp32 parameters, as in training; 16k tokens (16 x 1024). Every timed call is one forward
+ backward with .grad reset to None (grad_accum = 1: the gather and the full-size gradient scatter are paid on every
call), timed with CUDA events after warm-up (median), in three modes that separate host overhead from GPU work:
- eager: the module as it is (one launch per op, Python autograd.Function: host-bound when the GEMMs are small);
- graph: the same eager fwd+bwd captured once in a CUDA graph and replayed: no host work, the GPU's own time;
- compiled: torch.compile(module) (inductor fuses the gathers, casts, GELU and scatters), as in compiled training.
A row's speedup is against the dense module of the same d and mode. Sliced rows use random sorted kept sets and are
checked against the masked dense reference after their timed calls (max relative error over y and every gradient).

Whole steps: the trainer's own step (train.setup / train_step on bench.py's RandomTokens: forward, backward,
clipping, AdamW, SAT's scoring and selection) for each --steps-presets model, B=16 x T=1024, train.steps 1000 with
SAT's defaults (10% dense warm-up, LORS at r0 = 0.5), timed from step 300 (inside the sparse phase) back to back
without a sync in between, as in training; speedup against dense of the same preset and mode, and flops_ratio (the
counted FLOPs against dense: 1 / flops_ratio is the speedup if time followed FLOPs).

--whole-run: compiled whole steps at each omission rate of SAT's default ladder (r0, the rungs, the dense rate 0),
each timed at a constant rate, and the whole-run speedup they add up to over the schedule's steps, dense warm-up
and dense last rung included (continual: no warm-up, as configs/sat-gpt2.toml; scratch: 10% dense warm-up).
Compilation (once per rung in training) is not in it.

Order: the eager MLP and attention rows and eager steps, the compiled whole steps, the CUDA-graph rows, then the
compiled modules; a compiled item starts only while --budget-s lasts (the rest are recorded as skipped).
The JSON is rewritten after every row.
"""

from __future__ import annotations

import gc
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import typer
from torch.profiler import ProfilerActivity, profile

from bench import RandomTokens
from core.config import load_config
from kernels.benchutil import capture, time_ms
from kernels.sliced_attention import SlicedAttention, attention_ref
from kernels.sliced_mlp import SlicedMLP, mlp_ref
from model.flops import dense_flops_per_token
from model.gpt import MLP, PRESETS, CausalSelfAttention, GPTConfig
from sparsity.sat import omission_rate
from train import setup, train_step

WIDTHS = {768: 12, 1024: 16, 1280: 20}  # GPT-2 124M / 350M / 774M: d -> heads
B, T = 16, 1024


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str, compile_mode: str = "default"
            ) -> tuple[Callable[[], None], Callable[[], list[torch.Tensor]]]:
    """(one forward + backward of module on x in `mode`, the results of the latest call: [y, dx, *param grads]).

    Every call starts from .grad = None, so a sliced module pays its full-size gradient scatter each time as the
    dense one pays its full-size gradients. graph: warmed up on a side stream, then captured with the grads set to
    None, so backward allocates them from the graph's pool and every replay rewrites them in place (whole-network
    capture as the CUDA-graphs notes document it); autocast's cast cache is off, as they ask of captured autocast.
    """
    params = list(module.parameters())
    fn = torch.compile(module, mode=compile_mode) if mode.startswith("compiled") else module
    graphed = mode in ("graph", "compiled-graph")
    last: dict[str, torch.Tensor] = {}

    def call() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        with torch.autocast(x.device.type, torch.bfloat16, cache_enabled=not graphed):
            last["y"] = fn(x)
        last["y"].backward(dy)

    def results() -> list[torch.Tensor]:
        return [t.detach().clone() for t in (last["y"], x.grad, *(p.grad for p in params))]

    if not graphed:
        return call, results
    return capture(call)[0].replay, results


def reference(fn: Callable[..., torch.Tensor], x: torch.Tensor, dy: torch.Tensor, params: list, *args) -> list:
    """[y, dx, *param grads] of fn(x, *params, *args) (a masked dense reference), eager under bf16 autocast.

    It runs on copies of x and the parameters: a captured CUDA graph rewrites the .grad tensors it allocated, so a
    reference that set the real parameters' .grad would leave the caller reading its own stale gradients."""
    x = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in params]
    with torch.autocast(x.device.type, torch.bfloat16):
        y = fn(x, *params, *args)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in params]


def rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """Largest ‖a - b‖ / ‖b‖ over the output and every gradient."""
    return max(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
               for a, b in zip(got, want, strict=True))


class Recorder:
    """Rows so far, printed as they come and rewritten to `out` after each one (a killed run keeps them)."""

    def __init__(self, out: Path, meta: dict, budget_s: float):
        self.out, self.meta, self.budget_s, self.t0, self.rows = out, meta, budget_s, time.time(), []
        self.compile_mode = "default"  # torch.compile's mode for the compiled module rows (--compile-modes)
        self.profile_rows = 0  # > 0: print each module row's top CUDA kernels over 10 calls (--profile-rows)

    def over_budget(self) -> bool:
        return time.time() - self.t0 > self.budget_s

    def __call__(self, **row) -> None:
        self.rows.append(row)
        ms = f"{row['ms']:.3f}" if row.get("ms") is not None else "-"
        sp = f"{row['speedup']:.2f}x" if row.get("speedup") is not None else "-"
        err = f" err {row['max_rel_err']:.1e}" if row.get("max_rel_err") is not None else ""
        mode = row["mode"] + (f"[{row['compile_mode']}]" if row.get("compile_mode", "default") != "default" else "")
        what = f"{row['op']:<5} {row.get('preset', '')} d={row['d']:<5} keep={str(row['keep']):<5} {mode:<8}"
        print(f"{what} {ms:>8} ms {sp:>7}{err} {' '.join(row.get('overrides', []))} {row.get('error', '')}",
              flush=True)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.meta | {"elapsed_s": time.time() - self.t0, "results": self.rows},
                                       indent=2))


def main(out: Path = typer.Option(Path("results/bench_sat.json"), help="the JSON to write"),
         budget_s: float = typer.Option(270.0, help="start no compiled item after this many seconds (an item "
                                        "started before runs on through its compilation; bench.py allows 420 s)"),
         iters: int = typer.Option(20, help="timed calls per module row"),
         steps_presets: str = typer.Option("gpt2,gpt2-medium", help="model.preset names for the whole-step rows"),
         quick: bool = typer.Option(False, "--quick", help="only MLP d=768/1280 and attention d=768 (eager, graph) "
                                    "and whole steps of the first preset at r0 = 0.5 (eager, compiled)"),
         steps_only: bool = typer.Option(False, "--steps-only", help="only compiled whole steps, every variant (r0 "
                                         "0.5, r0 0.75, heads omitted too) for each --steps-presets model"),
         whole_run: bool = typer.Option(False, "--whole-run", help="only compiled whole steps at each omission rate "
                                        "of SAT's default schedule, and the whole-run speedup they add up to, for "
                                        "each --steps-presets model"),
         set_: list[str] = typer.Option([], "--set", help="config overrides for the whole-step rows, e.g. "
                                        "train.compile_mode=reduce-overhead"),
         modules: str = typer.Option("", "--modules", help="only the MLP and attention rows, in these comma-separated "
                                     "modes (eager, graph, compiled, compiled-graph: the compiled module replayed "
                                     "from a CUDA graph, as compile_mode=reduce-overhead runs it)"),
         ops: str = typer.Option("mlp,attn", help="which --modules rows: mlp, attn or both"),
         widths: str = typer.Option(",".join(map(str, WIDTHS)), help="model widths for the --modules rows"),
         profile_rows: int = typer.Option(0, help="with --modules: after each row, print its top N CUDA kernels "
                                          "over 10 calls (torch.profiler)"),
         compile_modes: str = typer.Option("default", "--compile-modes", help="torch.compile modes for the compiled "
                                           "--modules rows, comma-separated, each in turn (e.g. default,"
                                           "max-autotune-no-cudagraphs: Triton GEMM templates with fused "
                                           "epilogues)")) -> None:
    """Time dense vs sliced MLP / attention fwd+bwd (eager, CUDA graph, compiled) and whole SAT training steps on
    CUDA; write JSON."""
    presets = [p for p in steps_presets.split(",") if p]
    if not presets or any(p not in PRESETS for p in presets):
        raise typer.BadParameter(f"--steps-presets: comma-separated names from {', '.join(PRESETS)}")
    if not set(ops.split(",")) <= {"mlp", "attn"}:
        raise typer.BadParameter(f"--ops: mlp, attn or mlp,attn, got {ops!r}")
    if not all(w.isdigit() and int(w) % 64 == 0 for w in widths.split(",")):
        raise typer.BadParameter(f"--widths: comma-separated multiples of 64, got {widths!r}")
    if not torch.cuda.is_available():
        raise typer.BadParameter("needs a CUDA device")
    torch.manual_seed(0)
    record = Recorder(out, {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": B * T,
                            "dtype": "bf16 autocast, fp32 params", "overrides": list(set_)}, budget_s)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  {B * T} tokens, bf16 autocast", flush=True)
    if modules:
        bad = [m for m in modules.split(",") if m not in ("eager", "graph", "compiled", "compiled-graph")]
        if bad:
            raise typer.BadParameter(f"--modules: eager, graph, compiled or compiled-graph, got {bad[0]!r}")
        ds = [int(w) for w in widths.split(",")]
        record.profile_rows = profile_rows
        for mode in modules.split(","):
            for cm in compile_modes.split(",") if mode.startswith("compiled") else ["default"]:
                record.compile_mode = cm
                for op, rows in (("mlp", mlp_rows), ("attn", attn_rows)):
                    if op in ops.split(","):
                        rows(ds, mode, record, iters)
        print(f"wrote {out} in {time.time() - record.t0:.0f} s")
        return
    if steps_only or whole_run:
        for preset in presets:
            (whole_run_steps if whole_run else train_steps)(preset, "compiled", record, True, overrides=set_)
        print(f"wrote {out} in {time.time() - record.t0:.0f} s")
        return
    widths = [768, 1280] if quick else list(WIDTHS)
    mlp_rows(widths, "eager", record, iters)
    attn_rows([768] if quick else widths, "eager", record, iters)
    train_steps(presets[0], "eager", record, extra_variants=not quick, overrides=set_)
    for preset in presets[:1] if quick else presets:
        train_steps(preset, "compiled", record, overrides=set_)
    # CUDA-graph rows after the steps: a capture that fails leaves the CUDA generator unusable for the rest of the
    # process (H200, 2026-11-23: every later torch.randn raised "Offset increment outside graph capture")
    mlp_rows(widths, "graph", record, iters)
    attn_rows([768] if quick else widths, "graph", record, iters)
    if not quick:
        mlp_rows(widths, "compiled", record, iters)
        attn_rows(widths, "compiled", record, iters)
    print(f"wrote {out} in {time.time() - record.t0:.0f} s")


def module_row(record: Recorder, op: str, d: int, keep: float, mode: str, module: torch.nn.Module, x, dy,
               iters: int, dense_ms: float | None = None, want: list | None = None) -> float | None:
    """Time one module in one mode (and check its results against `want`); returns its ms (None if skipped or
    failed)."""
    row = dict(op=op, d=d, keep=keep, mode=mode)
    if mode.startswith("compiled"):
        row["compile_mode"] = record.compile_mode
        if record.over_budget():
            return record(**row, ms=None, error="skipped: time budget")
    try:
        call, results = fwd_bwd(module, x, dy, mode, record.compile_mode)
        ms = time_ms(call, 5 if mode.startswith("compiled") else 3, iters)
        err = rel_err(results(), want) if want is not None else None
        record(**row, ms=ms, max_rel_err=err, speedup=None if dense_ms is None else dense_ms / ms)
        if record.profile_rows:
            print_kernels(call, record.profile_rows)
        return ms
    except Exception as e:  # noqa: BLE001 (a failing variant is a result too; the others still run)
        return record(**row, ms=None, error=f"{type(e).__name__}: {e}"[:300])
    finally:
        for p in module.parameters():  # graph mode: the grads live in the graph's pool; free it with the graph
            p.grad = None
        x.grad = None
        torch._dynamo.reset()


def print_kernels(call: Callable[[], None], rows: int, calls: int = 10) -> None:
    """The top CUDA kernels (CPU ops without CUDA) of `calls` calls, each a total over them, as torch.profiler
    tabulates them."""
    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            call()
        if cuda:
            torch.cuda.synchronize()
    print(f"{'CUDA kernels' if cuda else 'CPU ops'} over {calls} calls:")
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=rows,
                                      max_name_column_width=70)
    print(table, flush=True)


def _inputs(d: int, device: str, tokens: tuple[int, int]) -> tuple[GPTConfig, torch.Tensor, torch.Tensor]:
    b, t = tokens
    cfg = GPTConfig(n_layer=1, n_head=WIDTHS.get(d, 2), n_embd=d, block_size=t, bias=True)
    x = torch.randn(b, t, d, device=device, requires_grad=True)  # dx is computed, as inside a model
    return cfg, x, torch.randn(b, t, d, device=device, dtype=torch.bfloat16)


def mlp_rows(widths: list[int], mode: str, record: Recorder, iters: int, device: str = "cuda",
             tokens: tuple[int, int] = (B, T)) -> None:
    """The MLP at keep 100% (the dense module), 50% and 25% of the channels."""
    for d in widths:
        cfg, x, dy = _inputs(d, device, tokens)
        mlp = MLP(cfg).to(device)
        w = [mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias]
        dense = module_row(record, "mlp", d, 1.0, mode, mlp, x, dy, iters)
        for keep in (0.5, 0.25):
            sliced = SlicedMLP(mlp)
            sliced.set_kept(torch.randperm(4 * d)[: int(keep * 4 * d)].sort().values)
            want = reference(mlp_ref, x, dy, w, sliced.kept)
            module_row(record, "mlp", d, keep, mode, sliced, x, dy, iters, dense, want)


def attn_rows(widths: list[int], mode: str, record: Recorder, iters: int, device: str = "cuda",
              tokens: tuple[int, int] = (B, T)) -> None:
    """Attention with all heads (the dense module) and with half of them."""
    for d in widths:
        cfg, x, dy = _inputs(d, device, tokens)
        attn = CausalSelfAttention(cfg).to(device)
        w = [attn.c_attn.weight, attn.c_attn.bias, attn.c_proj.weight, attn.c_proj.bias]
        dense = module_row(record, "attn", d, 1.0, mode, attn, x, dy, iters)
        sliced = SlicedAttention(attn)
        sliced.set_kept(torch.randperm(cfg.n_head)[: cfg.n_head // 2].sort().values)
        want = reference(attention_ref, x, dy, w, sliced.rows, sliced.cols, sliced.head_dim)
        module_row(record, "attn", d, 0.5, mode, sliced, x, dy, iters, dense, want)


def train_steps(preset: str, mode: str, record: Recorder, extra_variants: bool = False, device: str = "cuda",
                tokens: tuple[int, int] = (B, T), iters: int = 10, overrides: list[str] = ()) -> None:
    """Whole training steps of `preset` through train.train_step: dense, then SAT at r0 = 0.5 with its defaults
    (maxip on 1/16 of the tokens, sampling at T=0.05, selection every step); extra_variants adds r0 = 0.75 and
    r0 = 0.5 with heads omitted too."""
    b, t = tokens
    base = [f"model.preset={preset}", f"model.block_size={t}", f"train.batch_size={b}", "train.steps=1000",
            "train.grad_accum=1", f"train.device={device}", f"train.compile={str(mode == 'compiled').lower()}",
            *overrides]
    variants = [("dense", 1.0, []), ("sat", 0.5, [])]
    if extra_variants:
        variants += [("sat", 0.25, ["sat.omission_rate=0.75"]), ("sat", 0.5, ["sat.omit_heads=true"])]
    dense_ms = None
    for method, keep, extra in variants:
        cfg = load_config(None, method, base + extra)
        row = dict(op="step", preset=preset, d=cfg.model.n_embd, n_layer=cfg.model.n_layer, keep=keep, mode=mode,
                   method=method, overrides=extra)
        if mode == "compiled" and record.over_budget():
            record(**row, ms=None, error="skipped: time budget")
            continue
        try:
            ms, stats = time_steps(cfg, iters)
            dense_ms = ms if method == "dense" else dense_ms
            record(**row, ms=ms, speedup=None if method == "dense" or dense_ms is None else dense_ms / ms, **stats)
        except Exception as e:  # noqa: BLE001
            record(**row, ms=None, error=f"{type(e).__name__}: {e}"[:300])
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


WARMUPS = {"continual": 0.0, "scratch": 0.1}  # sat.warmup_frac of configs/sat-gpt2.toml and of a run from scratch


def whole_run_steps(preset: str, mode: str, record: Recorder, _extra: bool = True, device: str = "cuda",
                    tokens: tuple[int, int] = (B, T), iters: int = 10, total: int = 1000,
                    overrides: list[str] = ()) -> None:
    """Whole steps at every omission rate that SAT's default schedule (LORS) visits, each timed as a constant-rate
    run, then the whole run's speedup: total · t_dense / Σ_rate n_rate · t_rate, with n_rate the schedule's steps at
    that rate, for a continual run (no dense warm-up) and one from scratch (10% dense warm-up). The rungs' rates
    do not depend on the warm-up; the dense rungs (warm-up, last rung) are SAT's own steps at rate 0."""
    b, t = tokens
    base = [f"model.preset={preset}", f"model.block_size={t}", f"train.batch_size={b}", f"train.steps={total}",
            "train.grad_accum=1", f"train.device={device}", f"train.compile={str(mode == 'compiled').lower()}",
            *overrides]
    sat_cfg = load_config(None, "sat", base).method_cfg
    counts = {name: Counter(omission_rate(replace(sat_cfg, warmup_frac=w), s, total) for s in range(total))
              for name, w in WARMUPS.items()}
    rates = sorted(set().union(*counts.values()), reverse=True)
    ms: dict[float | str, float] = {}
    for method, rate in [("dense", None)] + [("sat", r) for r in rates]:
        extra = [] if rate is None else ["sat.schedule=constant", "sat.warmup_frac=0", f"sat.omission_rate={rate}"]
        cfg = load_config(None, method, base + extra)
        row = dict(op="step", preset=preset, d=cfg.model.n_embd, n_layer=cfg.model.n_layer,
                   keep=1.0 if rate is None else 1 - rate, mode=mode, method=method, overrides=extra,
                   omit_heads=cfg.method_cfg.omit_heads if rate is not None else None)
        try:
            step_ms, stats = time_steps(cfg, iters, start=total // 4)  # any step: the rate is constant
        except Exception as e:  # noqa: BLE001 (without every rate there is no whole-run figure; say why)
            record(**row, ms=None, error=f"{type(e).__name__}: {e}"[:300])
            return
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        ms["dense" if rate is None else rate] = step_ms
        record(**row, ms=step_ms, speedup=None if rate is None else ms["dense"] / step_ms, **stats)
    for name, count in counts.items():
        sat_ms = sum(n * ms[r] for r, n in count.items())
        record(op="whole_run", preset=preset, d=cfg.model.n_embd, keep=None, mode=mode, schedule=name,
               warmup_frac=WARMUPS[name], steps_at_rate={str(r): n for r, n in sorted(count.items())},
               ms=sat_ms / total, speedup=total * ms["dense"] / sat_ms)


def time_steps(cfg, iters: int, start: int = 300) -> tuple[float, dict[str, float]]:
    """Median ms of `iters` steps from step `start` (300 of 1000: SAT's dense warm-up ends at 100, LORS holds r0
    until 550) after 5 warm-up steps, and the step's FLOPs against dense (and SAT's omission rate)."""
    torch._dynamo.reset()  # a fresh compile per model: dynamo's code cache is shared by every model in-process
    run = setup(cfg, data=RandomTokens(50257, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed))
    step = start
    if cfg.method == "sat":
        # SAT's first step runs dense to collect the scores it selects from: run it uncompiled rather than pay a
        # second whole-model compilation for a graph that no timed step uses
        compiled, run.train_model = run.train_model, run.model
        train_step(run, step)
        run.train_model, step = compiled, step + 1
    steps = iter(range(step, cfg.train.steps))
    ms = time_ms(lambda: train_step(run, next(steps)), 5, iters, sync_each=False)
    stats = {"flops_ratio": train_step(run, next(steps))[3] / (dense_flops_per_token(cfg.model) * run.tokens_per_step)}
    if cfg.method == "sat":
        stats["sat/omission_rate"] = run.method.metrics()["sat/omission_rate"]
    return ms, stats


if __name__ == "__main__":
    typer.run(main)
