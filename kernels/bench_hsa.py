"""Benchmark of HSA attention (mode 'sparse') on CUDA: the Triton kernel vs causal flash SDPA vs masked SDPA.

    python -m kernels.bench_hsa --out results/bench_hsa.json [--quick]

For each (T, l) it times forward and forward+backward (CUDA events, warm-up, median of --iters), checks the Triton
output and input grads against an fp32 masked-SDPA reference on the same bf16 inputs (max |err| / max |ref|, next to
the error of bf16 masked SDPA for scale), prints a table and writes JSON. Every variant runs in its own try/except,
so one failure is recorded and the rest still run.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import typer

from kernels.benchutil import rel_err, time_ms
from kernels.hsa_attention import hsa_attention_ref, hsa_attention_triton, hsa_density

CASES = [(1024, 64, 16), (1024, 128, 16), (2048, 64, 8), (2048, 128, 8)]  # (T, stride l, batch B)
QUICK_CASES = [(1024, 64, 16), (2048, 64, 8)]  # the two cases with a target (issue 8)
N_HEAD, HEAD_DIM = 12, 64

app = typer.Typer(add_completion=False)


def _variants(stride: int) -> dict[str, Callable[..., torch.Tensor]]:
    return {
        "sdpa_causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa_masked": lambda q, k, v: hsa_attention_ref(q, k, v, stride),
        "triton_hsa": lambda q, k, v: hsa_attention_triton(q, k, v, stride),
    }


def _check(q, k, v, do, stride: int) -> dict[str, float]:
    """Errors of the Triton kernel and of bf16 masked SDPA against fp32 masked SDPA, output and grads."""
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = hsa_attention_ref(qf, kf, vf, stride)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), do.float())
    errs = {}
    for name, fn in (("triton", hsa_attention_triton), ("sdpa_bf16", hsa_attention_ref)):
        out = fn(q, k, v, stride)
        grads = torch.autograd.grad(out, (q, k, v), do)
        errs[f"{name}_out"] = rel_err(out, ref)
        for g_name, g, g_ref in zip(("dq", "dk", "dv"), grads, ref_grads):
            errs[f"{name}_{g_name}"] = rel_err(g, g_ref)
    return errs


def _run_case(T: int, stride: int, B: int, warmup: int, iters: int) -> dict:
    torch.manual_seed(0)
    shape, dtype = (B, N_HEAD, T, HEAD_DIM), torch.bfloat16
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(shape, device="cuda", dtype=dtype)
    case: dict = {"T": T, "stride": stride, "B": B, "density": hsa_density(T, stride, "sparse"), "variants": {}}
    for name, fn in _variants(stride).items():
        entry: dict[str, object] = {}
        try:
            entry["fwd_ms"] = time_ms(lambda fn=fn: fn(q, k, v), warmup, iters)
            entry["fwd_bwd_ms"] = time_ms(lambda fn=fn: torch.autograd.grad(fn(q, k, v), (q, k, v), do), warmup, iters)
        except Exception as e:  # recorded; the other variants still run
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc(limit=5)
        case["variants"][name] = entry
    try:
        case["errors"] = _check(q, k, v, do, stride)
    except Exception as e:
        case["errors"] = {"error": f"{type(e).__name__}: {e}"}
    base = case["variants"]["sdpa_causal"]
    for entry in case["variants"].values():
        for key in ("fwd_ms", "fwd_bwd_ms"):
            if key in entry and key in base:
                entry[f"speedup_{key[:-3]}"] = base[key] / entry[key]
    return case


@app.command()
def main(
    out: Path = typer.Option(Path("results/bench_hsa.json"), help="JSON file to write."),
    iters: int = typer.Option(20, help="Timed iterations per measurement (median reported)."),
    warmup: int = typer.Option(5, help="Untimed iterations first (the first compiles the kernels)."),
    quick: bool = typer.Option(False, help="Only T=1024 and T=2048 at l=64."),
) -> None:
    if not torch.cuda.is_available():
        raise typer.BadParameter("the HSA benchmark needs a CUDA device")
    import triton

    t_start = time.time()
    record = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "config": {"n_head": N_HEAD, "head_dim": HEAD_DIM, "dtype": "bfloat16", "iters": iters, "warmup": warmup},
        "cases": [],
    }
    for T, stride, B in QUICK_CASES if quick else CASES:
        record["cases"].append(_run_case(T, stride, B, warmup, iters))
        torch.cuda.empty_cache()
    record["wall_s"] = time.time() - t_start

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))

    print(f"{record['device']}  torch {record['torch']}  triton {record['triton']}  nh={N_HEAD} hs={HEAD_DIM} bf16")
    print(f"{'T':>5} {'l':>4} {'B':>3} {'variant':<12} {'fwd ms':>8} {'x':>6} {'fwd+bwd ms':>11} {'x':>6}")
    for case in record["cases"]:
        for name, e in case["variants"].items():
            head = f"{case['T']:>5} {case['stride']:>4} {case['B']:>3} {name:<12}"
            if "error" in e:
                print(f"{head} ERROR {e['error'][:80]}")
            else:
                fwd, both = (
                    f"{e['fwd_ms']:>8.3f} {e['speedup_fwd']:>6.2f}",
                    f"{e['fwd_bwd_ms']:>11.3f} {e['speedup_fwd_bwd']:>6.2f}",
                )
                print(f"{head} {fwd} {both}")
    for case in record["cases"]:
        errs = " ".join(f"{k}={v:.1e}" if isinstance(v, float) else f"{k}={v}" for k, v in case["errors"].items())
        print(f"T={case['T']} l={case['stride']} max rel err vs fp32 masked SDPA: {errs}")
    print(f"wrote {out} ({record['wall_s']:.0f} s)")


if __name__ == "__main__":
    app()
