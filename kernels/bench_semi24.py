"""Benchmark of the 2:4 kernels against dense bf16 at GPT-2 FFN shapes: `python -m kernels.bench_semi24 --out r.json`.

Per (d, tokens, orientation): a sparse linear's fwd+bwd (with the per-step re-pack, and with the per-step mask search
too) against nn.Linear under bf16 autocast, both ways the method runs it eagerly (backend 'auto' = per-GEMM measured
fallback, 'cusparselt' = every GEMM sparse) and replayed from CUDA graphs (`sparse_graphed_fwd_bwd`, graph-timed
plans, static operands re-packed in place for '+repack'; `dense_graphed_fwd_bwd` is the dense linear graphed the
same way, so `*_vs_dense_graphed` speed-ups leave out what graphs save on the dense side). Then each piece alone:
mask search, prune+pack, the tile op, MVUE+pack, and each GEMM sparse (searched algorithm, plus a CUDA-graph replay)
vs dense. Per (d, tokens), orientation 'mlp': the whole MLP c_fc -> GELU -> c_proj fwd+bwd as training runs it
(`SparseMLP24`: graphed sparse, and eager) against the dense MLP, eager and graphed.
Every fast path is checked against the reference (max rel. error in the JSON). CUDA events, warm-up, median of
repeats. Each variant is isolated: a failure records its error string and the run goes on. A time budget skips what
is left. `--quick`: d 1024, 1280 x tokens 16k, 64k, only the whole-linear and MLP rows (about a minute on an H100).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels import semi24 as s
from kernels.benchutil import capture, rel_norm_err, time_ms
from model.gpt import MLP, GPTConfig

_T0 = time.perf_counter()
FP8 = False  # --fp8: every Linear24 made here runs its GEMMs in e4m3 (2of4.fp8)


def _randn(*shape: int) -> torch.Tensor:
    """Inputs drawn on the CPU: a failed CUDA-graph capture (the MLP rows may have one) leaves the CUDA generator
    unusable for the rest of the process."""
    return torch.randn(*shape)


class Row:
    """One benchmark configuration: named timings, errors and checks, filled variant by variant."""

    def __init__(self, **key):
        self.data = {**key, "ms": {}, "speedup": {}, "max_rel_err": {}, "errors": {}}

    def run(self, name: str, fn: Callable[[], object], budget_s: float) -> object:
        if time.perf_counter() - _T0 > budget_s:
            self.data["errors"][name] = "skipped: time budget"
            return None
        try:
            return fn()
        except Exception as e:  # one failing variant must not end the run
            self.data["errors"][name] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc(limit=2)
            return None
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()


def _graphed_step(cap: s.GraphedFwdBwd, x: torch.Tensor, dy: torch.Tensor, params, before=None) -> Callable[[], None]:
    """One training-like call of a graphed fwd+bwd: fp32 leaf x cast to the compute dtype outside, as Linear24 does."""
    def step():
        if before is not None:
            before()
        x.grad = None
        for p in params:
            p.grad = None
        cap(x.to(dy.dtype)).backward(dy)
    return step


def bench_graphed(row: Row, lin: torch.nn.Linear, idx: torch.Tensor, x: torch.Tensor, dy: torch.Tensor,
                  warmup: int, reps: int, budget_s: float) -> None:
    """Rows dense_graphed_fwd_bwd and sparse_graphed_fwd_bwd(+repack) of one linear."""
    ms, sp, err = row.data["ms"], row.data["speedup"], row.data["max_rel_err"]
    w, xb = lin.weight, x.detach().bfloat16()

    def dense():
        cap = s.GraphedFwdBwd(lambda xx: F.linear(xx, w.to(xx.dtype)), [w], xb)
        ms["dense_graphed_fwd_bwd"] = time_ms(_graphed_step(cap, x, dy, [w]), warmup, reps)
    row.run("dense_graphed_fwd_bwd", dense, budget_s)

    def sparse():
        m = s.Linear24.from_dense(lin, backend="auto", mvue=True, fp8=FP8)
        m.set_mask(idx)
        m.set_graph_mode(True)
        for _ in range(2):  # eager calls first: they make the graph-timed GEMM plans
            x.grad = None
            m(x.to(dy.dtype)).backward(dy)
        cap = s.GraphedFwdBwd(m, [w], xb)
        ref = s.Linear24.from_dense(lin, backend="ref", mvue=False, fp8=FP8)
        ref.set_mask(idx)
        err["graphed_y"] = rel_norm_err(cap(xb), ref(xb))
        repack = lambda: (m.invalidate(), m.operands(dy.dtype))
        for tag, before in (("", None), ("+repack", repack)):
            ms[f"sparse_graphed_fwd_bwd{tag}"] = time_ms(_graphed_step(cap, x, dy, [w], before), warmup, reps)
        row.data["graph_plans"] = {k[0]: v.sparse for k, v in s.PLANS.items()
                                   if k[1:4] == (*w.shape, x.shape[0]) and k[-1] == "graph"}
    row.run("sparse_graphed_fwd_bwd", sparse, budget_s)
    for tag in ("", "+repack"):
        name = f"sparse_graphed_fwd_bwd{tag}"
        if ms.get(name) and ms.get("dense_fwd_bwd"):
            sp[name] = ms["dense_fwd_bwd"] / ms[name]
        if ms.get(name) and ms.get("dense_graphed_fwd_bwd"):
            sp[f"{name}_vs_dense_graphed"] = ms["dense_graphed_fwd_bwd"] / ms[name]


def bench_mlp(d: int, T: int, warmup: int, reps: int, budget_s: float) -> dict:
    """The MLP block c_fc -> GELU -> c_proj, fwd+bwd: SparseMLP24 (graphed, eager) vs the dense MLP (eager, graphed)."""
    row = Row(d=d, tokens=T, orientation="mlp", weight=[[4 * d, d], [d, 4 * d]])
    ms, sp, err = row.data["ms"], row.data["speedup"], row.data["max_rel_err"]
    dense = MLP(GPTConfig(n_layer=1, n_head=1, n_embd=d, bias=False)).cuda()
    params = list(dense.parameters())
    x = _randn(T, d).cuda().requires_grad_(True)
    dy = _randn(T, d).cuda().bfloat16()
    ac = torch.autocast("cuda", torch.bfloat16)

    def eager_step(m: torch.nn.Module, before=None) -> Callable[[], None]:
        def step():
            if before is not None:
                before()
            x.grad = None
            for p in params:
                p.grad = None
            with ac:
                y = m(x * 1.0)  # a non-leaf input, like ln_2's output
            y.backward(dy)
        return step

    ms["dense_mlp"] = row.run("dense_mlp", lambda: time_ms(eager_step(dense), warmup, reps), budget_s)

    def dense_graphed():
        w1, w2 = dense.c_fc.weight, dense.c_proj.weight
        fn = lambda xx: F.linear(F.gelu(F.linear(xx, w1.to(xx.dtype)), approximate="tanh"), w2.to(xx.dtype))
        cap = s.GraphedFwdBwd(fn, [w1, w2], x.detach().bfloat16())
        ms["dense_mlp_graphed"] = time_ms(_graphed_step(cap, x, dy, params), warmup, reps)
    row.run("dense_mlp_graphed", dense_graphed, budget_s)

    def sparse(graph: bool):
        mlp = MLP(GPTConfig(n_layer=1, n_head=1, n_embd=d, bias=False)).cuda()
        for k in ("c_fc", "c_proj"):
            lin24 = s.Linear24.from_dense(getattr(dense, k), backend="auto", mvue=True, fp8=FP8)
            lin24.set_mask(s.transposable_search(lin24.weight))
            setattr(mlp, k, lin24)
        m = s.SparseMLP24(mlp, cuda_graph=graph)
        tag = "sparse_mlp_graphed" if graph else "sparse_mlp_eager"
        step = eager_step(m)
        for _ in range(m.warmup + 1):
            step()
        if graph and not m._graphs:
            raise RuntimeError(f"not captured (broken: {sorted(s._BROKEN)})")
        ms[tag] = time_ms(step, warmup, reps)
        if graph:  # the replayed output against the masked dense reference on the same masks
            refs = [s.Linear24.from_dense(lin, backend="ref", mvue=False, fp8=FP8) for lin in (m.c_fc, m.c_proj)]
            for r, lin in zip(refs, (m.c_fc, m.c_proj), strict=True):
                r.set_mask(lin.mask_index)
            with ac:
                err["mlp_graphed_y"] = rel_norm_err(m(x * 1.0), refs[1](mlp.gelu(refs[0](x.detach()))))
            # The replayed output above is already dropped: a live one would make the next call run eagerly.
            repack = lambda: [lin.invalidate() for lin in (m.c_fc, m.c_proj)]
            ms[f"{tag}+repack"] = time_ms(eager_step(m, repack), warmup, reps)
    row.run("sparse_mlp_graphed", lambda: sparse(True), budget_s)
    row.run("sparse_mlp_eager", lambda: sparse(False), budget_s)
    for name in ("sparse_mlp_graphed", "sparse_mlp_graphed+repack", "sparse_mlp_eager", "dense_mlp_graphed"):
        if ms.get(name) and ms.get("dense_mlp"):
            sp[name] = ms["dense_mlp"] / ms[name]
        if name.startswith("sparse_mlp_graphed") and ms.get(name) and ms.get("dense_mlp_graphed"):
            sp[f"{name}_vs_dense_graphed"] = ms["dense_mlp_graphed"] / ms[name]
    return row.data


def bench_shape(d: int, T: int, orient: str, dev: str, warmup: int, reps: int, budget_s: float,
                quick: bool = False) -> dict:
    in_f, out_f = (d, 4 * d) if orient == "c_fc" else (4 * d, d)
    row = Row(d=d, tokens=T, orientation=orient, weight=[out_f, in_f])
    ms, sp, err = row.data["ms"], row.data["speedup"], row.data["max_rel_err"]
    cuda = dev == "cuda"
    ac = torch.autocast(dev, torch.bfloat16, enabled=cuda)
    lin = torch.nn.Linear(in_f, out_f, bias=False).to(dev)
    x = _randn(T, in_f).to(dev).requires_grad_(True)
    xb = x.detach().bfloat16()
    dy = _randn(T, out_f).to(dev, torch.bfloat16 if cuda else torch.float32)
    w = lin.weight

    def fwd_bwd(m: torch.nn.Module, repack: bool = False, search: bool = False) -> Callable[[], None]:
        def step():
            if search:  # what the method adds per optimizer step: the shadow-mask search and the flip count
                s.flipped_entries(m.mask_index, s.transposable_search(w))
            if repack:
                m.invalidate()
            x.grad, w.grad = None, None
            with ac:
                y = m(x)
            y.backward(dy.to(y.dtype))

        return step

    ms["dense_fwd_bwd"] = row.run("dense_fwd_bwd", lambda: time_ms(fwd_bwd(lin), warmup, reps), budget_s)
    idx = row.run("search_ref", lambda: s.transposable_search_ref(w), budget_s)
    if idx is None:
        return row.data
    if cuda and s.cusparselt_available():
        bench_graphed(row, lin, idx, x, dy, warmup, reps, budget_s)
    mods = {}
    for backend in ("auto",) if quick else ("auto", "cusparselt"):
        def make(backend=backend, mvue=True):
            m = s.Linear24.from_dense(lin, backend=backend, mvue=mvue, fp8=FP8)
            m.set_mask(idx)
            return m
        mods[backend] = row.run(f"make_{backend}", make, budget_s)
        m = mods[backend]
        if m is None:
            continue
        tags = (("", {}), ("+repack", {"repack": True}), ("+repack+search", {"repack": True, "search": True}))
        for tag, kw in tags[:2] if quick else tags:
            name = f"sparse_{backend}_fwd_bwd{tag}"
            ms[name] = row.run(name, lambda m=m, kw=kw: time_ms(fwd_bwd(m, **kw), warmup, reps), budget_s)
            if ms[name] and ms["dense_fwd_bwd"]:
                sp[name] = ms["dense_fwd_bwd"] / ms[name]

        def check(backend=backend):  # MVUE off: the fast path must equal the masked dense reference
            outs = []
            for b in (backend, "ref"):
                mm = make(b, mvue=False)
                xx = x.detach().clone().requires_grad_(True)
                w.grad = None
                with ac:
                    y = mm(xx)
                y.backward(dy.to(y.dtype))
                outs.append((y, xx.grad, w.grad.clone()))
            for k, a, b in zip(("y", "dx", "dw"), *outs, strict=True):
                err[f"{backend}_{k}"] = rel_norm_err(a, b)

        if not quick:  # --quick checks the graphed outputs only (graphed_y, mlp_graphed_y)
            row.run(f"check_{backend}", check, budget_s)
    if quick:
        return row.data

    # ---- pieces alone
    def search_fast():
        i2 = s.transposable_search(w)
        kept = lambda i: (w.abs() * s.mask_from_index(i)).sum()
        err["search_kept_l1"] = rel_norm_err(kept(i2), kept(idx))
        err["search_blocks_differing"] = (i2 != idx).float().mean().item()
        ms["search_fast"] = time_ms(lambda: s.transposable_search(w), warmup, reps)
    row.run("search_fast", search_fast, budget_s)
    ref_search = lambda: time_ms(lambda: s.transposable_search_ref(w), 1, 3)
    ms["search_ref"] = row.run("search_ref_timed", ref_search, budget_s)

    def prune_pack():
        p, pt = s.prune24(w, idx, torch.bfloat16)
        ref = (w * s.mask_from_index(idx)).bfloat16()
        err["prune"] = rel_norm_err(p, ref) + rel_norm_err(pt, ref.t())
        ms["prune"] = time_ms(lambda: s.prune24(w, idx, torch.bfloat16), warmup, reps)
        ms["compress_w_and_wt"] = time_ms(lambda: (torch._cslt_compress(p), torch._cslt_compress(pt)), warmup, reps)
        ms["prune_pack"] = ms["prune"] + ms["compress_w_and_wt"]
        return p, pt
    packed = row.run("prune_pack", prune_pack, budget_s) if cuda else None
    if cuda:
        row.run("tile_op", lambda: ms.__setitem__("tile_op_greedy_pack", time_ms(
            lambda: torch._sparse_semi_structured_tile(w.bfloat16(), "", False), warmup, reps)), budget_s)

    def mvue_pack():
        out = s.mvue24_t(dy, 1)
        ref = dy.t()
        err["mvue_mean_rel_dev_1draw"] = rel_norm_err(out, ref)  # one draw: noise, not bias; bias is tested in pytest
        ms["mvue"] = time_ms(lambda: s.mvue24_t(dy, 1), warmup, reps)
        ms["mvue_compress"] = ms["mvue"] + time_ms(lambda: torch._cslt_compress(out), warmup, reps)
        return out
    dyt = row.run("mvue_pack", mvue_pack, budget_s) if cuda else None

    if cuda and packed is not None:
        p, pt = packed
        gemms = {
            "fwd": (lambda: xb @ p.t(), torch._cslt_compress(p), xb.t(), True),
            "dgrad": (lambda: dy @ p, torch._cslt_compress(pt), dy.t(), True),
        }
        if dyt is not None:
            gemms["wgrad"] = (lambda: dy.t() @ xb, torch._cslt_compress(dyt), xb, False)
        for g, (dense, a_c, b, tr) in gemms.items():
            def one(g=g, dense=dense, a_c=a_c, b=b, tr=tr):
                plan = s.GemmPlan(True, *s._search_alg(a_c, b, tr))
                row.data.setdefault("alg", {})[g] = [plan.alg_id, plan.split_k, plan.split_k_mode]
                sparse = lambda: s._cslt_mm(a_c, b, tr, plan)
                ref = (dyt.float() @ xb.float()) if g == "wgrad" else dense().float()
                err[f"gemm_{g}"] = rel_norm_err(sparse(), ref)
                ms[f"gemm_{g}_dense"] = time_ms(dense, warmup, reps)
                ms[f"gemm_{g}_sparse"] = time_ms(sparse, warmup, reps)
                sp[f"gemm_{g}"] = ms[f"gemm_{g}_dense"] / ms[f"gemm_{g}_sparse"]
                default = lambda: torch._cslt_sparse_mm(a_c, b, transpose_result=tr)
                ms[f"gemm_{g}_sparse_default_alg"] = time_ms(default, warmup, reps)
                graph, _ = capture(sparse, warmup=0)  # replay: the kernel without per-call host setup
                ms[f"gemm_{g}_sparse_graph"] = time_ms(graph.replay, warmup, reps)
                sp[f"gemm_{g}_graph"] = ms[f"gemm_{g}_dense"] / ms[f"gemm_{g}_sparse_graph"]
            row.run(f"gemm_{g}", one, budget_s)
    return row.data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results.json")
    ap.add_argument("--dims", default="768,1024,1280,1600", help="model widths d; W is (4d, d) and (d, 4d)")
    ap.add_argument("--tokens", default="16384,65536")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip remaining variants after this many seconds (default 150, --quick 60)")
    ap.add_argument("--quick", action="store_true", help="d 1024,1280 x tokens 16k,64k; whole-linear and MLP rows only")
    ap.add_argument("--fp8", action="store_true", help="the sparse linears in e4m3 (2of4.fp8); dense stays bf16")
    args = ap.parse_args()
    global FP8
    FP8 = args.fp8
    if args.quick:
        args.dims, args.tokens = "1024,1280", "16384,65536"
    budget = args.budget_s if args.budget_s is not None else 60.0 if args.quick else 150.0
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = {
        "method": "2of4",
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "config": f"Linear24{' fp8' if args.fp8 else ''} fwd+bwd vs nn.Linear, bf16 autocast, d {args.dims}, "
                  f"tokens {args.tokens}",
        "command": "python -m kernels.bench_semi24 " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "cusparselt": s.cusparselt_available(),
        "fp8": FP8,
        "shapes": [],
        "results": [],
    }
    for d in map(int, args.dims.split(",")):
        for T in map(int, args.tokens.split(",")):
            for orient in ("c_fc", "c_proj", "mlp"):
                if orient == "mlp":
                    if dev != "cuda":
                        continue
                    r = bench_mlp(d, T, args.warmup, args.reps, budget)
                else:
                    r = bench_shape(d, T, orient, dev, args.warmup, args.reps, budget, args.quick)
                res["shapes"].append([d, T, orient])
                res["results"].append(r)
                sp = r["speedup"]
                dense_ms = r["ms"].get("dense_mlp" if orient == "mlp" else "dense_fwd_bwd") or float("nan")
                print(f"d={d:5d} T={T:6d} {orient:7s} dense {dense_ms:8.3f} ms | "
                      + " ".join(f"{k}={v:.2f}x" for k, v in sp.items() if v)
                      + (f" | errors: {list(r['errors'])}" if r["errors"] else ""), flush=True)
                if dev == "cuda":
                    torch.cuda.empty_cache()
    res["plans"] = s.PLAN_LOG
    res["elapsed_s"] = round(time.perf_counter() - _T0, 1)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(f"wrote {args.out} in {res['elapsed_s']} s")


if __name__ == "__main__":
    main()
