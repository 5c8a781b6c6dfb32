"""A scaled copy of the papers' GPT-2 experiments (MST, RigL, static, 2:4, SAT against dense), and its report.

    python -m tools.reproduce run                          # every configs/small/*.toml, then eval.py on each
    python -m tools.reproduce run --only dense,mst --eval-data ../data
    python -m tools.reproduce run --micro --scale 0.01 --device cpu --data-dir tokens/stdlib-byte  # CPU smoke run
    python -m tools.reproduce report                       # REPORT.md + PNGs from the run folders

`run` trains each config through train.py in a subprocess, into <out-root>/<config name>, and scores it zero-shot
with eval.py. It is resumable per run: a finished run (ckpt.pt at its last step, eval.json written) is skipped, an
interrupted one continues with --resume, one trained but not scored is only scored. Each folder gets run.json: the
commands that produced it, their wall-clock and the machine. `report` reads only the run folders, so anyone with
the folders regenerates the same table, plots and verdicts on the papers' claims.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from core.config import Config, ConfigError, load_config
from core.log import format_flops, read_metrics
from sparsity import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
console = Console(stderr=True, highlight=False, soft_wrap=True)
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)

TASKS = "wikitext2,ptb,lambada,wikitext103"  # WikiText-103's test set is the same articles as WT2: ~10 s more
# The report's rows in this order; any other runs after them.
ORDER = ("dense", "tiny", "static", "rigl", "mst", "mst-nohsa", "mst-block", "2of4", "sat", "sat-mlp")
# Method knobs counted in steps: --scale shrinks them with the run. Floor 2, so an MST/RigL update step (which
# skips the optimizer step) never lands on every step; 0 (never) stays 0.
STEP_KNOBS = {"mst": ("delta_t", "stair_interval"), "rigl": ("delta_t", "stair_interval"),
              "static": ("delta_t", "stair_interval"), "2of4": ("mask_interval", "decay_search_steps")}
# --micro: a model small enough for a CPU smoke test of the whole pipeline (byte vocab: pair it with a
# byte-tokenized --data-dir such as tokens/stdlib-byte). Method sections apply only to runs of that method.
MICRO = ["model.preset=tiny", "model.n_layer=0", "model.n_head=0", "model.n_embd=0", "model.block_size=64",
         "model.vocab_size=256", "train.batch_size=4", "train.compile=false", "mst.hsa_stride=16",
         "sat.channel_multiple=16"]
EVAL_UNITS = 5000  # --scale s scores the first s·5000 passages/lines of each task (LAMBADA has 5,153)

# Thresholds of the verdicts in REPORT.md (stated there next to each verdict).
MST_FLOPS = 0.25  # MST: "≤ 1/4 of dense training FLOPs" [MST paper]
LOSS_TOL = 0.01  # "within 1% of dense loss": val loss at most 1% above the reference's
FLOP_TOL = 0.10  # two runs count as "equal FLOPs" within 10%


class ReproduceError(RuntimeError):
    """A problem the user can fix (missing data, configs that disagree, a run folder of another scale)."""


# ---------------------------------------------------------------------------------------------------------------
# Planning: which runs, with which overrides


@dataclass
class RunPlan:
    config: Path  # relative to the repo root, where train.py runs
    cfg: Config  # resolved, with every override applied
    sets: list[str]  # the --set arguments that get train.py from the file to cfg
    scale: float
    name: str

    @property
    def out_dir(self) -> Path:
        return ROOT / self.cfg.train.out_dir  # absolute stays absolute


def discover(config_dir: Path, only: str | None) -> dict[str, Path]:
    """{run name: config} for every <config_dir>/*.toml, in report order; `only` is a comma list of names."""
    found = {p.stem: p for p in sorted(config_dir.resolve().glob("*.toml"))}
    if not found:
        raise ReproduceError(f"no *.toml configs in {config_dir}")
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in names if n not in found]
        if unknown:
            raise ReproduceError(f"--only: no config {', '.join(unknown)} in {config_dir}; have {', '.join(found)}")
        found = {n: found[n] for n in names}
    return dict(sorted(found.items(), key=lambda kv: order_key(kv[0])))


def rel(path: Path) -> Path:
    """A path as the commands should show it: relative to the repo root (their cwd) when inside it."""
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def order_key(name: str) -> tuple[int, str]:
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)


def _method_of(path: Path) -> str:
    return tomllib.loads(path.read_text()).get("method", "dense")


def applicable(sets: list[str], method: str) -> list[str]:
    """The overrides that concern a run: core sections always, a method's section only for that method."""
    return [s for s in sets if s.split(".", 1)[0] not in REGISTRY or s.split(".", 1)[0] == method]


def scaled(cfg: Config, scale: float) -> list[str]:
    """Overrides that shrink a run to `scale` of its steps, its step-counted intervals with it (floor 1 or 2)."""
    if scale == 1.0:
        return []
    t = cfg.train
    shrink = lambda n, floor=1: max(floor, round(n * scale)) if n > 0 else 0
    sets = [f"train.steps={shrink(t.steps, 4)}", f"train.eval_steps={shrink(t.eval_steps)}"]
    sets += [f"train.{k}={shrink(getattr(t, k))}" for k in ("eval_interval", "log_interval", "warmup_steps",
                                                            "ckpt_interval", "lr_decay_steps")]
    sets += [f"{cfg.method}.{k}={shrink(getattr(cfg.method_cfg, k), 2)}" for k in STEP_KNOBS.get(cfg.method, ())]
    return sets


def plan_runs(configs: dict[str, Path], out_root: Path, scale: float, sets: list[str], device: str,
              data_dir: Path | None) -> list[RunPlan]:
    """Resolve every config with its overrides; the runs must share one token budget, seed and data order."""
    plans = []
    for name, path in configs.items():
        method = _method_of(path)
        base = applicable(sets, method) + [f"train.out_dir={rel(out_root / name)}", f"train.device={device}"]
        base += [f"data.dir={rel(data_dir)}"] if data_dir else []
        try:
            cfg = load_config(path, None, base)
            extra = scaled(cfg, scale)
            cfg = load_config(path, None, base + extra)
        except ConfigError as e:
            raise ReproduceError(f"{path}: {e}") from None
        plans.append(RunPlan(rel(path), cfg, base + extra, scale, name=name))
    check_shared(plans)
    return plans


def check_shared(plans: list[RunPlan]) -> None:
    """Every run trains on the same tokens in the same order: same [train] (but out_dir), [data], T and vocab."""
    def shared(cfg: Config) -> dict[str, Any]:
        d = cfg.to_dict()
        train = {k: v for k, v in d["train"].items() if k != "out_dir"}
        return {"train": train, "data": d["data"], "block_size": cfg.model.block_size,
                "vocab_size": cfg.model.vocab_size}

    ref = shared(plans[0].cfg)
    for p in plans[1:]:
        mine = shared(p.cfg)
        for section, values in mine.items():
            if values != ref[section]:
                diff = {k: v for k, v in values.items() if ref[section].get(k) != v} if isinstance(values, dict) \
                    else values
                raise ReproduceError(f"{p.config} and {plans[0].config} disagree on {section}: {diff}")


# ---------------------------------------------------------------------------------------------------------------
# Running: skip, resume or start each run, then score it


def ckpt_info(out_dir: Path) -> dict[str, Any] | None:
    """step, config and env of <out_dir>/ckpt.pt (memory-mapped: only the small fields are read)."""
    path = out_dir / "ckpt.pt"
    if not path.is_file():
        return None
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return {"step": ckpt["step"], "config": ckpt["config"], "env": ckpt.get("env", {})}


def run_state(out_dir: Path, steps: int) -> str:
    """'done' (trained, then scored by `run`), 'eval' (trained, not scored), 'resume' (interrupted) or 'fresh'."""
    info = ckpt_info(out_dir)
    if info is None:
        return "fresh"
    saved = info["config"]["train"]["steps"]
    if saved != steps:
        raise ReproduceError(f"{out_dir} holds a run of {saved} steps, not {steps} (another --scale?): use another "
                             "--out-root or delete the folder")
    if info["step"] < steps - 1:
        return "resume"
    scored = (out_dir / "eval.json").is_file() and "eval" in _load_json(out_dir / "run.json").get("commands", {})
    return "done" if scored and (out_dir / "eval.json").stat().st_mtime >= (out_dir / "ckpt.pt").stat().st_mtime \
        else "eval"


def _run(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run a command from the repo root, its output on the terminal and appended to `log`; (exit code, seconds)."""
    console.print(f"[dim]$ {shlex.join(cmd)}[/dim]")
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:
            sys.stderr.write(line)
            fh.write(line)
        code = proc.wait()
    return code, time.perf_counter() - t0


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def execute(p: RunPlan, tasks: str, eval_data: Path | None, eval_limit: int | None, device: str) -> str:
    """Bring one run to 'done'; returns what was done. Raises ReproduceError if a subprocess fails."""
    state = run_state(p.out_dir, p.cfg.train.steps)
    if state == "done":
        return "skipped (finished)"
    p.out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = p.out_dir / "run.json"
    new = {"name": p.name, "config": str(p.config), "commands": {"train": []}, "seconds": {"train": 0.0, "eval": 0.0},
           "scale": p.scale}
    meta = (state != "fresh" and _load_json(meta_path)) or new
    log = p.out_dir / "reproduce.log"
    if state in ("fresh", "resume"):
        cmd = [sys.executable, "train.py", "--config", str(p.config)]
        for s in p.sets:
            cmd += ["--set", s]
        cmd += ["--resume"] if state == "resume" else ["--overwrite"]  # fresh: metrics of a run with no ckpt go
        meta["commands"]["train"].append(shlex.join(["python", *cmd[1:]]))
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")  # recorded even if this attempt is killed
        code, seconds = _run(cmd, log)
        meta["seconds"]["train"] += seconds
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        if code != 0:
            raise ReproduceError(f"{p.name}: train.py exited with {code} (log: {log})")
    cmd = [sys.executable, "eval.py", "--ckpt", str(rel(p.out_dir)), "--tasks", tasks, "--device", device]
    cmd += ["--data-dir", str(rel(eval_data))] if eval_data else []
    cmd += ["--limit", str(eval_limit)] if eval_limit else []
    code, seconds = _run(cmd, log)
    if code != 0:
        raise ReproduceError(f"{p.name}: eval.py exited with {code} (log: {log})")
    meta["commands"]["eval"] = shlex.join(["python", *cmd[1:]])  # marks the run scored (run_state)
    meta["seconds"]["eval"] = seconds
    meta["env"] = (ckpt_info(p.out_dir) or {}).get("env", {})
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return {"fresh": "trained and scored", "resume": "resumed and scored", "eval": "scored"}[state]


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def run(
    only: str | None = typer.Option(None, help="comma list of run names (config file stems), e.g. dense,mst"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (train.py and eval.py)"),
    out_root: Path = typer.Option(Path("out/reproduce-small"), help="one run folder per config under it"),
    scale: float = typer.Option(1.0, help="shrink steps, intervals and eval to this fraction (smoke runs)"),
    configs: Path = typer.Option(ROOT / "configs" / "small", help="folder of run configs, one *.toml per run"),
    data_dir: Path | None = typer.Option(None, help="tokenized corpus for every run (default: each config's data.dir)"),
    eval_data: Path | None = typer.Option(None, envvar="SPT_EVAL_DATA", help="eval files (eval.py --data-dir)"),
    tasks: str = typer.Option(TASKS, help="eval.py --tasks"),
    eval_limit: int | None = typer.Option(None, help="eval.py --limit (default: all at scale 1, else scale·5000)"),
    micro: bool = typer.Option(False, "--micro", help="CPU smoke scale: tiny byte-vocab model, batch 4 (see MICRO)"),
    set_: list[str] = typer.Option([], "--set", help="extra section.key=value for every run (a method's section "
                                   "only for runs of that method)"),
) -> None:
    """Train and score every run that is not finished yet; a failed run is reported and the others go on."""
    if not 0 < scale <= 1:
        raise typer.BadParameter(f"must be in (0, 1], got {scale}", param_hint="--scale")
    try:
        plans = plan_runs(discover(configs, only), out_root.resolve(), scale, (MICRO if micro else []) + set_,
                          device, data_dir.resolve() if data_dir else None)
        data = Path(plans[0].cfg.data.dir)
        data = data if data.is_absolute() else ROOT / data
        if not (data / "meta.json").is_file():
            raise ReproduceError(f"no tokenized corpus at {data}: run `python -m data.prepare <corpus> --out {data} "
                                 "--max-tokens 30000000` (or `make reproduce-small` with ENWIKI=<corpus folder>)")
    except ReproduceError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    limit = eval_limit or (None if scale == 1.0 else max(4, round(EVAL_UNITS * scale)))
    failed = []
    for p in plans:
        t = p.cfg.train
        console.rule(f"{p.name}: {p.cfg.method}, {t.steps} steps x {t.batch_size * t.grad_accum} x "
                     f"{p.cfg.model.block_size} tokens -> {p.out_dir}")
        try:
            console.print(f"{p.name}: {execute(p, tasks, eval_data.resolve() if eval_data else None, limit, device)}")
        except ReproduceError as e:
            console.print(f"[red]error:[/red] {e}")
            failed.append(p.name)
    if failed:
        console.print(f"[red]{len(failed)} run(s) failed:[/red] {', '.join(failed)}; rerun the same command to retry")
        raise typer.Exit(1)
    console.print(f"all {len(plans)} runs finished; the report: python -m tools.reproduce report --out-root {out_root}")


# ---------------------------------------------------------------------------------------------------------------
# Report: read the run folders, write REPORT.md and the plots


@dataclass
class Result:
    name: str
    folder: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    evals: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config.get("method", "dense")

    @property
    def steps(self) -> int:
        return int(self.config["train"]["steps"])

    @property
    def last(self) -> dict[str, Any]:
        return self.records[-1]

    @property
    def finished(self) -> bool:
        return self.last["step"] == self.steps - 1

    @property
    def val_loss(self) -> float:
        return next(r["val_loss"] for r in reversed(self.records) if r.get("val_loss") is not None)

    @property
    def flops(self) -> float:
        return float(self.last["flops"])

    @property
    def seconds(self) -> float:
        """Training time after step 0: the first step's CUDA/cuBLAS warm-up is no method's cost."""
        return float(self.last["elapsed_s"]) - float(self.records[0]["elapsed_s"])

    @property
    def device(self) -> str:
        env = self.meta.get("env", {})
        return env.get("device_name") or self.evals.get("device") or "?"

    @property
    def model(self) -> str:
        m = self.config["model"]
        return f"{m['n_layer']}x{m['n_embd']}, T={m['block_size']}"


def collect(out_root: Path) -> dict[str, Result]:
    """Every run folder under out_root that holds metrics records and config.json, in report order."""
    found = {}
    for d in sorted(out_root.iterdir()) if out_root.is_dir() else []:
        records = read_metrics(d)
        if records and (d / "config.json").is_file():
            found[d.name] = Result(d.name, d, _load_json(d / "config.json"), records, _load_json(d / "eval.json"),
                                   _load_json(d / "run.json"))
    if not found:
        raise ReproduceError(f"no run folders (metrics.jsonl + config.json) under {out_root}")
    return dict(sorted(found.items(), key=lambda kv: order_key(kv[0])))


def _gap(a: Result, b: Result) -> float:
    """Relative val-loss gap of a over b (+ = a is worse)."""
    return a.val_loss / b.val_loss - 1.0


def _verdict(ok: bool) -> str:
    return "**held**" if ok else "**not held**"


def claims(runs: dict[str, Result]) -> list[str]:
    """The papers' claims, each judged from the measured numbers with the threshold stated in the sentence."""
    out = []
    dense, mst = runs.get("dense"), runs.get("mst")
    missing = lambda *names: f"not tested: run {' and '.join(n for n in names if n not in runs)} missing"

    claim = f"MST trains on ≤ {MST_FLOPS:.2f} of dense training FLOPs [MST]"
    if dense and mst:
        ratio = mst.flops / dense.flops
        out.append(f"{claim}: {ratio:.3f} of dense → {_verdict(ratio <= MST_FLOPS)}")
    else:
        out.append(f"{claim}: {missing('dense', 'mst')}")

    for name, label in (("mst", "MST"), ("mst-nohsa", "MST without HSA"), ("2of4", "2:4"), ("sat", "SAT")):
        claim = f"{label} reaches dense quality (final val loss at most {LOSS_TOL:.0%} above dense's)"
        if dense and name in runs:
            gap = _gap(runs[name], dense)
            out.append(f"{claim}: {runs[name].val_loss:.4f} vs {dense.val_loss:.4f} ({gap:+.2%}) → "
                       f"{_verdict(gap <= LOSS_TOL)}")
        else:
            out.append(f"{claim}: {missing('dense', name)}")

    for name, label in (("static", "static sparse"), ("rigl", "RigL"), ("tiny", "the FLOP-matched dense model")):
        claim = f"{label} is worse than MST at equal FLOPs [MST]"
        if mst and name in runs:
            r = runs[name]
            ratio = r.flops / mst.flops
            equal = abs(ratio - 1.0) <= FLOP_TOL
            note = "" if equal else f"; FLOPs differ by more than {FLOP_TOL:.0%}, so this is not an equal-FLOPs test"
            out.append(f"{claim}: val loss {r.val_loss:.4f} vs MST {mst.val_loss:.4f} ({_gap(r, mst):+.2%}) at "
                       f"{ratio:.2f}x MST's FLOPs{note} → {_verdict(r.val_loss > mst.val_loss)}")
        else:
            out.append(f"{claim}: {missing('mst', name)}")

    claim = f"Hybrid Sparse Attention costs no quality (MST's val loss at most {LOSS_TOL:.0%} above MST without HSA)"
    if mst and "mst-nohsa" in runs:
        gap = _gap(mst, runs["mst-nohsa"])
        out.append(f"{claim}: {mst.val_loss:.4f} vs {runs['mst-nohsa'].val_loss:.4f} ({gap:+.2%}) → "
                   f"{_verdict(gap <= LOSS_TOL)}")
    else:
        out.append(f"{claim}: {missing('mst', 'mst-nohsa')}")

    claim = "Block MST (64x64 tiles; our extension, no paper claim) against element MST at the same budget"
    if mst and "mst-block" in runs:
        blk = runs["mst-block"]
        out.append(f"{claim}: val loss {blk.val_loss:.4f} vs {mst.val_loss:.4f} ({_gap(blk, mst):+.2%}), "
                   f"{blk.flops / mst.flops:.2f}x its FLOPs → measured, no verdict")
    else:
        out.append(f"{claim}: {missing('mst', 'mst-block')}")

    for name, label, paper in (("2of4", "2:4", "up to 1.2x end to end on an RTX 3090"),
                               ("sat", "SAT", "45% more throughput in Llama-2 continual pretraining")):
        claim = f"{label} trains faster than dense end to end (wall-clock ratio < 1; paper: {paper})"
        if dense and name in runs:
            ratio = runs[name].seconds / dense.seconds
            out.append(f"{claim}: {ratio:.2f}x dense's time → {_verdict(ratio < 1.0)}")
        else:
            out.append(f"{claim}: {missing('dense', name)}")
    return out


def caveats(runs: dict[str, Result]) -> list[str]:
    """What limits the verdicts, read from the runs themselves."""
    out = ["One seed per run: no error bars, so gaps of a fraction of a percent may be seed noise."]
    unfinished = [f"{r.name} (step {r.last['step'] + 1}/{r.steps})" for r in runs.values() if not r.finished]
    if unfinished:
        out.append(f"Unfinished runs, compared at their last evaluation: {', '.join(unfinished)}.")
    scales = {r.meta.get("scale", 1.0) for r in runs.values()}
    devices = {r.device for r in runs.values()}
    if devices & {"cpu", "?"}:
        out.append(f"Devices: {', '.join(sorted(devices))}. Wall-clock ratios off a GPU say nothing about the "
                   "methods' speed.")
    if len(devices) > 1:
        out.append("The runs ran on different devices: wall-clock ratios compare the machines too.")
    if scales != {1.0}:
        out.append(f"Scaled runs (--scale {', '.join(map(str, sorted(scales)))}): a smoke test, not a reproduction.")
    dense = runs.get("dense")
    mfus = [x["mfu"] for x in dense.records if x.get("mfu")] if dense and dense.device not in ("cpu", "?") else []
    if mfus and (mfu := statistics.median(mfus)) < 0.2:
        out.append(f"Dense trained at a median {mfu:.1%} MFU: at this size the step is bound by host and kernel-launch "
                   "overhead rather than by GEMM FLOPs, so the wall-clock ratios show each method's per-step "
                   "overhead, not what its FLOP savings buy on a large model (results/bench-* times the methods at "
                   "GPT-2 124M).")
    tokens = {r.last["tokens"] for r in runs.values()}
    if len(tokens) > 1:
        out.append(f"The runs saw different token counts ({', '.join(f'{t:,}' for t in sorted(tokens))}).")
    return out


def _ppl_word(r: Result, task: str) -> str:
    m = r.evals.get(task)
    return f"{m['ppl_word']:.1f}" if m else "–"


def table(runs: dict[str, Result]) -> list[str]:
    dense = runs.get("dense")
    head = ["run", "method", "model", "val loss", "val ppl", "WT2 ppl", "PTB ppl", "LAMBADA acc", "LAMBADA ppl",
            "WT103 ppl", "train FLOPs", "FLOPs / dense", "wall-clock s", "time / dense", "device"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs.values():
        lam = r.evals.get("lambada")
        ratio = lambda x, y: f"{x / y:.3f}" if dense else "–"
        cells = [r.name + ("" if r.finished else " (unfinished)"), r.method, r.model, f"{r.val_loss:.4f}",
                 f"{math.exp(r.val_loss):.2f}", _ppl_word(r, "wikitext2"), _ppl_word(r, "ptb"),
                 f"{100 * lam['acc']:.2f}%" if lam else "–", f"{lam['ppl']:.1f}" if lam else "–",
                 _ppl_word(r, "wikitext103"), format_flops(r.flops), ratio(r.flops, dense.flops if dense else 1),
                 f"{r.seconds:.1f}", ratio(r.seconds, dense.seconds if dense else 1), r.device]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


# --- plots --------------------------------------------------------------------------------------------------------

PHASE_COLORS = {0: "tab:orange", 1: "tab:blue", 2: "tab:green"}  # MST warm-up, ultra-sparse, restoration


def _xy(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _shade(ax, records: list[dict], key: str, colors: dict[int, str], labels: dict[int, str]) -> None:
    """Shade the step ranges where metric `key` (a phase id) holds each value."""
    steps, values = _xy(records, key)
    if not steps:
        return
    steps.append(steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1))  # the last record's own span
    start = 0
    for i, v in enumerate(values):
        end = steps[i + 1]
        if i + 1 == len(values) or values[i + 1] != v:
            ax.axvspan(steps[start], end, color=colors.get(int(v), "grey"), alpha=0.12, lw=0,
                       label=labels.get(int(v)))
            start = i + 1
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)


def method_plots(runs: dict[str, Result], dest: Path) -> list[Path]:
    """sparsity-mst.png (phases shaded), flip-rate-2of4.png (dense fine-tune shaded), omission-sat.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    mst_runs = [r for r in runs.values() if r.method == "mst"]
    if mst_runs:
        fig, axes = plt.subplots(1, len(mst_runs), figsize=(6 * len(mst_runs), 4), squeeze=False)
        for ax, r in zip(axes[0], mst_runs):
            ax.plot(*_xy(r.records, "mst/target_sparsity"), "--", color="grey", lw=1, label="target s(t)")
            ax.plot(*_xy(r.records, "mst/sparsity"), color="black", lw=1.5, label="realised sparsity")
            ax.plot(*_xy(r.records, "mst/attn_density"), color="tab:red", lw=1, label="attention density (HSA)")
            _shade(ax, r.records, "mst/phase", PHASE_COLORS, {0: "warm-up", 1: "ultra-sparse", 2: "restoration"})
            ax.set(title=f"{r.name}: weight sparsity over steps", xlabel="step", ylim=(-0.02, 1.02))
            ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(dest / "sparsity-mst.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    for method, key, name, title, log in (("2of4", "2of4/flip_rate", "flip-rate-2of4.png", "2:4 flip rate", True),
                                          ("sat", "sat/omission_rate", "omission-sat.png", "SAT omission rate",
                                           False)):
        group = [r for r in runs.values() if r.method == method]
        if not group:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for r in group:
            ax.plot(*_xy(r.records, key), lw=1.5, label=r.name, drawstyle="default" if log else "steps-post")
        if method == "2of4":
            _shade(ax, group[0].records, "2of4/phase", {0: "white", 1: "tab:green"}, {1: "dense fine-tune"})
        if log:
            ax.set_yscale("log")
        ax.set(title=title, xlabel="step", ylabel=key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(dest / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def render(runs: dict[str, Result], out_root: Path, dest: Path, plots: list[Path]) -> str:
    dense = runs.get("dense")
    t = next(iter(runs.values()))
    tokens = t.last["tokens"]
    lines = [
        "# reproduce-small: the papers' GPT-2 claims at a small scale",
        "",
        f"Generated by `python -m tools.reproduce report --out-root {out_root} --dest {dest}` from the run folders "
        f"(configs: `configs/small/`). Every run: {t.steps:,} steps, {tokens:,} tokens, seed "
        f"{t.config['train']['seed']}, the same batches (data `{t.config['data']['dir']}`). Val loss: mean over the "
        f"same {t.config['train']['eval_steps']} validation batches at the last step. Zero-shot: eval.py "
        "(perplexity per word for the corpora, LAMBADA last-word accuracy and perplexity). FLOPs: training FLOPs "
        "summed from metrics.jsonl (sparse GEMMs at their density). Wall-clock: `elapsed_s` from the end of step 0 to "
        "the last step: training steps only (no evaluation, checkpointing or first-step warm-up).",
        "",
        *table(runs),
        "",
        "## The papers' claims at this scale",
        "",
        f"Thresholds: quality = final val loss at most {LOSS_TOL:.0%} above the reference; equal FLOPs = within "
        f"{FLOP_TOL:.0%}; MST's FLOP budget = {MST_FLOPS:.2f} of dense.",
        "",
        *[f"- {c}" for c in claims(runs)],
        "",
        "Caveats:",
        "",
        *[f"- {c}" for c in caveats(runs)],
        "",
        "## Plots",
        "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "## Commands", ""]
    for r in runs.values():
        cmds = r.meta.get("commands", {})
        lines.append(f"- **{r.name}**" + ("" if cmds else ": (no run.json: not run by tools.reproduce)"))
        lines += [f"  - `{c}`" for c in [*cmds.get("train", []), *([cmds["eval"]] if "eval" in cmds else [])]]
        secs = r.meta.get("seconds")
        if secs:
            lines.append(f"  - process wall-clock: train {secs['train']:.0f} s, eval {secs['eval']:.0f} s")
    if dense is None:
        lines += ["", "No dense run: ratios to dense are not available."]
    return "\n".join(lines) + "\n"


def summary(runs: dict[str, Result]) -> list[dict[str, Any]]:
    """One record per run in results/'s JSON convention (method, device, config, command, torch, figures); speedup
    is dense's training wall-clock over the run's (both from these run folders)."""
    dense = runs.get("dense")
    out = []
    for r in runs.values():
        rates = [x for x in r.records if x.get("tok_per_s")]
        out.append({
            "run": r.name, "method": r.method, "device": r.device, "config": r.meta.get("config"),
            "command": (r.meta.get("commands", {}).get("train") or [None])[-1],
            "torch": r.meta.get("env", {}).get("torch"), "model": r.model,
            "tok_per_s": statistics.median(x["tok_per_s"] for x in rates) if rates else None,
            "mfu": statistics.median(x["mfu"] for x in rates if x.get("mfu")) if any(x.get("mfu") for x in rates)
            else None,
            "speedup": dense.seconds / r.seconds if dense and r.seconds > 0 else None,
            "train_seconds": r.seconds, "tokens": r.last["tokens"], "val_loss": r.val_loss,
            "flops": r.flops, "flops_ratio": r.flops / dense.flops if dense else None,
            "eval": {task: v for task, v in r.evals.items() if isinstance(v, dict) and task != "data"},
        })
    return out


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def report(
    out_root: Path = typer.Option(Path("out/reproduce-small"), help="the run folders written by `run`"),
    dest: Path = typer.Option(Path("results/reproduce-small"), help="where REPORT.md and the PNGs go"),
) -> None:
    """Regenerate REPORT.md (table, verdicts on the papers' claims, commands) and the PNG plots."""
    from tools.plot import plot_runs

    try:
        runs = collect(out_root)
    except ReproduceError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    dest.mkdir(parents=True, exist_ok=True)
    plots = plot_runs([r.folder for r in runs.values()], dest) + method_plots(runs, dest)
    (dest / "REPORT.md").write_text(render(runs, out_root, dest, plots))
    (dest / "results.json").write_text(json.dumps(summary(runs), indent=2) + "\n")
    for p in [dest / "REPORT.md", dest / "results.json", *plots]:
        typer.echo(str(p))


if __name__ == "__main__":
    sys.exit(app())
