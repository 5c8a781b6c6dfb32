"""Benchmark of HSA attention (mode 'sparse') on CUDA: the Triton kernel vs causal flash SDPA vs masked SDPA, and a
sweep of the kernel's launch configurations.

    python -m kernels.bench_hsa --out results/bench_hsa.json [--quick]
    python -m kernels.bench_hsa --sweep --out results/hsa_sweep.json    # the two target cases, < 3 min on an H100
    python -m kernels.bench_hsa --host-cost --out host.json  # any machine: a compiled call's host work (host_cost)
    python -m kernels.bench_hsa --per-kernel --quick --out k.json   # each kernel alone: ms, bytes, GB/s

Bench: for each (T, l), forward and forward+backward of every variant (median of --iters calls) in two modes:
- eager: calls queued back to back with a CUDA event pair around each, as training issues them. Where the host's
  work per call (HSA: a custom op and two Triton launches per pass) outlasts the GPU's, this is the host's time;
- graph: the same call warmed up on a side stream, captured once in a CUDA graph and replayed: the GPU's time;
and two layouts: `bhtd`, contiguous (B, nh, T, hs) q, k, v leaves (the kernels alone), and `model`, q, k, v split
from one (B, T, 3C) leaf as c_attn's output is and y made (B, T, C) as CausalSelfAttention does (the copies around
attention that a training step pays). Speedups are against causal flash SDPA of the same mode and layout. Every
eager row runs before any graph row (a failed capture leaves the CUDA generator unusable; inputs come from a CPU
generator). Triton's output and input grads are checked against fp32 masked SDPA on the same bf16 inputs (max
|err| / max |ref|), next to bf16 masked SDPA's errors for scale. A failing variant records its error; the rest run.

Sweep (--sweep): at the two target cases (issue 8: T=1024 and 2048, l=64; or --cases), each kernel in turn
(strided forward, band forward, strided backward, band backward) runs every launch configuration of a small grid,
the kernels swept before it at their fastest and the rest at default_config. Each configuration's whole pass (the
forward or the backward kernels, both) is checked against fp32 masked SDPA (one outside twice bf16 SDPA's error +
1e-3 is never picked) and timed as CUDA-graph replays. The fastest configurations are printed as TUNED entries for
kernels/hsa_attention.py, then installed (in this process only) for the bench rows of the swept cases, which run
after the sweep (its captures draw nothing from the CUDA generator). Configurations left when --budget-s runs out
are recorded as skipped. The JSON is rewritten after every swept case and every bench case.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
import typer

from kernels import hsa_attention as hsa
from kernels.benchutil import capture, host_work, record_header, rel_err, stubbed_launches, time_ms
from kernels.hsa_attention import HsaConfig, Launch, hsa_attention_ref, hsa_attention_triton

CASES = [(1024, 64, 16), (1024, 128, 16), (2048, 64, 8), (2048, 128, 8)]  # (T, stride l, batch B)
QUICK_CASES = [(1024, 64, 16), (2048, 64, 8)]  # the two cases with a target (issue 8)
N_HEAD, HEAD_DIM = 12, 64
MODES = ("eager", "graph")
LAYOUTS = ("bhtd", "model")

app = typer.Typer(add_completion=False)


def _variants(stride: int) -> dict[str, Callable[..., torch.Tensor]]:
    return {
        "sdpa_causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa_masked": lambda q, k, v: hsa_attention_ref(q, k, v, stride),
        "triton_hsa": lambda q, k, v: hsa_attention_triton(q, k, v, stride),
    }


def make_inputs(
    T: int, B: int, device: str, n_head: int = N_HEAD, head_dim: int = HEAD_DIM, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v stacked as (B, T, 3, nh, hs) and dO (B, nh, T, hs), from a CPU generator (the same values in every
    mode, no draw from the CUDA generator)."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, 3, n_head, head_dim, generator=gen).to(device, dtype)
    return qkv, torch.randn(B, n_head, T, head_dim, generator=gen).to(device, dtype)


def make_call(
    attn: Callable[..., torch.Tensor], qkv: torch.Tensor, do: torch.Tensor, layout: str, backward: bool
) -> Callable[[], object]:
    """One forward (and backward, to the leaves) of attn(q, k, v) in `layout`, on leaves of its own made from qkv:
    a CUDA-graph capture must not see an autograd graph of an earlier call."""
    B, T, _, H, D = qkv.shape
    if layout == "bhtd":
        leaves = [qkv[:, :, n].transpose(1, 2).contiguous().requires_grad_() for n in range(3)]
        dy = do

        def fwd() -> torch.Tensor:
            return attn(*leaves)

    else:
        leaves = [qkv.reshape(B, T, 3 * H * D).clone().requires_grad_()]
        dy = do.transpose(1, 2).reshape(B, T, H * D)

        def fwd() -> torch.Tensor:
            q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in leaves[0].split(H * D, dim=2))
            return attn(q, k, v).transpose(1, 2).contiguous().view(B, T, H * D)

    if not backward:
        return fwd
    return lambda: torch.autograd.grad(fwd(), leaves, dy)


def time_call(call: Callable[[], object], mode: str, warmup: int, iters: int) -> float:
    """Median ms of call in `mode` (eager: back to back; graph: replays of one capture)."""
    if mode == "graph":
        call = capture(call)[0].replay
    return time_ms(call, warmup, iters, sync_each=False)


def _reference(q, k, v, do, stride: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Masked SDPA's output and input grads, computed in `dtype`."""
    x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = hsa_attention_ref(*x, stride)
    return out.detach(), list(torch.autograd.grad(out, x, do.to(dtype)))


def check_errors(qkv: torch.Tensor, do: torch.Tensor, stride: int) -> dict[str, float]:
    """Errors of the Triton kernel and of masked SDPA in the inputs' dtype against fp32 masked SDPA."""
    q, k, v = (qkv[:, :, n].transpose(1, 2).contiguous() for n in range(3))
    ref, ref_grads = _reference(q, k, v, do, stride, torch.float32)
    errs = {}
    x = [t.requires_grad_() for t in (q, k, v)]
    triton_out = hsa_attention_triton(*x, stride)
    results = {"triton": (triton_out, torch.autograd.grad(triton_out, x, do)),
               "sdpa_low": _reference(q, k, v, do, stride, q.dtype)}  # fmt: skip
    for name, (out, grads) in results.items():
        errs[f"{name}_out"] = rel_err(out, ref)
        for g_name, g, g_ref in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
            errs[f"{name}_{g_name}"] = rel_err(g, g_ref)
    return errs


def case_rows(T: int, stride: int, B: int, mode: str, warmup: int, iters: int, device: str = "cuda") -> list[dict]:
    """Every variant x layout of one case in one mode; speedups against sdpa_causal of the same layout."""
    qkv, do = make_inputs(T, B, device)
    rows = []
    for layout in LAYOUTS:
        for name, fn in _variants(stride).items():
            row: dict = {"T": T, "stride": stride, "B": B, "layout": layout, "mode": mode, "variant": name}
            try:
                for key, backward in (("fwd_ms", False), ("fwd_bwd_ms", True)):
                    row[key] = time_call(make_call(fn, qkv, do, layout, backward), mode, warmup, iters)
            except Exception as e:  # noqa: BLE001 (recorded; the other variants still run)
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                row["traceback"] = traceback.format_exc(limit=5)
            rows.append(row)
        base = rows[-len(_variants(stride))]
        for row in rows[-len(_variants(stride)) :]:
            for key in ("fwd_ms", "fwd_bwd_ms"):
                if key in row and key in base:
                    row[f"speedup_{key[:-3]}"] = base[key] / row[key]
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Sweep of the launch configurations.


def sweep_candidates(kernel: str) -> list[Launch]:
    """The grid `kernel` is swept over (configurations that cannot run a shape are dropped per shape). The maxnreg
    caps are where ptxas (sm_90a, head dim 64) fits one more program per SM with little or no spilling."""
    if kernel.startswith("strided"):  # no loop: num_stages does nothing; small tiles waste less of S off the blocks
        warps = {16: (1, 2), 32: (2, 4), 64: (2, 4, 8), 128: (4, 8)}
        grid = [Launch(rows, w) for rows, ws in warps.items() for w in ws]
        return grid + ([Launch(64, 4, maxnreg=128)] if kernel == "strided_bwd" else [])
    if kernel == "band_fwd":
        grid = [Launch(m, w, stages, 64) for m in (64, 128) for w in (4, 8) for stages in (1, 2, 3)]
        return grid + [
            Launch(64, 4, 2, 64, maxnreg=128), Launch(64, 4, 2, 32), Launch(64, 4, 1, 128), Launch(64, 8, 1, 128),
            Launch(64, 4, 1, 128, maxnreg=168), Launch(128, 8, 2, 128),
        ]  # fmt: skip
    grid = [Launch(64, w, stages) for w in (4, 8) for stages in (1, 2, 3)]
    return grid + [Launch(64, 4, 1, maxnreg=168), Launch(64, 4, 2, maxnreg=168), Launch(32, 4, 2),
                   Launch(128, 8, 1), Launch(128, 8, 2)] + [
        Launch(64, 4, 1, maxnreg=cap, unrolled=True) for cap in (None, 168, 128)]  # l <= 65 only  # fmt: skip


def sweep_case(
    T: int,
    stride: int,
    B: int,
    timer: Callable[[Callable[[], object]], float],
    deadline: float,
    device: str = "cuda",
    n_head: int = N_HEAD,
    head_dim: int = HEAD_DIM,
    dtype: torch.dtype = torch.bfloat16,
    candidates: Callable[[str], list[Launch]] = sweep_candidates,
    log: Callable[[str], None] = print,
) -> dict:
    """Coordinate descent over the four kernels' launch configurations of one shape: each kernel's candidates with
    the kernels before it at their best; a candidate counts only if its pass is within the error bound. Candidates
    not started by time.time() = deadline are recorded as skipped."""
    qkv, do = make_inputs(T, B, device, n_head, head_dim, dtype)
    q, k, v = (qkv[:, :, n].transpose(1, 2).contiguous() for n in range(3))
    ref_o, ref_grads = _reference(q, k, v, do, stride, torch.float32)
    low_o, low_grads = _reference(q, k, v, do, stride, dtype)
    tol_o = 2 * rel_err(low_o, ref_o) + 1e-3
    tol_g = [2 * rel_err(a, b) + 1e-3 for a, b in zip(low_grads, ref_grads, strict=True)]
    default = hsa.default_config(T, stride, head_dim)
    best = default
    o, lse = hsa.hsa_forward(q, k, v, stride, best)
    result: dict = {"T": T, "stride": stride, "B": B, "n_head": n_head, "head_dim": head_dim, "kernels": {}}
    for kernel in HsaConfig._fields:
        trials = []
        for launch in candidates(kernel):
            cfg = best._replace(**{kernel: launch})
            if hsa.config_error(cfg, T, stride, head_dim) is not None:
                continue
            trial: dict = {"launch": asdict(launch)}
            trials.append(trial)
            if time.time() > deadline:
                trial["error"] = "skipped: time budget"
                continue
            try:
                if kernel.endswith("fwd"):
                    run = lambda cfg=cfg: hsa.hsa_forward(q, k, v, stride, cfg)
                    errs, tols = [rel_err(run()[0], ref_o)], [tol_o]
                else:
                    run = lambda cfg=cfg, o=o, lse=lse: hsa.hsa_backward(q, k, v, o, lse, do, stride, cfg)
                    errs, tols = [rel_err(g, r) for g, r in zip(run(), ref_grads, strict=True)], tol_g
                trial["max_rel_err"] = max(errs)
                trial["ok"] = all(e <= t for e, t in zip(errs, tols, strict=True))
                trial["ms"] = timer(run)
            except Exception as e:  # noqa: BLE001 (e.g. out of shared memory: recorded, never picked)
                trial["error"] = f"{type(e).__name__}: {e}"[:300]
            log(f"T={T} l={stride} {kernel:<11} {launch} " + _trial_text(trial))
        good = [t for t in trials if t.get("ok") and "ms" in t]
        if good:
            best = best._replace(**{kernel: Launch(**min(good, key=lambda t: t["ms"])["launch"])})
        if kernel == "band_fwd":  # the backward trials run on the best forward's (o, lse)
            o, lse = hsa.hsa_forward(q, k, v, stride, best)
        result["kernels"][kernel] = {"best": asdict(getattr(best, kernel)), "trials": trials}
    for name, cfg in (("default", default), ("tuned", best)):
        result[f"{name}_fwd_ms"] = timer(lambda cfg=cfg: hsa.hsa_forward(q, k, v, stride, cfg))
        result[f"{name}_bwd_ms"] = timer(lambda cfg=cfg: hsa.hsa_backward(q, k, v, o, lse, do, stride, cfg))
    result["tuned_entry"] = f"({T}, {stride}, {head_dim}): {best!r},"
    return result


KERNELS = ("_strided_fwd_kernel", "_band_fwd_kernel", "_strided_bwd_kernel", "_band_bwd_kernel")


def hbm_bytes(T: int, B: int, n_head: int = N_HEAD, head_dim: int = HEAD_DIM, elt: int = 2) -> dict[str, int]:
    """The bytes each kernel must move to or from HBM at least: every (B, nh, T, hs) tensor it reads or writes once
    (t), lse and delta in fp32 (s).
    - strided fwd: q, k, v -> o, lse; band fwd: q, k, v, o, lse -> o, lse;
    - strided bwd: q, k, v, o, dO, lse -> dQ, dK, dV, delta; band bwd: q, k, v, dO, lse, delta, dQ, dK, dV -> dQ, dK,
      dV;
    - `one_pass`: a design reading each input once (fwd: q, k, v -> o, lse; bwd: q, k, v, o, dO, lse -> dQ, dK, dV)."""
    t, s = B * n_head * T * head_dim * elt, B * n_head * T * 4
    per = {"_strided_fwd_kernel": 4 * t + s, "_band_fwd_kernel": 5 * t + 2 * s,
           "_strided_bwd_kernel": 8 * t + 2 * s, "_band_bwd_kernel": 10 * t + 2 * s}  # fmt: skip
    return per | {"two_pass": sum(per.values()), "one_pass": (4 * t + s) + (8 * t + s)}


def kernel_rows(T: int, stride: int, B: int, warmup: int, iters: int) -> dict:
    """Each kernel alone as CUDA-graph replays (the other three stubbed out while the pass is captured), plain
    (B, nh, T, hs) inputs: its ms, its hbm_bytes and the bandwidth that makes; both passes whole, and causal flash
    SDPA's forward and fwd+bwd for scale."""
    qkv, do = make_inputs(T, B, "cuda")
    q, k, v = (qkv[:, :, n].transpose(1, 2).contiguous() for n in range(3))
    o, lse = hsa.hsa_forward(q, k, v, stride)
    passes = {"fwd": lambda: hsa.hsa_forward(q, k, v, stride),
              "bwd": lambda: hsa.hsa_backward(q, k, v, o, lse, do, stride)}  # fmt: skip
    graph_ms = lambda fn: time_call(fn, "graph", warmup, iters)
    nbytes = hbm_bytes(T, B)
    row: dict = {"T": T, "stride": stride, "B": B, "kernels": {}}
    for name in KERNELS:
        others = tuple(n for n in KERNELS if n != name)
        with stubbed_launches(hsa, others):
            ms = graph_ms(passes["fwd" if "fwd" in name else "bwd"])
        row["kernels"][name] = {"ms": ms, "bytes": nbytes[name], "GB_per_s": nbytes[name] / ms / 1e6}
    row["hsa_fwd_ms"], row["hsa_bwd_ms"] = graph_ms(passes["fwd"]), graph_ms(passes["bwd"])
    flash = _variants(stride)["sdpa_causal"]
    row["flash_fwd_ms"] = time_call(make_call(flash, qkv, do, "bhtd", False), "graph", warmup, iters)
    row["flash_fwd_bwd_ms"] = time_call(make_call(flash, qkv, do, "bhtd", True), "graph", warmup, iters)
    row["hsa_speedup_fwd_bwd"] = row["flash_fwd_bwd_ms"] / (row["hsa_fwd_ms"] + row["hsa_bwd_ms"])
    row["bytes_two_pass"], row["bytes_one_pass"] = nbytes["two_pass"], nbytes["one_pass"]
    return row


def _trial_text(trial: dict) -> str:
    if "error" in trial:
        return trial["error"]
    return f"{trial['ms']:.4f} ms  err {trial['max_rel_err']:.1e}{'' if trial['ok'] else '  OUT OF BOUND'}"


def compiled_kernels() -> dict[str, list[dict]]:
    """What Triton built for each HSA kernel on this device: block sizes, warps, stages, the register cap, and
    the registers, spills and shared memory that bound how many programs share an SM (triton 3.6 internals)."""
    out = {}
    for name in KERNELS:
        fn = getattr(hsa, name)
        entries = []
        for kernel in fn.device_caches[torch.cuda.current_device()][0].values():
            md = kernel.metadata
            consts = kernel.src.constants.items()
            entry = {fn.arg_names[path[0]]: v if isinstance(v, int) else str(v) for path, v in consts}
            entry |= {"num_warps": md.num_warps, "num_stages": md.num_stages, "maxnreg": getattr(md, "maxnreg", None),
                      "shared": md.shared}  # fmt: skip
            entry |= {"n_regs": getattr(kernel, "n_regs", None), "n_spills": getattr(kernel, "n_spills", None)}
            entries.append(entry)
        out[name.strip("_")] = entries
    return out


def host_cost(
    n_calls: int = 8, compile_backend: str = "aot_eager", reps: int = 20, T: int = 128, stride: int = 16
) -> dict[str, float]:
    """Host time and function calls per HSA attention fwd+bwd in a compiled chain of `n_calls` (each call's output
    is the next one's q; B=2, nh=2, hs=16, fp32), on the CPU with the Triton launches
    stubbed out: the Triton path's host work (graph guards, op dispatch, config lookup, allocations) without the
    launches. Returns µs per call (this process's CPU time on one torch thread, the best of 5 rounds of `reps`
    steps), Python and C calls per call (one profiled step), launches per call and the graphs dynamo compiled."""
    from torch._dynamo.testing import CompileCounterWithBackend

    kernels = ("_strided_fwd_kernel", "_band_fwd_kernel", "_strided_bwd_kernel", "_band_bwd_kernel")
    with stubbed_launches(hsa, kernels) as launches:
        gen = torch.Generator().manual_seed(0)
        # (B, T, nh, hs) leaves seen as (B, nh, T, hs), the model's layout, which the outputs keep: no copies.
        leaves = [torch.randn(2, T, 2, 16, generator=gen, requires_grad=True) for _ in range(3)]

        def chain(*leaves: torch.Tensor) -> torch.Tensor:
            q, k, v = (x.transpose(1, 2) for x in leaves)
            for _ in range(n_calls):
                q = hsa_attention_triton(q, k, v, stride)
            return q

        torch._dynamo.reset()
        counter = CompileCounterWithBackend(compile_backend)
        compiled = torch.compile(chain, backend=counter, fullgraph=True)
        dy = torch.randn(2, 2, T, 16, generator=gen)

        def step() -> None:
            compiled(*leaves).backward(dy)

        for _ in range(3):
            step()
        cost = host_work(step, launches, reps, n_calls, "call")
    return cost | {"graphs": counter.frame_count}


# ----------------------------------------------------------------------------------------------------------------


def _print_rows(rows: list[dict]) -> None:
    print(f"{'T':>5} {'l':>4} {'B':>3} {'layout':<6} {'mode':<6} {'variant':<12} {'fwd ms':>8} {'x':>6} "
          f"{'fwd+bwd ms':>11} {'x':>6}")  # fmt: skip
    for r in rows:
        head = f"{r['T']:>5} {r['stride']:>4} {r['B']:>3} {r['layout']:<6} {r['mode']:<6} {r['variant']:<12}"
        if "error" in r:
            print(f"{head} ERROR {r['error'][:80]}")
        else:
            print(f"{head} {_fmt(r, 'fwd_ms', 8, 3)} {_fmt(r, 'speedup_fwd', 6, 2)} {_fmt(r, 'fwd_bwd_ms', 11, 3)} "
                  f"{_fmt(r, 'speedup_fwd_bwd', 6, 2)}")  # fmt: skip


def _fmt(row: dict, key: str, width: int, digits: int) -> str:
    return f"{row[key]:>{width}.{digits}f}" if key in row else f"{'-':>{width}}"


@app.command()
def main(
    out: Path = typer.Option(Path("results/bench_hsa.json"), help="JSON file to write."),
    iters: int = typer.Option(20, help="Timed calls per measurement (median reported)."),
    warmup: int = typer.Option(5, help="Untimed calls first (the first compiles the kernels)."),
    quick: bool = typer.Option(False, help="Only T=1024 and T=2048 at l=64."),
    cases_: str = typer.Option("", "--cases", help="Comma-separated TxLxB (e.g. 1024x256x16) instead of the defaults."),
    sweep: bool = typer.Option(False, help="Sweep launch configurations first (at --cases, else the --quick cases)."),
    budget_s: float = typer.Option(110.0, help="Sweep: start no configuration after this many seconds."),
    host_cost_: bool = typer.Option(False, "--host-cost", help="Only host_cost(), both backends (CPU)."),
    per_kernel: bool = typer.Option(False, help="Only kernel_rows(): each kernel alone, its bytes and bandwidth."),
) -> None:
    if host_cost_:
        record = {backend: host_cost(compile_backend=backend) for backend in ("aot_eager", "inductor")}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))
        print(json.dumps(record, indent=1))
        return
    if not torch.cuda.is_available():
        raise typer.BadParameter("the HSA benchmark needs a CUDA device")
    t_start = time.time()
    record: dict = record_header("mst (HSA attention) against causal flash SDPA", "kernels.bench_hsa") | {
        "config": {"n_head": N_HEAD, "head_dim": HEAD_DIM, "dtype": "bfloat16", "iters": iters, "warmup": warmup,
                   "timing": "back to back, event pair per call"},  # fmt: skip
    }

    def write() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record | {"wall_s": time.time() - t_start}, indent=1))

    if cases_:
        cases = [tuple(int(n) for n in case.split("x") if n.isdigit()) for case in cases_.split(",")]
        if any(len(case) != 3 or min(case) < 1 for case in cases):
            raise typer.BadParameter(f"--cases: comma-separated TxLxB, e.g. 1024x64x16,2048x64x8; got {cases_!r}")
    else:
        cases = QUICK_CASES if quick or sweep else CASES
    if per_kernel:
        record["per_kernel"] = []
        for T, stride, B in cases:
            row = kernel_rows(T, stride, B, warmup, iters)
            record["per_kernel"].append(row)
            write()
            for name, r in row["kernels"].items():
                print(f"T={T} l={stride} {name}: {r['ms']:.4f} ms, {r['bytes'] / 1e6:.0f} MB, {r['GB_per_s']:.0f} GB/s")
            print(f"T={T} l={stride} hsa fwd {row['hsa_fwd_ms']:.4f} bwd {row['hsa_bwd_ms']:.4f} ms, flash fwd+bwd "
                  f"{row['flash_fwd_bwd_ms']:.4f} ms: {row['hsa_speedup_fwd_bwd']:.2f}x")
        print(f"wrote {out}")
        return
    if sweep:
        record["sweep"] = []
        graph_timer = lambda fn: time_call(fn, "graph", warmup, iters)
        for T, stride, B in cases:
            swept = sweep_case(T, stride, B, graph_timer, t_start + budget_s, log=lambda s: print(s, flush=True))
            record["sweep"].append(swept)
            hsa.TUNED[(T, stride, HEAD_DIM)] = HsaConfig(
                *(Launch(**swept["kernels"][name]["best"]) for name in HsaConfig._fields)
            )
            write()
            torch.cuda.empty_cache()
    record["tuned"] = [list(key) for key in hsa.TUNED]  # the shapes whose rows below ran a swept configuration
    record["rows"], record["errors"] = [], {}
    for mode in MODES:  # eager rows first: a failed capture breaks the CUDA generator
        for T, stride, B in cases:
            if mode == "eager":
                try:
                    record["errors"][f"T={T},l={stride}"] = check_errors(*make_inputs(T, B, "cuda"), stride)
                except Exception as e:  # noqa: BLE001
                    record["errors"][f"T={T},l={stride}"] = {"error": f"{type(e).__name__}: {e}"}
            record["rows"] += case_rows(T, stride, B, mode, warmup, iters)
            torch.cuda.empty_cache()
            write()

    print(f"{record['device']}  torch {record['torch']}  triton {record['triton']}  nh={N_HEAD} hs={HEAD_DIM} bf16")
    for swept in record.get("sweep", []):
        print(f"sweep T={swept['T']} l={swept['stride']}: fwd {swept['default_fwd_ms']:.4f} -> "
              f"{swept['tuned_fwd_ms']:.4f} ms, bwd {swept['default_bwd_ms']:.4f} -> {swept['tuned_bwd_ms']:.4f} ms "
              "(default -> tuned, graph replays)")  # fmt: skip
    if record.get("sweep"):
        print("TUNED entries for kernels/hsa_attention.py:")
        for swept in record["sweep"]:
            print(f"    {swept['tuned_entry']}")
    _print_rows(record["rows"])
    for case, errs in record["errors"].items():
        text = " ".join(f"{k}={v:.1e}" if isinstance(v, float) else f"{k}={v}" for k, v in errs.items())
        print(f"{case} max rel err vs fp32 masked SDPA: {text}")
    try:
        record["compiled"] = compiled_kernels()
    except Exception as e:  # noqa: BLE001 (Triton internals: informative only)
        record["compiled"] = {"error": f"{type(e).__name__}: {e}"}
    write()
    print(f"wrote {out} ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    app()
