"""Time training steps of several methods in one process and report them as ratios against dense.

    python bench.py --config configs/gpt2.toml --methods dense,mst,2of4,sat --steps 30 --warmup 10
    python bench.py --config configs/gpt2.toml --methods dense --compile        # the 124M figure
    python bench.py --kernels                                                   # + kernel micro-benchmarks
    python bench.py --config configs/mst-gpt2.toml --methods dense,mst --whole-run --set train.steps=3000 ...

Each method runs the trainer's own step (train.setup / train.train_step) on random tokens (speed does not depend
on the data), starting at `--at` of its schedule (so MST/SAT/2:4 are timed in their sparse phase), timed per step
with CUDA events after warm-up, in back-to-back blocks of steps (no sync inside a block, as in training); the
median over blocks and the 10th/90th percentiles are reported. `--whole-run` times every step of the schedule
instead (`time_whole_run`): the figure for "finishes its token budget x times faster". Writes
results/bench-<device>-<date>.json and a markdown table beside it. On the CPU it runs the same code with a host
clock (for CI: no speed claims).
"""

from __future__ import annotations

import datetime
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from core.config import ConfigError, load_config
from kernels import AUTOTUNE
from model.flops import dense_flops_per_token, peak_flops
from sparsity import REGISTRY
from tools.gpu_monitor import GpuMonitor
from train import Run, TrainError, setup, train_step

console = Console(stderr=True, highlight=False, soft_wrap=True)
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

KERNEL_BENCHES = {
    "semi24": ["-m", "kernels.bench_semi24", "--out"],
    "sat": ["-m", "kernels.bench_sat", "--out"],
    "hsa": ["-m", "kernels.bench_hsa", "--out"],
    "block_sparse": ["-m", "kernels.bench_block_sparse", "--blocks", "64,128", "--out"],
    "fp8_24": ["-m", "kernels.bench_fp8_24", "--out"],
    "cross_entropy": ["-m", "kernels.bench_cross_entropy", "--out"],
}


class RandomTokens:
    """The TokenData interface over uniform random tokens: benchmarks need shapes, not text."""

    def __init__(self, vocab_size: int, block_size: int, batch_size: int, seed: int):
        self.vocab_size, self.block_size, self.batch_size, self.seed = vocab_size, block_size, batch_size, seed
        self.meta = {"tokenizer": "random", "vocab_size": vocab_size, "eot": 0}
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def batch(self, split: str, step: int, micro: int = 0, device: str | torch.device = "cpu"):
        key = f"{split}{micro % 2}{device}"  # two fixed batches per split: no host work inside the timed region
        if key not in self._cache:
            g = torch.Generator().manual_seed(self.seed + micro)
            xy = torch.randint(0, self.vocab_size, (self.batch_size, self.block_size + 1), generator=g)
            xy = xy.to(device)
            self._cache[key] = (xy[:, :-1], xy[:, 1:])
        return self._cache[key]


def fresh_run(cfg) -> Run:
    # Each method compiles from scratch: dynamo's per-code-object cache is shared by every model in the process,
    # and once it is full later models silently run eager (measured: 0.7x "slowdowns" that were eager steps).
    torch._dynamo.reset()
    data = RandomTokens(min(cfg.model.vocab_size, 50257), cfg.model.block_size, cfg.train.batch_size, cfg.train.seed)
    return setup(cfg, data=data)


def result_row(cfg, run: Run, ms_per_step: float, flops: list[float], step_ms: list[float]) -> dict:
    """The fields every row has: speed (tok/s, dense-equivalent MFU), FLOPs and memory; ms p10/p90 over step_ms."""
    cuda = run.device.type == "cuda"
    q = statistics.quantiles(step_ms, n=10) if len(step_ms) >= 2 else [step_ms[0]] * 9
    tok_per_s = run.tokens_per_step / (ms_per_step / 1e3)
    dense_tok = dense_flops_per_token(cfg.model)
    device_name = torch.cuda.get_device_name(run.device) if cuda else "cpu"
    peak = peak_flops(device_name)
    return {
        "method": cfg.method,
        "device": device_name,
        "torch": torch.__version__,
        "tokens_per_step": run.tokens_per_step,
        "ms_per_step": ms_per_step,
        "ms_p10": q[0],
        "ms_p90": q[-1],
        "tok_per_s": tok_per_s,
        "mfu": tok_per_s * dense_tok / peak if peak else None,  # dense-equivalent: same yardstick for every method
        "flops_per_token": statistics.mean(flops) / run.tokens_per_step,
        "flops_ratio": statistics.mean(flops) / run.tokens_per_step / dense_tok,
        "peak_mem_gb": torch.cuda.max_memory_allocated(run.device) / 2**30 if cuda else None,
        "kernel_report": run.method.kernel_report(),
    }


def time_method(cfg, steps: int, warmup: int, at: float, repeats: int = 5) -> dict:
    run = fresh_run(cfg)
    cuda = run.device.type == "cuda"
    start = int(at * cfg.train.steps)
    if start + warmup + steps > cfg.train.steps:
        raise TrainError(f"--at {at} leaves fewer than warmup+steps={warmup + steps} of train.steps={cfg.train.steps}")
    flops: list[float] = []
    for step in range(start, start + warmup):  # compilation, autotuning, caches
        train_step(run, step)
    # Steps run back to back, as in training (the trainer syncs only at log steps): each repeat times a block of
    # steps between two events, so host work overlaps device work as it does in a real run.
    block = max(1, steps // repeats)
    times = []
    step = start + warmup
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        if cuda:
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
        h0 = time.perf_counter()
        for _ in range(block):
            flops.append(train_step(run, step)[3])
            step += 1
        if cuda:
            t1.record()
            t1.synchronize()
            times.append(t0.elapsed_time(t1) / block)
        else:
            times.append(1e3 * (time.perf_counter() - h0) / block)
    result = result_row(cfg, run, statistics.median(times), flops, times)
    result |= {"timed_steps": [start + warmup, step], "repeats": repeats}
    del run
    if cuda:
        torch.cuda.empty_cache()
    return result


def time_whole_run(cfg) -> dict:
    """Every step of the schedule (0 .. train.steps-1) back to back, as a training run goes through them: the dense
    warm-up, ramps, update steps and the tail all count. Each step is timed between CUDA events (no sync inside the
    run). Steps in which dynamo compiled a graph, and the step after each (where reduce-overhead records its CUDA
    graph), are "warm-up" steps: `wall_s` counts them as they ran; `steady_s` counts each at the median of the other
    steps within 25 of it, the run's time once compiled (a long run's compile time is a constant, not a ratio).
    Update-step graphs record at their second occurrence, which stays in `steady_s` (against the sparse method)."""
    from torch._dynamo.utils import counters

    run = fresh_run(cfg)
    cuda = run.device.type == "cuda"
    n = cfg.train.steps
    tuned = AUTOTUNE.copy()
    marks, compiled, phases, flops = [], [], [], []
    clock = (lambda: torch.cuda.Event(enable_timing=True)) if cuda else time.perf_counter

    def mark():
        if not cuda:
            return clock()
        e = clock()
        e.record()
        return e

    marks.append(mark())
    t_start = time.perf_counter()
    for step in range(n):
        graphs = counters["stats"]["unique_graphs"]
        flops.append(train_step(run, step)[3])
        marks.append(mark())
        compiled.append(counters["stats"]["unique_graphs"] > graphs)
        phases.append(run.method.phase(step) or "all")
        if (step + 1) % max(1, n // 20) == 0:  # host clock: it runs ahead of the GPU by at most a few steps
            console.print(f"  step {step + 1}/{n}: {time.perf_counter() - t_start:.1f} s, "
                          f"{int(sum(compiled))} graphs compiled")
    if cuda:
        marks[-1].synchronize()
        ms = [a.elapsed_time(b) for a, b in zip(marks, marks[1:], strict=False)]
    else:
        ms = [1e3 * (b - a) for a, b in zip(marks, marks[1:], strict=False)]
    warm = [c or (i > 0 and compiled[i - 1]) for i, c in enumerate(compiled)]
    steady = list(ms)
    for i in (i for i, w in enumerate(warm) if w):
        near = [ms[j] for j in range(max(0, i - 25), min(n, i + 26)) if not warm[j]]
        steady[i] = statistics.median(near) if near else ms[i]
    per_phase: dict[str, dict] = {}
    for p, t, st in zip(phases, ms, steady, strict=True):
        d = per_phase.setdefault(p, {"steps": 0, "wall_s": 0.0, "steady_s": 0.0})
        d["steps"] += 1
        d["wall_s"] += t / 1e3
        d["steady_s"] += st / 1e3
    result = result_row(cfg, run, sum(steady) / n, flops, steady)  # tok/s and speedup: the steady time
    result |= {
        "whole_run": True,
        "steps": n,
        "wall_s": sum(ms) / 1e3,
        "steady_s": sum(steady) / 1e3,
        "warmup_steps": sum(warm),
        "graphs": int(sum(compiled)),
        "per_phase": per_phase,
        "step_ms": [round(t, 3) for t in ms],  # as run, compile steps included (warm: `warmup_steps`)
        "warm_steps": [i for i, w in enumerate(warm) if w],
        # autotune keys this run timed itself, and those whose pick came from disk (kernels/autotune.py)
        "autotune": {k: AUTOTUNE[k] - tuned[k] for k in ("timed", "from_disk")},
    }
    del run
    if cuda:
        torch.cuda.empty_cache()
    return result


def run_kernel_benches(names: list[str], out_dir: Path, stamp: str) -> dict:
    results = {}
    for name in names:
        path = out_dir / f"kernels-{name}-{stamp}.json"
        cmd = [sys.executable, *KERNEL_BENCHES[name], str(path)]
        console.print(f"[bold]kernel bench[/bold] {shlex.join(cmd)}")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-2000:])
        results[name] = json.loads(path.read_text()) if path.is_file() else {"error": proc.stderr[-2000:]}
    return results


def for_method(overrides: list[str], method: str) -> list[str]:
    """The overrides that apply to `method`: core sections, and its own section (`--set mst.hsa_stride=64` must not
    break the dense baseline)."""
    return [o for o in overrides if o.split(".", 1)[0] not in REGISTRY or o.split(".", 1)[0] == method]


def variant(label: str) -> tuple[str, list[str]]:
    """'2of4:fp8=true+mvue=false' -> ('2of4', ['2of4.fp8=true', '2of4.mvue=false']): a method and its own overrides."""
    method, _, opts = label.partition(":")
    pairs = opts.split("+") if opts else []
    own = [f"{method}.{kv}" for kv in pairs]
    if any("=" not in kv for kv in pairs):
        raise ConfigError(f"method variant {label!r}: write it as method:key=value+key=value")
    return method, own


def write_results(rows: list[dict], out: Path, stamp: str, command: str, config, extra) -> tuple[list[dict], Path]:
    """(Re)write the JSON and markdown table with the rows measured so far; speedups are against dense."""
    ok = [r for r in rows if "error" not in r]
    dense = next((r for r in ok if r["method"] == "dense"), None)
    for r in ok:
        r["speedup"] = r["tok_per_s"] / dense["tok_per_s"] if dense else None
        if dense and "wall_s" in r:  # whole runs: the same steps, so the time ratio, with and without compiling
            r["wall_speedup"] = dense["wall_s"] / r["wall_s"]
        r["config"] = str(config) if config else None
        r["command"] = command
    device = (ok[0]["device"] if ok else "unknown").replace(" ", "_")
    payload = {"command": command, "config": str(config) if config else None, "overrides": extra,
               "torch": torch.__version__, "cuda": torch.version.cuda, "device": device, "rows": rows}
    json_path = out / f"bench-{device}-{stamp}.json"
    json_path.write_text(json.dumps(payload, indent=2))
    if dense:
        (out / f"bench-{device}-{stamp}.md").write_text(markdown(ok, command))
    return ok, json_path


def gpu_cell(row: dict) -> str:
    """'1980, 612' (median SM clock and board power while the row ran), or '–' where nothing was sampled."""
    gpu = row.get("gpu") or {}
    clock, power = gpu.get("clocks.sm"), gpu.get("power.draw")
    return f"{clock['median']:.0f}, {power['median']:.0f}" if clock and power else "–"


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"`{command}`", "", "| method | ms/step (p10–p90) | tok/s | speedup | dense-eq. MFU | FLOPs/token "
             "(ratio) | peak mem GB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "–"
        mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") else "–"
        lines.append(f"| {r['method']} | {r['ms_per_step']:.1f} ({r['ms_p10']:.1f}–{r['ms_p90']:.1f}) | "
                     f"{r['tok_per_s']:,.0f} | {r['speedup']:.2f}x | {mfu} | {r['flops_per_token'] / 1e6:.0f}M "
                     f"({r['flops_ratio']:.2f}) | {mem} |")
    whole = [r for r in rows if "wall_s" in r]
    if whole:
        lines += ["", "Whole run (every step of the schedule; steady = compile and graph-recording steps at their "
                  "neighbours' median; wall - steady: what compiles, autotuning and recordings cost):", "",
                  "| method | steps | wall s (x dense) | steady s (x dense) | "
                  "wall - steady s (step 0) | graphs | autotune keys timed / from disk | per phase: steps, steady s | "
                  "SM MHz, W (median) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in whole:
            phases = "; ".join(f"{p} {d['steps']}, {d['steady_s']:.1f}" for p, d in r["per_phase"].items())
            tuned = r.get("autotune", {})
            lines.append(f"| {r['method']} | {r['steps']} | {r['wall_s']:.1f} ({r.get('wall_speedup') or 0:.2f}x) | "
                         f"{r['steady_s']:.1f} ({r['speedup'] or 0:.2f}x) | {r['wall_s'] - r['steady_s']:.1f} "
                         f"({r['step_ms'][0] / 1e3:.1f}) | {r['graphs']} | "
                         f"{tuned.get('timed', 0)} / {tuned.get('from_disk', 0)} | {phases} | {gpu_cell(r)} |")
    return "\n".join(lines) + "\n"


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def main(
    config: Path | None = typer.Option(None, "--config", "-c", help="TOML config (as for train.py)"),
    methods: str = typer.Option("dense", help="comma-separated methods; dense is always timed first. A variant adds "
                                "its own section's overrides after a colon, joined by '+': 2of4:fp8=true+mvue=false"),
    set_: list[str] = typer.Option([], "--set", "-s", help="section.key=value overrides for every method"),
    steps: int = typer.Option(20, help="timed steps per method"),
    warmup: int = typer.Option(5, help="untimed steps first (compilation, autotuning, caches)"),
    at: float = typer.Option(0.3, help="start at this fraction of train.steps (inside the methods' sparse phases)"),
    compile: bool | None = typer.Option(None, "--compile/--no-compile", help="override train.compile"),
    kernels: str = typer.Option("", help=f"also run kernel benchmarks: all or a subset of {','.join(KERNEL_BENCHES)}"),
    out: Path = typer.Option(Path("results"), help="folder for bench-<device>-<date>.json/.md"),
    tag: str = typer.Option("", help="suffix for the output file names"),
    whole_run: bool = typer.Option(False, "--whole-run", help="time every step of train.steps instead (the whole "
                                   "schedule: warm-up, ramps, update steps, dense tail); --steps/--warmup/--at unused"),
) -> None:
    """Benchmark training steps of each method against dense (tok/s, ms/step, MFU, FLOPs, memory)."""
    labels = ["dense"] + [m for m in methods.split(",") if m and m != "dense"]
    extra = list(set_) + ([f"train.compile={str(compile).lower()}"] if compile is not None else [])
    try:
        cfgs = [load_config(config, m, for_method(extra, m) + own) for m, own in map(variant, labels)]
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    command = shlex.join(["python", "bench.py", *sys.argv[1:]])
    stamp = datetime.date.today().isoformat() + (f"-{tag}" if tag else "")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for label, cfg in zip(labels, cfgs, strict=True):
        what = f"all {cfg.train.steps} steps" if whole_run else f"{warmup} warm-up + {steps} timed steps"
        console.print(f"[bold]{label}[/bold]: {what}")
        # what the GPU ran at (clocks, power, temperature): a long dense run can hit the power limit
        monitor = GpuMonitor(torch.cuda.current_device()) if torch.cuda.is_available() else GpuMonitor(exe="")
        try:
            with monitor:
                rows.append(time_whole_run(cfg) if whole_run else time_method(cfg, steps, warmup, at))
            rows[-1] |= {"method": label, "gpu": monitor.summary()}
        except Exception as e:  # noqa: BLE001 (one broken method must not lose the others)
            console.print(f"[red]{label} failed:[/red] {type(e).__name__}: {e}")
            rows.append({"method": label, "error": f"{type(e).__name__}: {e}"})
        ok, json_path = write_results(rows, out, stamp, command, config, extra)  # after each method: a killed
        # run keeps what it measured
    if kernels:
        payload = json.loads(json_path.read_text())
        payload["kernels"] = run_kernel_benches(list(KERNEL_BENCHES) if kernels == "all" else kernels.split(","),
                                                out, stamp)
        json_path.write_text(json.dumps(payload, indent=2))
    table = Table("method", "ms/step", "tok/s", "speedup", "MFU", "FLOPs ratio", "peak GB")
    for r in ok:
        table.add_row(r["method"], f"{r['ms_per_step']:.1f}", f"{r['tok_per_s']:,.0f}",
                      f"{r['speedup']:.2f}x" if r["speedup"] else "–", f"{100 * r['mfu']:.1f}%" if r["mfu"] else "–",
                      f"{r['flops_ratio']:.3f}", f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] else "–")
    Console().print(table)
    console.print(f"wrote {json_path}")
    if len(ok) < len(rows):
        raise typer.Exit(1)


if __name__ == "__main__":
    sys.exit(app())
