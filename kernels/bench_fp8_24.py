"""The parts of the fp8 e4m3 2:4 linear (`2of4.fp8`), each timed alone: `python -m kernels.bench_fp8_24 --out r.json`
(spec 2of4.md §10 lever 7).

Per GPT-2 MLP shape at 16k tokens, each GEMM of a linear's fwd+bwd (Y = X·Wᵀ, dX = dY·W, dW = dYᵀ·X) as CUDA-graph
replays: bf16 dense (cuBLAS), fp8 dense (`torch._scaled_mm`, per-tensor scales) and fp8 2:4 (`_cslt_sparse_mm` on
the cuSPARSELt-compressed e4m3 W and Wᵀ, its algorithm searched; dW stays dense fp8, as an MVUE-sparse dW would need
dYᵀ packed per call). Then what fp8 adds per call: the per-tensor quantization of X and dY into e4m3, both layouts
(the GEMMs need X, Xᵀ, dY and dYᵀ k-contiguous): compiled from plain PyTorch, as a Triton cast after aten's amax,
and with the amax in Triton too (`quant_fused`, two reads of the tensor: the floor of current scaling); whether
the 2:4 GEMM takes its scale as `alpha` (a vector, one per row of W or Wᵀ), and what the scale costs as its own
pass.
`linear_*_ms` add the parts up (fp8 ones with `quant_fused`).
Each variant is isolated: a failure records its error and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import traceback
from collections.abc import Callable

import torch

from kernels import triton_available
from kernels.benchutil import capture, rel_norm_err, time_ms
from kernels.fp8 import amax_scale, quant_fused, quant_ref, quant_triton, scale_bias_, scale_triton
from kernels.semi24 import _search_alg

BF16 = torch.bfloat16
SHAPES = [(3072, 768), (768, 3072), (4096, 1024), (1024, 4096), (5120, 1280), (1280, 5120), (6400, 1600),
          (1600, 6400)]


def transposable_pattern(o: int, i: int, device) -> torch.Tensor:
    """A transposable 2:4 mask: in every 4x4 block (r + c) % 4 < 2 keeps 2 per row and 2 per column."""
    r = torch.arange(o, device=device)[:, None]
    c = torch.arange(i, device=device)[None, :]
    return (r + c) % 4 < 2


def _sparse_mm(a_packed: torch.Tensor, b: torch.Tensor, alg_id: int, alpha: torch.Tensor | None = None):
    kw = {} if alpha is None else {"alpha": alpha}
    return torch._cslt_sparse_mm(a_packed, b, alg_id=alg_id, out_dtype=BF16, transpose_result=True, **kw)


def shape_row(o: int, i: int, tokens: int, warmup: int = 10, reps: int = 100) -> dict:
    """One weight shape (out, in): every part timed, errors against the bf16 GEMMs."""
    row: dict = {"weight": [o, i], "tokens": tokens, "ms": {}, "rel_err": {}, "errors": {}}

    def timed(name: str, fn: Callable[[], object]) -> None:
        try:
            graph, _ = capture(fn)
            row["ms"][name] = time_ms(graph.replay, warmup, reps)
        except Exception as e:  # one failing variant must not end the run
            row["errors"][name] = f"{type(e).__name__}: {e}"[:400]
            traceback.print_exc(limit=1)
        torch.cuda.synchronize()

    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(o, i, device="cuda", generator=g) * i**-0.5 * transposable_pattern(o, i, "cuda")).to(BF16)
    x = torch.randn(tokens, i, device="cuda", generator=g).to(BF16)
    dy = torch.randn(tokens, o, device="cuda", generator=g).to(BF16)
    want = {"fwd": x @ w.t(), "dx": dy @ w, "dw": dy.t() @ x}
    timed("bf16_fwd", lambda: x @ w.t())
    timed("bf16_dx", lambda: dy @ w)
    timed("bf16_dw", lambda: dy.t() @ x)

    (xq, xqt, sx), (dq, dqt, sd), (wq, wqt, sw) = quant_ref(x), quant_ref(dy), quant_ref(w)
    fp8 = {  # torch._scaled_mm(a row-major, b column-major)
        "fwd": lambda: torch._scaled_mm(xq, wq.t(), sx, sw, out_dtype=BF16),
        "dx": lambda: torch._scaled_mm(dq, wqt.t(), sd, sw, out_dtype=BF16),
        "dw": lambda: torch._scaled_mm(dqt, xqt.t(), sd, sx, out_dtype=BF16),
    }
    for k, fn in fp8.items():
        row["rel_err"][f"fp8_{k}"] = rel_norm_err(fn(), want[k])
        timed(f"fp8_{k}", fn)

    try:
        wc, wtc = torch._cslt_compress(wq), torch._cslt_compress(wqt)
        plans = {"fwd": _search_alg(wc, xq.t(), True, BF16), "dx": _search_alg(wtc, dq.t(), True, BF16)}
    except Exception as e:  # noqa: BLE001 (no fp8 cuSPARSELt in this build)
        row["errors"]["fp8_24"] = f"{type(e).__name__}: {e}"[:400]
        return row
    row["fp8_24_plans"] = plans
    timed("fp8_compress_w_wt", lambda: (torch._cslt_compress(wq), torch._cslt_compress(wqt)))  # per optimizer step
    sparse = {"fwd": lambda: _sparse_mm(wc, xq.t(), plans["fwd"][0]),
              "dx": lambda: _sparse_mm(wtc, dq.t(), plans["dx"][0])}
    scales = {"fwd": sw * sx, "dx": sw * sd}
    for k, fn in sparse.items():
        row["rel_err"][f"fp8_24_{k}"] = rel_norm_err(fn().float() * scales[k], want[k])
        timed(f"fp8_24_{k}", fn)
        timed(f"fp8_24_{k}_scaled", lambda fn=fn, k=k: fn().mul_(scales[k]))  # the scale as its own pass
        timed(f"fp8_24_{k}_scaled_triton", lambda fn=fn, k=k: scale_bias_(fn(), scales[k]))
    # alpha: torch passes it as CUSPARSELT_MATMUL_ALPHA_VECTOR_SCALING, one scale per row of the sparse operand
    rows = {"fwd": o, "dx": i}
    for k in sparse:
        alpha = scales[k].expand(rows[k]).contiguous()
        a, b = (wc, xq) if k == "fwd" else (wtc, dq)
        try:  # eagerly first: under capture an error reads as a capture failure
            row["rel_err"][f"fp8_24_{k}_alpha"] = rel_norm_err(_sparse_mm(a, b.t(), plans[k][0], alpha=alpha),
                                                               want[k])
        except Exception as e:  # noqa: BLE001 (refused by this cuSPARSELt: recorded)
            row["errors"][f"fp8_24_{k}_alpha"] = f"{type(e).__name__}: {e}"[:400]
            continue
        timed(f"fp8_24_{k}_alpha", lambda a=a, b=b, k=k, alpha=alpha: _sparse_mm(a, b.t(), plans[k][0], alpha=alpha))

    compiled = torch.compile(quant_ref)
    timed("quant_compiled", lambda: (compiled(x), compiled(dy)))
    if triton_available():
        timed("quant_triton", lambda: (quant_triton(x), quant_triton(dy)))
        timed("quant_fused", lambda: (quant_fused(x), quant_fused(dy)))
        timed("amax_triton", lambda: (scale_triton(x), scale_triton(dy)))
    timed("amax", lambda: (amax_scale(x), amax_scale(dy)))

    return summarize(row)


PARTS = {
    "bf16_dense": ["bf16_fwd", "bf16_dx", "bf16_dw"],
    "fp8_dense": ["fp8_fwd", "fp8_dx", "fp8_dw", "quant_fused"],
    # the scale applied as its own pass (alpha fails under capture)
    "fp8_24": ["fp8_24_fwd_scaled", "fp8_24_dx_scaled", "fp8_dw", "quant_fused"],
    # the scale as a Triton pass (fp8.scale_bias_, what 2of4.fp8 runs)
    "fp8_24_triton_scale": ["fp8_24_fwd_scaled_triton", "fp8_24_dx_scaled_triton", "fp8_dw", "quant_fused"],
    # the scale in the GEMM's epilogue (alpha), where cuSPARSELt takes it
    "fp8_24_alpha": ["fp8_24_fwd_alpha", "fp8_24_dx_alpha", "fp8_dw", "quant_fused"],
    # the scale folded into the next op for free (not measured as such: the sum of measured parts)
    "fp8_24_scale_folded": ["fp8_24_fwd", "fp8_24_dx", "fp8_dw", "quant_fused"],
    "fp8_dense_gemms": ["fp8_fwd", "fp8_dx", "fp8_dw"],
    "fp8_24_gemms": ["fp8_24_fwd", "fp8_24_dx", "fp8_dw"],
}


def summarize(row: dict) -> dict:
    """linear_<name>_ms: the sum of a variant's measured parts (PARTS); its speed-up over bf16 dense, and fp8 2:4's
    over fp8 dense with the same quantization."""
    ms = row["ms"]
    for name, keys in PARTS.items():
        if all(k in ms for k in keys):
            row[f"linear_{name}_ms"] = sum(ms[k] for k in keys)
    base = row.get("linear_bf16_dense_ms")
    row["speedup_vs_bf16_dense"] = {n: base / row[f"linear_{n}_ms"] for n in PARTS if base and f"linear_{n}_ms" in row}
    dense = row.get("linear_fp8_dense_ms")
    row["vs_fp8_dense"] = {n: dense / row[f"linear_{n}_ms"] for n in ("fp8_24", "fp8_24_triton_scale", "fp8_24_alpha",
                                                                    "fp8_24_scale_folded")
                           if dense and f"linear_{n}_ms" in row}
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write (rewritten after every shape)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="out x in, comma-separated")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8_24 needs a CUDA device (fp8 tensor cores)")
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    doc = {"method": "2of4", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "config": f"fp8 e4m3 2:4 linear parts vs bf16 and fp8 dense, {a.tokens} tokens, CUDA-graph replays",
           "command": "python -m kernels.bench_fp8_24 --out <file>", "rows": []}
    for o, i in shapes:
        doc["rows"].append(shape_row(o, i, a.tokens))
        r = doc["rows"][-1]
        print(f"{o}x{i}", {k: round(v, 3) for k, v in r["speedup_vs_bf16_dense"].items()},
              "vs fp8 dense", {k: round(v, 3) for k, v in r["vs_fp8_dense"].items()}, flush=True)
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
