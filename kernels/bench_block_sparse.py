"""Block-sparse linears vs dense (bf16), per linear fwd+bwd and per GEMM, on one CUDA device.

    python -m kernels.bench_block_sparse --out results.json [--blocks 64,128] [--tokens 16384] [--modes eager,graph]
    python -m kernels.bench_block_sparse --quick --modes eager,compiled,graph --out results.json
    python -m kernels.bench_block_sparse --quick --out results.json   # 1024x4096 + 4096x1024, b=128, 0/75/90%
    python -m kernels.bench_block_sparse --host-cost --out host.json  # any machine: host cost, launches stubbed

Each variant runs a warm-up (which also runs Triton's autotuning), then `reps` calls back to back with a CUDA
event pair around each; the median is reported. The host does not wait between calls, so its launch work
overlaps the GPU's as in training (`--sync-each` waits after every call, which adds the launch latency to each
time, as v1 of this bench did). `host_ms` is the host's own time to issue one call (calls issued without waiting:
where it is close to `ms`, the row measures the host, not the kernels).

Variants: bf16 weights (`fwd+bwd`, `fwd+bwd dense_wgrad`, and each GEMM alone) and the trainer's case, fp32
master weights under bf16 autocast (`fwd+bwd amp`); dense is F.linear. A fwd+bwd call is one forward + backward
with every .grad set to None first (backward allocates them, as a step with grad_accum = 1), in these modes:
- eager: as an uncompiled training step runs it (the Python autograd op, one launch per kernel);
- compiled: the forward through torch.compile(fullgraph=True) (inductor; the block-sparse linear as custom ops),
  as a compiled training step runs it: its host_ms is the host work a compiled step's linear costs. Not in the
  default --modes: every variant compiles anew (seconds each);
- graph: the same call warmed up on a side stream, captured once in a CUDA graph and replayed: the GPU's time.
Speedups are against dense of the same mode. The graph rows run last (a failed capture leaves the CUDA generator
unusable; the inputs come from CPU generators, identical in every mode). Before timing, the
Triton GEMMs are checked against the fp32 reference on the same bf16 inputs, and every fwd+bwd row checks the
x and W grads of its last timed call (max |err| / max |ref|). A failing variant records its error and the run goes
on. `--host-cost` measures instead, on the CPU, the host work of a compiled stack of block-sparse linears with the
Triton launches stubbed out (`host_cost`). Issue 8 targets, per linear fwd+bwd at 1024x4096: >= 2.5x over dense
at 75% block sparsity, >= 5x at 90%.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
import traceback
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn.functional as F

from kernels import block_sparse as bs
from kernels.benchutil import capture, host_work, record_header, rel_err, stubbed_launches, time_ms

SHAPES = [(1024, 4096), (4096, 1024), (768, 3072), (3072, 768)]  # (in, out) of nn.Linear(in, out)
SPARSITIES = [0.0, 0.5, 0.75, 0.9]
TARGETS = {"1024x4096": {0.75: 2.5, 0.9: 5.0}}  # issue 8: fwd+bwd speedup over dense
MODES = ("eager", "compiled", "graph")
DEFAULT_MODES = ("eager", "graph")
TOL = 2e-2  # bf16 inputs, fp32 accumulation: max |err| / max |ref|


def random_block_mask(rows: int, cols: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """Exactly round((1 - sparsity)·rows·cols) blocks on, uniformly at random (MST's random ER start)."""
    keep = round((1 - sparsity) * rows * cols)
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[torch.randperm(rows * cols, generator=gen)[:keep]] = True
    return mask.view(rows, cols)


def floor_bytes(mask: torch.Tensor, block: int, tokens: int, amp: bool) -> dict[str, int]:
    """The HBM bytes each kernel of a block-sparse fwd+bwd moves at least, every input read once and every output
    written once (bf16 activations; W in bf16, or fp32 masters under autocast): pack reads the used blocks and
    writes them in bf16; the forward reads X's used column blocks and writes all of Y (the empty rows' zeros too);
    dX reads dY's used row blocks and writes all of dX; dW reads both and writes the full-size dW (zeros on empty
    blocks). Rows / columns of W without a block need none of their X or dY slice."""
    rows, cols = mask.shape
    nnz = int(mask.sum())
    rows_used, cols_used = int(mask.any(1).sum()), int(mask.any(0).sum())
    w_elt = 4 if amp else 2
    x_used, dy_used = tokens * cols_used * block * 2, tokens * rows_used * block * 2
    packed = nnz * block * block * 2
    per = {"pack": nnz * block * block * w_elt + packed,
           "fwd": x_used + packed + tokens * rows * block * 2,
           "dx": dy_used + packed + tokens * cols * block * 2,
           "dw": dy_used + x_used + rows * cols * block * block * w_elt}  # fmt: skip
    return per | {"total": sum(per.values())}


def copy_gb_s(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """A device-to-device copy's speed (bytes read plus written per second): the bandwidth the floors are timed at."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), 3, reps, False)
    return 2 * a.numel() / ms / 1e6


def check(x, w, dy, info) -> dict[str, float]:
    """Max relative error of the Triton fwd / dX / dW against the fp32 reference."""
    xf, wf, dyf = x.float(), w.float(), dy.float()
    return {
        "fwd": rel_err(bs.fwd_triton(x, w, None, info), bs.fwd_ref(xf, wf, None, info)),
        "dx": rel_err(bs.dx_triton(dy, w, info), bs.dx_ref(dyf, wf, info)),
        "dw": rel_err(bs.dw_triton(dy, x, info), bs.dw_ref(dyf, xf, info)),
    }


def fwd_bwd(
    forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], dy: torch.Tensor, amp: bool, mode: str
) -> Callable[[], None]:
    """One forward + backward of `forward()` (bf16 autocast if amp) with the leaves' .grad set to None first.

    graph: warmed up on a side stream (Triton autotunes there, never inside the capture), then captured with the
    grads set to None, so backward allocates them from the graph's pool and every replay rewrites them in place;
    autocast's cast cache is off, as the CUDA-graphs notes ask of captured autocast. Nothing the call reads may
    hold a live autograd graph at capture time (its AccumulateGrad nodes belong to another stream).
    """
    if mode == "compiled":
        torch._dynamo.reset()  # every variant's forward is a lambda of one code object, whose cache dynamo would share
        forward = torch.compile(forward, fullgraph=True)

    def call() -> None:
        for t in leaves:
            t.grad = None
        with torch.autocast(dy.device.type, torch.bfloat16, enabled=amp, cache_enabled=mode != "graph"):
            y = forward()
        y.backward(dy)

    if mode != "graph":
        return call
    return capture(call)[0].replay


def host_ms(fn: Callable[[], object], reps: int) -> float:
    """Host milliseconds to issue one call: reps calls without waiting for the GPU (a GPU-bound call queues up
    behind it and costs the host nothing more)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = time.perf_counter() - t
    torch.cuda.synchronize()
    return 1e3 * elapsed / reps


def inputs(in_f: int, out_f: int, m: int, dev: str) -> tuple[torch.Tensor, ...]:
    """x (m, in) and dy (m, out) in bf16, W (out, in) in bf16 and as its fp32 copy, from a CPU generator: the same
    values in every mode, and no draw from the CUDA generator."""
    gen = torch.Generator().manual_seed(0)
    bf16 = lambda t: t.to(dev, torch.bfloat16)
    w = bf16((torch.rand(out_f, in_f, generator=gen) * 2 - 1) * in_f**-0.5)  # nn.Linear's init range
    x = bf16(torch.randn(m, in_f, generator=gen))
    dy = bf16(torch.randn(m, out_f, generator=gen))
    w32 = w.float().requires_grad_()  # a leaf of its own, the bf16 weight's values
    return x.requires_grad_(), w.requires_grad_(), w32, dy


def bench_shape(
    in_f: int,
    out_f: int,
    m: int,
    blocks: list[int],
    sparsities: list[float],
    warmup: int,
    reps: int,
    mode: str = "eager",
    sync_each: bool = False,
    dev: str = "cuda",
    copy_speed: float | None = None,
) -> list[dict]:
    """The rows of one nn.Linear(in_f, out_f) shape in one mode (the per-GEMM rows only in eager mode); with
    copy_speed (GB/s), each block-sparse fwd+bwd row also says how fast its floor_bytes would go at that speed."""
    rows = []
    name = f"{in_f}x{out_f}"
    gen = torch.Generator().manual_seed(0)
    x, w, w32, dy = inputs(in_f, out_f, m, dev)
    xd, wd = x.detach(), w.detach()
    dense_flops = 2 * m * in_f * out_f  # per GEMM

    def record(variant: str, sparsity, block, make, dense_ms, flops, err=None, grads_err=None,
               floor=None) -> float | None:
        """Time make()'s call (made inside the row's try: a capture can fail) and append the row; its ms. `floor`:
        the call's floor_bytes total, timed at copy speed where the run measured it."""
        row = {"shape": name, "in": in_f, "out": out_f, "tokens": m, "variant": variant, "mode": mode,
               "sparsity": sparsity, "block": block, "ms": None, "host_ms": None, "dense_ms": dense_ms,
               "speedup": None, "tflops": None, "max_rel_err": err, "error": None}  # fmt: skip
        if floor is not None:
            row["floor_mb"] = floor / 1e6
            if copy_speed:  # the fastest these kernels could run moving their bytes at copy speed
                row["floor_ms"] = floor / copy_speed / 1e6
                row["speedup_at_floor"] = dense_ms / row["floor_ms"] if dense_ms else None
        try:
            call = make()
            row["ms"] = time_ms(call, warmup, reps, sync_each)
            row["host_ms"] = host_ms(call, reps)
            row["tflops"] = flops / row["ms"] / 1e9
            if dense_ms:
                row["speedup"] = dense_ms / row["ms"]
            if "floor_ms" in row:
                row["of_floor"] = row["floor_ms"] / row["ms"]  # the share of copy speed the call reaches
            if grads_err is not None:
                row["max_rel_err"] = grads_err()
        except Exception as e:  # one broken variant must not lose the rest of the run
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            for t in (x, w, w32):  # graph mode: the grads live in the graph's pool; free it with the graph
                t.grad = None
        rows.append(row)
        return row["ms"]

    def step(forward, weight: torch.Tensor, amp: bool = False):
        """(a factory of) the fwd+bwd call of forward(x, weight) in this mode."""
        return lambda: fwd_bwd(lambda: forward(x, weight), [x, weight], dy, amp, mode)

    def grads_err(weight: torch.Tensor, dx_want, dw_want):
        """The last call's x and W grads against their fp32 references (made only when asked, one at a time)."""
        return lambda: max(rel_err(x.grad, dx_want()), rel_err(weight.grad, dw_want()))

    dyf = lambda: dy.float()
    dense_dx = lambda: dyf() @ wd.float()
    dense_dw = lambda: dyf().t() @ xd.float()
    dense = {
        "fwd+bwd": record("dense fwd+bwd", None, None, step(F.linear, w), None, 3 * dense_flops,
                          grads_err=grads_err(w, dense_dx, dense_dw)),
        "fwd+bwd amp": record("dense fwd+bwd amp", None, None, step(F.linear, w32, amp=True), None, 3 * dense_flops,
                              grads_err=grads_err(w32, dense_dx, dense_dw)),
    }  # fmt: skip
    if mode == "eager":
        dense |= {
            "fwd": record("dense fwd", None, None, lambda: functools.partial(F.linear, xd, wd), None, dense_flops),
            "dx": record("dense dx", None, None, lambda: functools.partial(torch.mm, dy, wd), None, dense_flops),
            "dw": record("dense dw", None, None, lambda: functools.partial(torch.mm, dy.t(), xd), None, dense_flops),
        }
    for block in blocks:
        for s in sparsities:
            try:
                mask = random_block_mask(out_f // block, in_f // block, s, gen)
                info = bs.build_block_mask_info(mask, block, dev)
                errs = check(xd, wd, dy, info) if mode == "eager" else {}
            except Exception as e:
                rows.append({"shape": name, "in": in_f, "out": out_f, "tokens": m, "variant": "setup/check",
                             "mode": mode, "sparsity": s, "block": block,
                             "error": f"{type(e).__name__}: {e}"})  # fmt: skip
                traceback.print_exc()
                continue
            flops = dense_flops * info.density()

            def sparse(inp, weight, info=info, mode=0):
                return bs.block_sparse_linear(inp, weight, None, info, backend="triton", mode=mode,
                                              dw_density=info.density())  # as MST sets it: the layer's density

            dx_want = lambda i=info: bs.dx_ref(dyf(), wd.float(), i)
            dw_want = lambda i=info: bs.dw_ref(dyf(), xd.float(), i)
            wgrad = functools.partial(sparse, mode=bs.DENSE_WGRAD)
            variants = [  # (variant, forward, weight, amp, dense row, flops, dW reference)
                ("bs fwd+bwd", sparse, w, False, "fwd+bwd", 3 * flops, dw_want),
                ("bs fwd+bwd amp", sparse, w32, True, "fwd+bwd amp", 3 * flops, dw_want),
                ("bs fwd+bwd dense_wgrad", wgrad, w, False, "fwd+bwd", 2 * flops + dense_flops, dense_dw),
            ]
            for variant, forward, weight, amp, base, fl, dw_ref in variants:
                err = grads_err(weight, dx_want, dw_ref)
                floor = None if "dense_wgrad" in variant else floor_bytes(mask, block, m, amp)["total"]
                record(variant, s, block, step(forward, weight, amp), dense[base], fl, grads_err=err, floor=floor)
            if mode == "eager":
                gemms = {"fwd": (bs.fwd_triton, xd, wd, None), "dx": (bs.dx_triton, dy, wd),
                         "dw": (functools.partial(bs.dw_triton, density=info.density()), dy, xd)}  # fmt: skip
                for op, (fn, *args) in gemms.items():
                    make = lambda fn=fn, args=args, i=info: functools.partial(fn, *args, i)
                    record(f"bs {op}", s, block, make, dense[op], flops, errs[op])
    return rows


def host_cost(
    n_layers: int = 16, compile_backend: str = "aot_eager", reps: int = 20, width: int = 256, tokens: int = 64
) -> dict[str, float]:
    """Host time and function calls per block-sparse linear fwd+bwd in a compiled chain of `n_layers` linears
    (width×width, b=64, half the blocks on, bias, fp32), on the CPU with the Triton launches stubbed out: the
    `triton` backend's host path (graph guards, op dispatch, index lists, dW split count, allocations) without the
    launches themselves. The masks are changed once after the warm-up (a compiled step then runs new index tensors).
    Returns µs per layer (this process's CPU time, the best of 5 rounds of `reps` steps: other processes on a shared
    machine don't count; torch runs on one thread meanwhile, so no idle worker thread counts either), Python and C
    calls per layer (one profiled step), launches per layer and the number of graphs dynamo compiled."""
    from torch._dynamo.testing import CompileCounterWithBackend

    kernels = ("_pack_kernel", "_bsr_mm_kernel", "_sddmm_kernel", "_sddmm_tma_kernel", "_scatter_kernel")
    with stubbed_launches(bs, kernels) as launches, mock.patch.object(bs, "_triton_can_run", lambda *devices: True):
        gen = torch.Generator().manual_seed(0)
        layers = torch.nn.Sequential(
            *[bs.BlockSparseLinear(width, width, block=64, backend="triton") for _ in range(n_layers)]
        )
        n_blocks = width // 64

        def new_masks() -> None:
            for layer in layers:
                layer.set_block_mask(random_block_mask(n_blocks, n_blocks, 0.5, gen))

        x = torch.randn(tokens, width, generator=gen, requires_grad=True)
        dy = torch.randn(tokens, width, generator=gen)
        torch._dynamo.reset()
        counter = CompileCounterWithBackend(compile_backend)
        compiled = torch.compile(layers, backend=counter, fullgraph=True)

        def step() -> None:
            compiled(x).backward(dy)

        new_masks()
        for _ in range(3):
            step()
        new_masks()
        for _ in range(3):
            step()
        cost = host_work(step, launches, reps, n_layers, "layer")
    return cost | {"graphs": counter.frame_count}


def print_table(rows: list[dict]) -> None:
    head = (f"{'shape':>10} {'variant':>24} {'mode':>8} {'blk':>4} {'sp':>5} {'ms':>8} {'host':>8} {'dense':>8} "
            f"{'x':>6} {'TF/s':>6} {'err':>8}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)
        bad = "" if r.get("max_rel_err") is None or r["max_rel_err"] < TOL else "  TOO LARGE"
        print(f"{r['shape']:>10} {r['variant']:>24} {r['mode']:>8} {fmt(r.get('block'), 'd'):>4} "
              f"{fmt(r.get('sparsity'), '.2f'):>5} {fmt(r.get('ms'), '.3f'):>8} {fmt(r.get('host_ms'), '.3f'):>8} "
              f"{fmt(r.get('dense_ms'), '.3f'):>8} {fmt(r.get('speedup'), '.2f'):>6} "
              f"{fmt(r.get('tflops'), '.0f'):>6} {fmt(r.get('max_rel_err'), '.1e'):>8}{bad}"
              + (f"  ERROR {r['error']}" if r.get("error") else ""))  # fmt: skip


def target_summary(rows: list[dict]) -> list[dict]:
    """Each target against every fwd+bwd row it applies to, in each mode (graph: what the kernels would give with
    no host overhead)."""
    out = []
    for shape, by_sparsity in TARGETS.items():
        for s, want in by_sparsity.items():
            for variant in ("bs fwd+bwd", "bs fwd+bwd amp"):
                got = [r for r in rows if r["shape"] == shape and r["variant"] == variant and r["sparsity"] == s]
                for r in got:
                    speed = r.get("speedup")
                    met = speed is not None and speed >= want
                    out.append({"shape": shape, "variant": variant, "mode": r["mode"], "sparsity": s,
                                "block": r["block"], "target": want, "speedup": speed, "met": met,
                                "speedup_at_floor": r.get("speedup_at_floor")})  # fmt: skip
    return out


def autotuned_configs() -> dict[str, list[dict[str, str]]]:
    """The config the autotuner chose for each key it saw (which tiles and pipeline depths win on this device)."""
    kernels = {"fwd/dx": bs._bsr_mm_kernel, "dw": bs._sddmm_kernel, "dw tma": bs._sddmm_tma_kernel}
    return {name: [{"key": str(k), "config": str(c)} for k, c in kern.cache.items()] for name, kern in kernels.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_block_sparse.json", help="JSON results path")
    ap.add_argument("--tokens", type=int, default=16384, help="M, tokens per GEMM")
    ap.add_argument("--blocks", default="64", help="comma-separated block sizes (32, 64, 128)")
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)), help="comma-separated block sparsities")
    ap.add_argument("--shapes", default=",".join(f"{i}x{o}" for i, o in SHAPES), help="comma-separated INxOUT")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated fwd+bwd timing modes {MODES}")
    ap.add_argument("--sync-each", action="store_true", help="wait for the GPU after every call (v1's timing)")
    ap.add_argument("--quick", action="store_true", help="1024x4096,4096x1024, b=128, sparsity 0,0.75,0.9 (< 1 min)")
    ap.add_argument("--host-cost", action="store_true", help="only host_cost(), on the CPU (aot_eager and inductor)")
    args = ap.parse_args()
    if args.host_cost:
        result = {
            "torch": torch.__version__,
            "host_cost": {b: host_cost(compile_backend=b) for b in ("aot_eager", "inductor")},
        }
        print(json.dumps(result, indent=1))
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        return
    if args.quick:
        args.shapes, args.blocks, args.sparsities = "1024x4096,4096x1024", "128", "0,0.75,0.9"
    modes = args.modes.split(",")
    if any(mode not in MODES for mode in modes):
        raise SystemExit(f"--modes: comma-separated names from {', '.join(MODES)}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_block_sparse needs a CUDA device")
    t0 = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True
    blocks = [int(b) for b in args.blocks.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    meta = record_header("mst (block-sparse linear) against dense F.linear", "kernels.bench_block_sparse") | {
        "tokens": args.tokens,
        "blocks": blocks,
        "sparsities": sparsities,
        "shapes": [f"{i}x{o}" for i, o in shapes],
        "tolerance": TOL,
        "modes": modes,
        "timing": "sync after every call" if args.sync_each else "back to back, event pair per call",
        "smem_per_block_optin": torch.cuda.get_device_properties(0).shared_memory_per_block_optin,
    }
    meta["copy_gb_s"] = copy_speed = copy_gb_s()
    rows = []

    def write() -> dict:
        result = meta | {"wall_s": time.perf_counter() - t0, "autotuned": autotuned_configs(), "results": rows,
                         "targets": target_summary(rows)}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        return result

    # graph last: a failed capture must not cost the other rows (it breaks the CUDA generator)
    for mode in sorted(modes, key=MODES.index):
        for in_f, out_f in shapes:
            rows += bench_shape(in_f, out_f, args.tokens, blocks, sparsities, args.warmup, args.reps, mode,
                                args.sync_each, copy_speed=copy_speed)  # fmt: skip
            torch.cuda.empty_cache()
            write()  # a run killed at its time limit keeps the shapes done
    print_table(rows)
    result = write()
    for t in result["targets"]:
        got = "-" if t["speedup"] is None else f"{t['speedup']:.2f}"
        floor = "" if t["speedup_at_floor"] is None else f" (at copy speed at most {t['speedup_at_floor']:.2f}x)"
        print(f"target {t['shape']} {t['variant']} [{t['mode']}] @ {t['sparsity']:.0%} (b={t['block']}): "
              f"want >= {t['target']}x, got {got}x{floor} -> {'met' if t['met'] else 'NOT met'}")  # fmt: skip
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
