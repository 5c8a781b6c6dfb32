"""Plot the curves of one or several runs on shared figures.

    python -m tools.plot out/dense out/mst out/2of4 --out plots/

Writes loss.png (train and val loss vs tokens, vs training FLOPs and vs wall-clock) and, for each metric
namespace a method logs (mst/, 2of4/, sat/, ...), <namespace>.png with its scalar curves over steps.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import typer

from core.log import read_metrics

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

# Per-layer series (e.g. "mst/sparsity/h.3.mlp.c_fc") are drawn thin and unlabeled beside their mean.
LOG_Y = ("flip_rate",)


def _series(records: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    pts = [(r[x], r[key]) for r in records if isinstance(r.get(key), int | float) and r.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(run_dirs: list[Path], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {d.name if d.name else str(d): read_metrics(d) for d in run_dirs}
    missing = [name for name, recs in runs.items() if not recs]
    if missing:
        raise FileNotFoundError(f"no metrics.jsonl records in: {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, recs in runs.items():
        for ax, xkey, xlabel in zip(axes, ("tokens", "flops", "elapsed_s"), ("tokens", "training FLOPs", "seconds")):
            line = ax.plot(*_series(recs, "train_loss", xkey), alpha=0.35, lw=1)[0]
            ax.plot(*_series(recs, "val_loss", xkey), "o-", color=line.get_color(), label=name, ms=3)
            ax.set_xlabel(xlabel)
    for ax in axes:
        ax.set_ylabel("loss (thin: train, dots: val)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_xscale("log")
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    namespaces: dict[str, set[str]] = defaultdict(set)
    for recs in runs.values():
        for r in recs:
            for k in r:
                if "/" in k:
                    namespaces[k.split("/", 1)[0]].add(k)
    for ns, keys in sorted(namespaces.items()):
        scalars = sorted(k for k in keys if k.count("/") == 1)
        fig, axes = plt.subplots(1, len(scalars), figsize=(4.2 * len(scalars), 3.6), squeeze=False)
        for ax, key in zip(axes[0], scalars):
            for name, recs in runs.items():
                line = ax.plot(*_series(recs, key), label=name, lw=1.5)[0]
                for sub in sorted(k for k in keys if k.startswith(key + "/")):
                    ax.plot(*_series(recs, sub), color=line.get_color(), lw=0.5, alpha=0.35)
            if any(s in key for s in LOG_Y):
                ax.set_yscale("log")
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / f"{ns}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def main(
    runs: list[Path] = typer.Argument(..., help="run folders holding metrics.jsonl"),
    out: Path | None = typer.Option(None, help="where to write the PNGs (default: <first run>/plots)"),
) -> None:
    """Write PNG curves (loss vs tokens / FLOPs / wall-clock, and each method's metrics) for one or more runs."""
    try:
        written = plot_runs(runs, out or runs[0] / "plots")
    except FileNotFoundError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    for p in written:
        typer.echo(str(p))


if __name__ == "__main__":
    sys.exit(app())
