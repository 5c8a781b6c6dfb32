"""Benchmark of the training loss on CUDA: kernels/cross_entropy.py's Triton kernels against F.cross_entropy on fp32
logits as inductor compiles it (what a compiled step ran before) and eager, at GPT-2's vocabulary.

    python -m kernels.bench_cross_entropy --out results/bench_ce.json [--sweep] [--tokens 16384]

Each row is one variant's forward and forward+backward as CUDA-graph replays (`graph_ms`) on the same bf16 logits
(N tokens x 50304, what lm_head gives under bf16 autocast), with the HBM bytes it must move at least (forward: read
the logits; backward: read them again and write their gradient) and the bandwidth that makes. The Triton loss and
gradient are checked against fp32 F.cross_entropy. --sweep first times each kernel at every (block, warps) of a
small grid and runs the rows at the fastest (printed, to be copied into FWD_*/BWD_* of kernels/cross_entropy.py).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch
import typer

from kernels import cross_entropy as ce
from kernels.benchutil import graph_ms, record_header, rel_err

VOCAB = 50304
SWEEP = [(b, w) for b in (2048, 4096, 8192, 16384) for w in (4, 8, 16) if b // (32 * w) >= 4]

app = typer.Typer(add_completion=False)


def make_inputs(N: int, V: int = VOCAB, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 logits on the GPU with a spread like a trained lm_head's, targets with every 50th ignored (-1)."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=gen) * 3).to("cuda", torch.bfloat16)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::50] = -1
    return logits, targets.cuda()


def _variants() -> dict:
    compiled = torch.compile(ce.cross_entropy_ref)
    return {"triton": ce.cross_entropy_triton, "inductor": compiled, "eager": ce.cross_entropy_ref}


def _fwd_bwd(fn, logits: torch.Tensor, targets: torch.Tensor):
    leaf = logits.detach().requires_grad_()

    def call():
        leaf.grad = None
        fn(leaf, targets).backward()
        return leaf.grad

    return call


def check(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Triton against fp32 F.cross_entropy: |loss difference| / loss, and the gradient's max rel error."""
    got_leaf, want_leaf = logits.detach().requires_grad_(), logits.detach().float().requires_grad_()
    got = ce.cross_entropy_triton(got_leaf, targets)
    want = ce.cross_entropy_ref(want_leaf, targets)
    got.backward()
    want.backward()
    return {
        "loss_rel": abs(got.item() - want.item()) / abs(want.item()),
        "grad_rel": rel_err(got_leaf.grad, want_leaf.grad),
    }


def _kernel_call(kernel: str, logits: torch.Tensor, targets: torch.Tensor):
    if kernel == "fwd":
        return lambda: ce._fwd_impl(logits, targets, -1)
    _, lse = ce._fwd_impl(logits, targets, -1)
    scale = torch.ones((), device="cuda")
    return lambda: ce._bwd_impl(logits, targets, lse, scale, -1)


def _install(kernel: str, block: int, warps: int) -> None:
    setattr(ce, f"{kernel.upper()}_BLOCK", block)
    setattr(ce, f"{kernel.upper()}_WARPS", warps)


def sweep(logits: torch.Tensor, targets: torch.Tensor, log) -> dict:
    """Each kernel at every SWEEP entry, the other at its current setting; installs the fastest of each."""
    found = {}
    for kernel in ("fwd", "bwd"):
        times = {}
        for block, warps in SWEEP:
            _install(kernel, block, warps)
            times[block, warps] = graph_ms(_kernel_call(kernel, logits, targets))
            log(f"{kernel} block={block} warps={warps}: {times[block, warps]:.4f} ms")
        block, warps = min(times, key=times.get)
        _install(kernel, block, warps)
        found[kernel] = {
            "ms": {f"{b}x{w}": ms for (b, w), ms in times.items()},
            "best": {"block": block, "warps": warps},
        }
    return found


@app.command()
def main(
    out: Path = typer.Option(Path("results/bench_ce.json"), help="JSON file to write."),
    tokens: int = typer.Option(16384, help="Rows of logits (GPT-2 124M at B=16, T=1024: 16384)."),
    sweep_: bool = typer.Option(False, "--sweep", help="Sweep the kernels' block and warps first."),
) -> None:
    if not torch.cuda.is_available():
        raise typer.BadParameter("the cross-entropy benchmark needs a CUDA device")
    t0 = time.time()
    logits, targets = make_inputs(tokens)
    N, V = logits.shape
    elt = logits.element_size()
    record: dict = record_header("all (training loss)", "kernels.bench_cross_entropy") | {
        "config": {"tokens": N, "vocab": V, "dtype": "bfloat16", "timing": "CUDA-graph replays, best of 3 x 50"},
        "bytes": {"fwd": N * V * elt, "fwd_bwd": 3 * N * V * elt},
    }
    if sweep_:
        record["sweep"] = sweep(logits, targets, lambda s: print(s, flush=True))
    record["kernel_config"] = {"fwd": [ce.FWD_BLOCK, ce.FWD_WARPS], "bwd": [ce.BWD_BLOCK, ce.BWD_WARPS]}
    record["errors"] = check(logits, targets)
    rows = []
    for name, fn in _variants().items():
        fwd = graph_ms(functools.partial(fn, logits, targets))
        fwd_bwd = graph_ms(_fwd_bwd(fn, logits, targets))
        rows.append({"variant": name, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd,
                     "fwd_GB_per_s": record["bytes"]["fwd"] / fwd / 1e6,
                     "fwd_bwd_GB_per_s": record["bytes"]["fwd_bwd"] / fwd_bwd / 1e6})  # fmt: skip
    base = next(r for r in rows if r["variant"] == "inductor")
    for r in rows:
        r["speedup"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    record["rows"] = rows
    record["wall_s"] = time.time() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"{record['device']}  {N} x {V} bf16 logits; triton vs fp32 ref: {record['errors']}")
    for r in rows:
        print(
            f"{r['variant']:>9}: fwd {r['fwd_ms']:.4f} ms ({r['fwd_GB_per_s']:.0f} GB/s), fwd+bwd "
            f"{r['fwd_bwd_ms']:.4f} ms ({r['fwd_bwd_GB_per_s']:.0f} GB/s), {r['speedup']:.2f}x of inductor"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    app()
