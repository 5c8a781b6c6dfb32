"""2:4 sparse training kernels (Hu et al. 2024, spec 2of4.md §1-§2, §6, §10): transposable masks, MVUE, Linear24.

Layout conventions: a linear y = x Wᵀ (+ b) with W of shape (out, in) and T tokens.
- Transposable mask M: every aligned 4x4 block of W keeps 2 entries per row and 2 per column (one of 90 patterns),
  so M⊙W is 2:4 along `in` (forward) and (M⊙W)ᵀ is 2:4 along `out` (input gradient). A mask is stored as one
  pattern index per block, uint8 (out/4, in/4): 16x smaller than a bool mask, and two masks differ in
  DIFF[a, b] entries of a block, which makes the flip rate a table lookup.
- MVUE 2:4 prunes dYᵀ (out, T) along T for the weight gradient dW = MVUE(dYᵀ) X; unbiased, so E[dW] is exact.

Backends of `Linear24` (picked with kernels.select): 'ref' is plain masked dense matmuls (the exact reference
and the CPU path); 'cusparselt' runs each GEMM on the sparse tensor cores through torch's private cuSPARSELt ops,
with the algorithm searched once per shape and a per-GEMM dense fallback decided by one measurement (logged).

CUDA graphs (`GraphedFwdBwd`, used by `SparseMLP24`): cuSPARSELt's kernels beat cuBLAS at GPT-2 shapes, but each
eager `_cslt_sparse_mm` call spends ~0.4-0.65 ms on the host (spec §10), so the sparse path only wins when replayed
from a graph. Graph mode needs every address fixed: a layer in graph mode keeps its operands in static buffers
re-packed in place (`Linear24.static`), reads the MVUE seed from a device tensor bumped inside the graph, and picks
sparse or dense per GEMM by timing graph replays rather than eager calls (plan key field `timing`).

torch.compile: `Linear24` and `SparseMLP24` call torch.library custom ops (sections 'custom ops'), so a compiled GPT
is one graph whatever the backend, and on the GPU the op bodies run the eager code above unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import cslt_pack, fp8, select, triton_available
from kernels.benchutil import capture

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- patterns
def _build_patterns() -> torch.Tensor:
    rows = [r for r in itertools.product((0, 1), repeat=4) if sum(r) == 2]  # the 6 ways to keep 2 of 4
    pats = [p for p in itertools.product(rows, repeat=4) if all(sum(r[c] for r in p) == 2 for c in range(4))]
    return torch.tensor(pats, dtype=torch.bool).reshape(-1, 16)  # row-major 4x4, lexicographic order


PATTERNS = _build_patterns()  # (90, 16) bool
PATTERN_BITS = (PATTERNS.int() << torch.arange(16)).sum(1).int()  # (90,) bit e = entry (e // 4, e % 4)
PATTERN_DIFF = (PATTERNS[:, None, :] != PATTERNS[None, :, :]).sum(-1).to(torch.int32)  # (90, 90) entries differing


@functools.cache
def _on(table: str, device: torch.device) -> torch.Tensor:
    src = {"patterns": PATTERNS.float(), "bits": PATTERN_BITS, "diff": PATTERN_DIFF.flatten(), "bool": PATTERNS}
    return src[table].to(device)


def _check_shape(w: torch.Tensor) -> None:
    if w.dim() != 2 or w.shape[0] % 4 or w.shape[1] % 4:
        raise ValueError(f"a transposable 2:4 mask needs a 2-D weight with both sizes multiples of 4, got {w.shape}")


# ------------------------------------------------------------------------------------------ transposable masks
def transposable_search_ref(w: torch.Tensor) -> torch.Tensor:
    """Pattern index per 4x4 block of w (R, C) maximizing the kept L1: uint8 (R/4, C/4); ties -> lower index."""
    _check_shape(w)
    R, C = w.shape
    blocks = w.detach().abs().float().reshape(R // 4, 4, C // 4, 4).permute(0, 2, 1, 3).reshape(-1, 16)
    scores = blocks @ _on("patterns", w.device).t()  # (nblocks, 90)
    return scores.argmax(dim=1).to(torch.uint8).reshape(R // 4, C // 4)  # argmax returns the first maximum


def _search_triton(w: torch.Tensor) -> torch.Tensor:
    from kernels import semi24_triton

    _check_shape(w)
    return semi24_triton.transposable_search(w.detach(), _on("patterns", w.device))


SEARCH_IMPLS = {"triton": _search_triton, "ref": transposable_search_ref}
_CAN_RUN = {"triton": triton_available}
_BROKEN: set[str] = set()  # fast paths that raised at runtime under 'auto': the reference takes over, logged once


def _dispatch(op: str, impls: dict, backend: str, x: torch.Tensor, *args):
    name = select(impls, backend, _CAN_RUN) if x.is_cuda else ("ref" if backend == "auto" else backend)
    if backend != "auto" or name == "ref":
        return impls[name](x, *args)
    if f"{op}:{name}" not in _BROKEN:
        try:
            return impls[name](x, *args)
        except Exception as e:  # e.g. a Triton build that cannot compile the kernel: train on, slower
            _BROKEN.add(f"{op}:{name}")
            log.warning("2:4 %s: %s failed (%s: %s); using the reference from now on", op, name, type(e).__name__, e)
    return impls["ref"](x, *args)


def transposable_search(w: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    return _dispatch("search", SEARCH_IMPLS, backend, w)


def mask_from_index(idx: torch.Tensor) -> torch.Tensor:
    """Bool mask (R, C) from pattern indices (R/4, C/4)."""
    R4, C4 = idx.shape
    return _on("bool", idx.device)[idx.long()].reshape(R4, C4, 4, 4).permute(0, 2, 1, 3).reshape(R4 * 4, C4 * 4)


def transposable_mask_ref(w: torch.Tensor) -> torch.Tensor:
    """The exact transposable 2:4 mask of w (bool, same shape): the paper's 90-pattern search."""
    return mask_from_index(transposable_search_ref(w))


def mask_24_ref(w: torch.Tensor) -> torch.Tensor:
    """Plain (non-transposable) 2:4 mask along the last dim: the 2 largest |w| of every 4."""
    groups = w.detach().abs().reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True)
    return keep.reshape(w.shape)


def flipped_entries(prev: torch.Tensor, cur: torch.Tensor, parts: int | None = None) -> torch.Tensor:
    """Number of mask entries that differ between two pattern-index masks, as a device int64 scalar (no sync).

    parts: the masks are `parts` equal masks stacked along dim 0 (transposable_search_stacked); returns (parts,).
    """
    diff = _on("diff", cur.device)[prev.long() * 90 + cur.long()]
    return diff.sum() if parts is None else diff.reshape(parts, -1).sum(1)


def transposable_search_stacked(ws: Sequence[torch.Tensor], backend: str = "auto") -> torch.Tensor:
    """transposable_search of same-shaped weights (R, C) in one call: their indices stacked, (len(ws) * R/4, C/4).

    Blocks are scored independently, so the result equals the per-weight searches concatenated; one launch (and one
    copy of the weights) replaces len(ws) searches, each with its own table upload and launch overhead.
    """
    if len({tuple(w.shape) for w in ws}) != 1:
        raise ValueError(f"stacked search needs weights of one shape, got {sorted({tuple(w.shape) for w in ws})}")
    with torch.no_grad():
        return transposable_search(torch.cat(list(ws)) if len(ws) > 1 else ws[0], backend)


# ------------------------------------------------------------------------------------------------------- MVUE
def mvue24_ref(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """MVUE 2:4 along the last dim (spec §6, `_MVUE24_approx`): unbiased, |out| <= group L1, zeros stay 0."""
    if x.shape[-1] % 4:
        raise ValueError(f"MVUE 2:4 needs the pruned dim to be a multiple of 4, got {x.shape[-1]}")
    g = x.float().reshape(-1, 4)
    a = g.abs() + 1.19209e-7
    S = a.sum(1, keepdim=True)
    u = torch.rand(g.shape[0], 2, generator=generator, device=x.device)

    def pick(weights: torch.Tensor, uu: torch.Tensor) -> torch.Tensor:  # inverse CDF; zero weights never chosen
        cum = weights.cumsum(1)
        return (cum[:, :3] <= uu[:, None] * cum[:, 3:]).sum(1).clamp(max=3)

    i = pick(a, u[:, 0])
    j = pick(a.scatter(1, i[:, None], 0.0), u[:, 1])
    j = torch.where(j == i, torch.where(i == 3, 2, 3), j)  # rounding at u ~ 1: never repeat i
    t = a / S
    r = t / (S - a)
    p = t + a * (r.sum(1, keepdim=True) - r)  # P(k is picked) = t_k + a_k Σ_{m≠k} t_m / (S - a_m)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, i[:, None], True).scatter_(1, j[:, None], True)
    return torch.where(keep, g / p, 0.0).reshape(x.shape).to(x.dtype)


def mixed_seed(base: int, micro: int) -> int:
    """The 31-bit seed MVUE uses for a device seed [base, micro]; the Triton kernel mixes the same way on the GPU."""
    return (base ^ (micro * 0x5BD1E995)) & 0x7FFFFFFF


def _mvue_t_ref(x: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):  # a host sync: the reference is never replayed from a graph
        seed = mixed_seed(*map(int, seed.tolist()))
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return mvue24_ref(x.t(), gen).contiguous()


def _mvue_t_triton(x: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    from kernels import semi24_triton

    if x.shape[0] % 4:
        raise ValueError(f"MVUE 2:4 needs the token count to be a multiple of 4, got {x.shape[0]}")
    return semi24_triton.mvue24_t(x, seed)


MVUE_IMPLS = {"triton": _mvue_t_triton, "ref": _mvue_t_ref}


def mvue24_t(x: torch.Tensor, seed: int | torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """MVUE 2:4 along dim 0 of x (T, N), returned as the pruned xᵀ (N, T), contiguous.

    seed: an int, or an int64 device tensor [base, micro] standing for mixed_seed(base, micro).
    """
    return _dispatch("mvue", MVUE_IMPLS, backend, x, seed)


def derive_seed(seed: int, step: int, layer: int, micro: int) -> int:
    """A 31-bit Philox / Generator seed from (run seed, optimizer step, layer, micro-step): same on every rank."""
    h = 0x9E3779B1
    for v in (seed, step, layer, micro):
        h = ((h ^ (v & 0xFFFFFFFF)) * 0x01000193 + 0x7F4A7C15) & 0xFFFFFFFFFFFF
        h ^= h >> 21
    return h & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------- prune and pack
def _prune_ref(w: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    pruned = (w.detach() * mask_from_index(idx)).to(dtype)
    return pruned, pruned.t().contiguous()


def _prune_triton(w: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from kernels import semi24_triton

    return semi24_triton.prune24(w.detach(), idx, _on("bits", w.device), dtype)


PRUNE_IMPLS = {"triton": _prune_triton, "ref": _prune_ref}


def prune24(w: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype, backend: str = "auto"):
    """(M⊙W, (M⊙W)ᵀ contiguous) in dtype from the pattern indices: one fused pass with Triton."""
    return _dispatch("prune", PRUNE_IMPLS, backend, w, idx, dtype)


def cusparselt_available() -> bool:
    """CUDA with sparse tensor cores (sm80+) and torch's cuSPARSELt ops."""
    return (
        torch.cuda.is_available()
        and torch.cuda.get_device_capability() >= (8, 0)
        and hasattr(torch, "_cslt_compress")
        and hasattr(torch, "_cslt_sparse_mm")
    )


@dataclass
class GemmPlan:
    """How one GEMM of one shape runs: on the sparse tensor cores with a searched algorithm, or dense."""

    sparse: bool
    alg_id: int = 0
    split_k: int = 1
    split_k_mode: int | bool = -1
    reason: str = ""
    ms_sparse: float = float("nan")
    ms_dense: float = float("nan")


PLANS: dict[tuple, GemmPlan] = {}  # (gemm, rows, cols, T, dtype, mode, mvue, timing) -> plan; filled once per shape
PLAN_LOG: list[dict] = []  # every decision, for the bench JSON and the run log


@functools.cache
def _split_k_kwarg() -> str | None:
    """Name of the third tuning argument of _cslt_sparse_mm: 'split_k_mode' (int) or older 'split_k_one_kernel'."""
    names = [a.name for a in torch.ops.aten._cslt_sparse_mm.default._schema.arguments]
    return next((n for n in ("split_k_mode", "split_k_one_kernel") if n in names), None)


def _cslt_mm(a_packed: torch.Tensor, b: torch.Tensor, transpose_result: bool, plan: GemmPlan,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    kw = {"alg_id": plan.alg_id} if out_dtype is None else {"alg_id": plan.alg_id, "out_dtype": out_dtype}
    if plan.split_k != 1 and _split_k_kwarg() is not None:
        kw["split_k"] = plan.split_k
        kw[_split_k_kwarg()] = plan.split_k_mode
    return torch._cslt_sparse_mm(a_packed, b, transpose_result=transpose_result, **kw)


def _search_alg(a_packed: torch.Tensor, b: torch.Tensor, transpose_result: bool,
                out_dtype: torch.dtype | None = None) -> tuple[int, int, int | bool]:
    """cuSPARSELt's own algorithm search: (alg_id, split_k, split_k mode); the default alg is poor on H100."""
    cus = getattr(torch._C, "_cusparselt", None)
    if cus is not None and hasattr(cus, "mm_search"):
        res = cus.mm_search(a_packed, b, None, None, out_dtype, transpose_result)
        return int(res[0]), int(res[1]), res[2]
    return int(torch._cslt_sparse_mm_search(a_packed, b, None, None, out_dtype, transpose_result)), 1, -1


def _time_ms(fn, reps: int = 5) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _time_graph_ms(fn, reps: int = 5) -> float:
    """ms per replay of fn captured in a CUDA graph: the GEMM as graph mode runs it, without host overhead."""
    with torch.autocast("cuda", enabled=False):
        graph, _ = capture(fn, warmup=1)
    return _time_ms(graph.replay, reps)


def make_plan(key: tuple, sparse_fn, dense_fn, search_args_fn, mode: str, timing: str = "eager",
              check_fn=None) -> GemmPlan:
    """Search the algorithm, check the sparse result against dense, and (mode 'auto') keep the faster one.

    sparse_fn(plan) and dense_fn() compute the same GEMM on this call's real operands; sparse_fn includes any
    per-call packing (MVUE + compress for dW), so the comparison is what training pays. search_args_fn() gives
    the operands of cuSPARSELt's algorithm search. timing 'graph' times CUDA-graph replays (a sparse GEMM that
    cannot be captured runs dense), 'eager' times plain calls. check_fn() is the exact dense equivalent of
    sparse_fn (default dense_fn); for dW it is the dense GEMM on the same MVUE draw, since MVUE's noise against the
    unpruned dW (~0.7 relative) is not an error.
    """
    t0 = time.perf_counter()
    try:
        if not cusparselt_available():
            raise RuntimeError("cuSPARSELt ops or an sm80+ GPU are missing")
        plan = GemmPlan(True, *_search_alg(*search_args_fn()))
        ref = (check_fn or dense_fn)().float()
        err = ((sparse_fn(plan).float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        if not err < 0.05:  # also catches NaN, and a dYᵀ that is not 2:4 (mvue off), which compress would prune
            raise RuntimeError(f"sparse result off by rel. error {err:.3g}")
        if mode == "auto":
            timer = _time_graph_ms if timing == "graph" else _time_ms
            plan.ms_sparse, plan.ms_dense = timer(lambda: sparse_fn(plan)), timer(dense_fn)
            plan.sparse = plan.ms_sparse < plan.ms_dense
            plan.reason = "measured" if plan.sparse else "dense is faster"
        else:
            plan.reason = "forced"
    except Exception as e:  # a missing or failing private op must not stop training: run this GEMM dense
        plan = GemmPlan(False, reason=f"{type(e).__name__}: {e}")
    PLANS[key] = plan
    entry = {"key": list(map(str, key)), **plan.__dict__, "plan_s": round(time.perf_counter() - t0, 3)}
    PLAN_LOG.append(entry)
    log.info("2:4 GEMM plan %s", entry)
    return plan


# ----------------------------------------------------------------------------------------------------- operands
@dataclass
class Operands:
    """Per-step operands of one sparse layer (re-packed from W under the frozen mask each optimizer step)."""

    pruned: torch.Tensor  # M⊙W (out, in) in the compute dtype
    pruned_t: torch.Tensor | None = None  # (M⊙W)ᵀ contiguous (in, out)
    packed: dict[str, torch.Tensor] = field(default_factory=dict)  # 'w' and 'wt' in cuSPARSELt's compressed form
    repack: Callable[[str, torch.Tensor], torch.Tensor] | None = None  # the layer's in-place re-pack, if it has one
    scale: torch.Tensor | None = None  # fp8: pruned and pruned_t are e4m3 and M⊙W ≈ pruned·scale (0-dim fp32)

    def pack(self, which: str) -> torch.Tensor:
        if which not in self.packed:
            pruned = self.pruned if which == "w" else self.pruned_t
            self.packed[which] = torch._cslt_compress(pruned) if self.repack is None else self.repack(which, pruned)
        return self.packed[which]


# ------------------------------------------------------------------------------------ custom ops: Linear24
# The 2:4 layers reach torch.compile as torch.library custom ops, one opaque op per sparse linear (and per
# SparseMLP24), so a compiled GPT stays one graph: an autograd.Function with Python state in its ctx, a disabled
# region or a time/Generator call made dynamo split every block. What cannot be an op argument (packed operands,
# GEMM plans, CUDA graphs, MVUE seeds and counters) stays in the module, found through an integer handle. Op bodies
# are never traced: they run, and update module state, exactly as eager code does.
_MODULES: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


def _register(m: nn.Module) -> int:
    handle = next(_HANDLES)
    _MODULES[handle] = m
    return handle


@torch.library.custom_op("sparse_pretrain::linear24", mutates_args=())
def _linear24_op(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, handle: int,
                 timing: str) -> torch.Tensor:
    """Y = X W̃ᵀ (+b), W̃ from the layer's operands. x2d: (T, in) in the compute dtype; weight: the dense master W,
    an input only so that dW reaches it; timing: how GEMM plans made now are timed (the layer's plan_timing)."""
    layer = _MODULES[handle]
    ops = layer.operands(x2d.dtype)
    if layer.fp8:
        return _fwd_fp8(layer, ops, x2d, bias, timing)
    if layer.kernel == "cusparselt":
        y = _gemm(layer, "fwd", ops, x2d, timing=timing)
    else:
        y = x2d @ ops.pruned.t()
    return _add_bias(y, bias)


@_linear24_op.register_fake
def _(x2d, weight, bias, handle, timing):
    return x2d.new_empty((x2d.shape[0], weight.shape[0]))


@torch.library.custom_op("sparse_pretrain::linear24_bwd", mutates_args=())
def _linear24_bwd_op(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, handle: int, timing: str,
    dgrad: bool, wgrad: bool, bgrad: bool,
) -> list[torch.Tensor]:
    """[dX = dY W̃, dW = MVUE(dYᵀ) X (dense, unmasked: straight-through), db = Σ dY (unpruned)], those asked for.

    W̃ is the layer's current operands, the forward's: the method re-packs them only after the optimizer step.
    Draws this micro-step's MVUE seed (advancing the layer's counter), as every backward does.
    """
    layer = _MODULES[handle]
    ops = layer.operands(x2d.dtype)
    dy = dy.contiguous()
    seed = layer.next_seed()
    if layer.fp8:
        dx, dw = _bwd_fp8(layer, ops, dy, x2d, dgrad, wgrad, timing)
    elif layer.kernel == "cusparselt":
        device_seed = timing == "graph" and layer.seed_dev is not None
        if device_seed:  # a graph replays its launch arguments: the seed must live on the device
            seed = layer.seed_dev
        dx = _gemm(layer, "dgrad", ops, dy, timing=timing) if dgrad else None
        dw = _gemm(layer, "wgrad", ops, dy, x2d, seed, timing) if wgrad else None
        if device_seed:
            layer.seed_dev[1:].add_(1)  # next micro-step's draw, also on replay
    else:
        dx = dy @ ops.pruned if dgrad else None
        dyt = mvue24_t(dy, seed, "ref") if layer.mvue else dy.t()
        dw = dyt @ x2d if wgrad else None
    db = dy.sum(0) if bgrad else None
    dw = dw.to(weight.dtype) if dw is not None else None
    db = db.to(bias.dtype) if db is not None else None
    return [g for g in (dx, dw, db) if g is not None]


@_linear24_bwd_op.register_fake
def _(dy, x2d, weight, bias, handle, timing, dgrad, wgrad, bgrad):
    asked = ((dgrad, x2d), (wgrad, weight), (bgrad, bias))
    return [t.new_empty(t.shape) for need, t in asked if need]


def _linear24_setup(ctx, inputs, output) -> None:
    x2d, weight, bias, handle, timing = inputs
    ctx.save_for_backward(x2d, weight, bias)
    ctx.handle, ctx.timing = handle, timing


def _linear24_grad(ctx, dy):
    x2d, weight, bias = ctx.saved_tensors
    need = (*ctx.needs_input_grad[:2], bias is not None and ctx.needs_input_grad[2])
    grads = iter(_linear24_bwd_op(dy, x2d, weight, bias, ctx.handle, ctx.timing, *need))
    return *(next(grads) if n else None for n in need), None, None


_linear24_op.register_autograd(_linear24_grad, setup_context=_linear24_setup)


def _gemm(layer: Linear24, gemm: str, ops: Operands, a: torch.Tensor, x2d: torch.Tensor | None = None,
          seed: int | torch.Tensor = 0, timing: str = "eager"):
    """One of the three GEMMs on the cuSPARSELt path; `a` is x (fwd) or dy (dgrad, wgrad)."""
    out_f, in_f = layer.weight.shape
    T = a.shape[0]
    key = (gemm, out_f, in_f, T, str(a.dtype), layer.gemm_mode, layer.mvue, timing)
    check = None
    if gemm == "fwd":  # Yᵀ = W̃ Xᵀ with the result written transposed, i.e. Y (T, out) row-major
        dense = lambda: a @ ops.pruned.t()
        sparse = lambda plan: _cslt_mm(ops.pack("w"), a.t(), True, plan)
        args = lambda: (ops.pack("w"), a.t(), True)
    elif gemm == "dgrad":  # dXᵀ = W̃ᵀ dYᵀ: W̃ᵀ is 2:4 along out because the mask is transposable
        dense = lambda: a @ ops.pruned
        sparse = lambda plan: _cslt_mm(ops.pack("wt"), a.t(), True, plan)
        args = lambda: (ops.pack("wt"), a.t(), True)
    else:  # dW = MVUE(dYᵀ) X with the pruned dYᵀ (out, T) as the sparse left operand
        # The dense fallback skips MVUE: it exists only to feed the sparse GEMM and would add variance for nothing.
        dense = lambda: a.t() @ x2d
        sparse = lambda plan: _cslt_mm(_packed_dyt(layer, a, seed), x2d, False, plan)
        args = lambda: (_packed_dyt(layer, a, seed), x2d, False)
        check = lambda: _mvue_or_plain(layer, a, seed) @ x2d  # same seed: the same draw as `sparse`
    return _planned(key, sparse, dense, args, layer.gemm_mode, timing, check)


def _planned(key: tuple, sparse, dense, args, mode: str, timing: str, check=None) -> torch.Tensor:
    """The GEMM by its plan for `key`, made on first use (make_plan)."""
    plan = PLANS.get(key)
    if plan is None:
        plan = make_plan(key, sparse, dense, args, mode, timing, check)
    return sparse(plan) if plan.sparse else dense()


# ---------------------------------------------------------------------------------------------------- fp8 e4m3
# `2of4.fp8`: the three GEMMs on e4m3 operands with per-tensor scales (kernels/fp8.py), bf16 out. Y = X·W̃ᵀ and
# dX = dY·W̃ run on cuSPARSELt's e4m3 2:4 kernels. Their scale is a pass of its own (`fp8.scale_bias_`, which on
# the forward also adds the bias): `_cslt_sparse_mm` takes a scale only as `alpha`, which it sets as
# CUSPARSELT_MATMUL_ALPHA_VECTOR_SCALING, and cuSPARSELt refuses that for e4m3 in torch 2.11 ("operation not
# supported", results/raw/h200-fp8-24-alpha.json). dW = dYᵀ·X runs on the dense fp8 tensor
# cores (`_scaled_mm`, scales fused) on the unpruned dYᵀ: a 2:4 dYᵀ would need an e4m3 compress per call, which
# costs more than the GEMM, so MVUE is not used in fp8 (as with the bf16 path's dense dW fallback). The reference
# (CPU, or a token count that is not a multiple of 16) runs the same quantization with fp32 matmuls.
def _fp8_fast(layer: Linear24, tokens: int) -> bool:
    return layer.kernel == "cusparselt" and tokens % 16 == 0  # _scaled_mm and cuSPARSELt e4m3 need k % 16


def _gemm_fp8(layer: Linear24, gemm: str, ops: Operands, q: torch.Tensor, scale: torch.Tensor, timing: str,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """fwd (q = X in e4m3) or dgrad (q = dY): sparse with a searched algorithm, or dense fp8 where measured faster
    (mode 'auto'); both return the scaled product (+ bias) in bf16."""
    out_f, in_f = layer.weight.shape
    which, b = ("w", ops.pruned.t()) if gemm == "fwd" else ("wt", ops.pruned_t.t())  # b column-major for _scaled_mm
    key = (gemm, out_f, in_f, q.shape[0], "fp8", layer.gemm_mode, False, timing)
    both = scale * ops.scale
    bias = bias.to(torch.bfloat16) if bias is not None else None
    dense = lambda: _add_bias(torch._scaled_mm(q, b, scale, ops.scale, out_dtype=torch.bfloat16), bias)
    sparse = lambda plan: fp8.scale_bias_(_cslt_mm(ops.pack(which), q.t(), True, plan, torch.bfloat16), both, bias)
    args = lambda: (ops.pack(which), q.t(), True, torch.bfloat16)
    return _planned(key, sparse, dense, args, layer.gemm_mode, timing)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


def _fwd_fp8(layer: Linear24, ops: Operands, x2d: torch.Tensor, bias: torch.Tensor | None,
             timing: str) -> torch.Tensor:
    if _fp8_fast(layer, x2d.shape[0]):
        xq, _, sx = fp8.quant(x2d, "row")
        return _gemm_fp8(layer, "fwd", ops, xq, sx, timing, bias)
    return _add_bias(fp8.fake_quant(x2d) @ fp8.dequant(ops.pruned, ops.scale, x2d.dtype).t(), bias)


def _bwd_fp8(layer: Linear24, ops: Operands, dy: torch.Tensor, x2d: torch.Tensor, dgrad: bool, wgrad: bool,
             timing: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not _fp8_fast(layer, dy.shape[0]):
        dyf = fp8.fake_quant(dy)
        dx = dyf @ fp8.dequant(ops.pruned, ops.scale, dy.dtype) if dgrad else None
        dw = dyf.t() @ fp8.fake_quant(x2d) if wgrad else None
        return dx, dw
    dyq, dyqt, sdy = fp8.quant(dy, "both" if dgrad and wgrad else "row" if dgrad else "col")
    dx = _gemm_fp8(layer, "dgrad", ops, dyq, sdy, timing) if dgrad else None
    dw = None
    if wgrad:  # Xᵀ quantized again rather than saved by the forward: one read of X against an e4m3 copy held
        _, xqt, sx = fp8.quant(x2d, "col")  # from forward to backward for every layer
        dw = torch._scaled_mm(dyqt, xqt.t(), sdy, sx, out_dtype=torch.bfloat16)
    return dx, dw


def _packed_dyt(layer: Linear24, dy: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    """MVUE(dYᵀ) compressed for cuSPARSELt: drawn and packed in one pass by our kernel where the layout allows (10x
    faster than MVUE then `_cslt_compress`, results/raw/h100-cslt-pack.json), the same draw either way."""
    if layer.mvue and isinstance(seed, int) and cslt_pack.supported(dy.shape[1], dy.shape[0], dy.dtype):
        return cslt_pack.mvue24_pack(dy, seed)
    return torch._cslt_compress(_mvue_or_plain(layer, dy, seed))


def _mvue_or_plain(layer: Linear24, dy: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    if layer.mvue:
        return mvue24_t(dy, seed)
    return dy.t().contiguous()  # not 2:4: cuSPARSELt's compress keeps 2 of 4 (biased); only for experiments


# ----------------------------------------------------------------------------------------------------- module
LINEAR_IMPLS = {"cusparselt": "cusparselt", "ref": "ref"}
_LINEAR_CAN_RUN = {"cusparselt": cusparselt_available}


class Linear24(nn.Linear):
    """nn.Linear whose forward uses W̃ = M⊙W with a transposable 2:4 mask M (a plain attribute, not a buffer).

    `weight` and `bias` are the dense model's parameters (same objects, same state_dict keys). The owning method
    sets the mask, calls `begin_step` each optimizer step and `invalidate` after each update; operands are
    re-packed lazily at the next forward. With `dense = True` (the dense fine-tune) it is exactly nn.Linear.
    `set_graph_mode(True)` (by SparseMLP24) keeps the operands at fixed addresses, re-packed in place, and draws
    the MVUE seed from a device tensor, so that CUDA graphs captured over this layer stay valid.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.mask_index: torch.Tensor | None = None  # (out/4, in/4) uint8 pattern per block
        self.mask: torch.Tensor | None = None  # bool (out, in)
        self.dense = False
        self.kernel = "ref"  # 'ref' or 'cusparselt', resolved by kernels.select
        self.gemm_mode = "auto"  # 'auto': per-GEMM measured fallback; 'sparse': every GEMM sparse
        self.mvue = True
        self.fp8 = False  # e4m3 GEMMs with per-tensor scales (see 'fp8 e4m3' above)
        self.seed, self.layer_id, self.step, self.micro = 0, 0, 0, 0
        self._ops: dict[torch.dtype, Operands] = {}
        self.static = False  # operands in fixed buffers, re-packed in place (graph mode)
        self.plan_timing = "eager"  # how GEMM plans made by the next forward are timed: 'eager' or 'graph'
        self.seed_dev: torch.Tensor | None = None  # graph mode: int64 [base, micro] on the device
        self._static: dict[torch.dtype, Operands] = {}
        # Compressed W̃ and W̃ᵀ kept from step to step: cuSPARSELt's metadata depends on the mask alone, so while the
        # mask holds a step re-writes only their values (cslt_pack.write_values), in place.
        self._packs: dict[tuple[torch.dtype, str], torch.Tensor] = {}
        self._kept_cols: dict[str, torch.Tensor] = {}
        self.handle = _register(self)  # how the custom ops find this layer

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.handle = _register(self)  # a copy is a layer of its own

    @classmethod
    def from_dense(cls, linear: nn.Linear, backend: str = "auto", mvue: bool = True, seed: int = 0,
                   layer_id: int = 0, fp8: bool = False) -> Linear24:
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        m.weight, m.bias = linear.weight, linear.bias  # adopt: the optimizer and state_dict see the same tensors
        m.mvue, m.seed, m.layer_id, m.fp8 = mvue, seed, layer_id, fp8
        m.set_backend(backend)
        return m

    def set_backend(self, backend: str) -> None:
        self.gemm_mode = "sparse" if backend == "cusparselt" else "auto"
        on_gpu = self.weight.is_cuda or backend == "cusparselt"
        self.kernel = select(LINEAR_IMPLS, backend, _LINEAR_CAN_RUN) if on_gpu else "ref"
        if self.fp8 and self.kernel == "cusparselt" and torch.cuda.get_device_capability() < (8, 9):
            raise RuntimeError("2of4.fp8 needs fp8 tensor cores (sm89+, e.g. H100); "
                               "2of4.backend=ref simulates its rounding")

    def set_mask(self, index: torch.Tensor) -> None:
        self.mask_index, self.mask = index, mask_from_index(index)
        self._packs.clear()
        self._kept_cols.clear()
        self.invalidate()

    @torch.no_grad()
    def _repack(self, dtype: torch.dtype, which: str, pruned: torch.Tensor) -> torch.Tensor:
        """W̃ (which 'w') or W̃ᵀ ('wt') compressed: compressed once per mask, then only its values re-written."""
        if self.static or not cslt_pack.supported(*pruned.shape, dtype):  # graph mode keeps its own buffers
            return torch._cslt_compress(pruned)
        mask = self.mask if which == "w" else self.mask.t()
        packed = self._packs.get((dtype, which))
        if packed is None:  # codes from the mask, not from W̃'s nonzeros: a kept weight may be exactly 0
            packed = self._packs[(dtype, which)] = cslt_pack.pack_ref(pruned, mask)
            self._kept_cols[which] = cslt_pack.kept_columns(mask)
        else:
            cslt_pack.write_values(packed, self.weight if which == "w" else self.weight.t(), self._kept_cols[which])
        return packed

    def invalidate(self) -> None:
        self._ops.clear()

    def begin_step(self, step: int) -> None:
        self.step, self.micro = step, 0
        if self.seed_dev is not None:  # fill_ with a host scalar is a kernel launch, not a sync
            self.seed_dev[0].fill_(derive_seed(self.seed, step, self.layer_id, 0))
            self.seed_dev[1].zero_()

    def set_graph_mode(self, on: bool) -> None:
        """Static operands, graph-timed GEMM plans and a device MVUE seed (on), or the plain eager path (off)."""
        self.static, self.plan_timing = on, "graph" if on else "eager"
        self.invalidate()  # operands built before must not outlive the switch: a graph would keep reading them
        if on and self.seed_dev is None:
            self.seed_dev = torch.zeros(2, dtype=torch.int64, device=self.weight.device)
            self.begin_step(self.step)
        elif not on:
            self.seed_dev = None
            self._static.clear()

    def next_seed(self) -> int:
        self.micro += 1
        return derive_seed(self.seed, self.step, self.layer_id, self.micro - 1)

    def operands(self, dtype: torch.dtype) -> Operands:
        ops = self._ops.get(dtype)
        if ops is None:
            if self.fp8:  # the e4m3 W̃ and W̃ᵀ from one cast of W̃; compressed by cuSPARSELt when first used
                wq, wqt, scale = fp8.quant(prune24(self.weight, self.mask_index, dtype)[0])
                ops = Operands(wq, wqt, scale=scale)
            elif self.kernel == "cusparselt":
                ops = Operands(*prune24(self.weight, self.mask_index, dtype),
                               repack=functools.partial(self._repack, dtype))
            else:
                ops = Operands((self.weight.detach() * self.mask).to(dtype))
            if self.static:
                ops = self._into_static(dtype, ops)
            self._ops[dtype] = ops
        return ops

    @torch.no_grad()
    def _into_static(self, dtype: torch.dtype, fresh: Operands) -> Operands:
        if self.kernel == "cusparselt":  # both packs now: a graph cannot compress lazily on first use
            fresh.pack("w")
            fresh.pack("wt")
        ops = self._static.get(dtype)
        if ops is None:
            self._static[dtype] = fresh
            return fresh
        pairs = [(ops.pruned, fresh.pruned), (ops.pruned_t, fresh.pruned_t)]
        pairs += [(ops.packed.get(k), fresh.packed[k]) for k in fresh.packed] + [(ops.scale, fresh.scale)]
        for old, new in pairs:
            if (old is None) != (new is None) or (old is not None and old.shape != new.shape):
                raise RuntimeError("2:4 operands changed layout; static buffers cannot be refilled in place")
            if old is not None:
                old.copy_(new)
        return ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense or self.mask is None:
            return F.linear(x, self.weight, self.bias)
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x2d = x.reshape(-1, x.shape[-1]).to(dtype)
        y = _linear24_op(x2d, self.weight, self.bias, self.handle, self.plan_timing)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel}, dense={self.dense}, mvue={self.mvue}, fp8={self.fp8}"


# ------------------------------------------------------------------------------------------------ CUDA graphs
class _GraphReplay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cap: GraphedFwdBwd, *params):
        ctx.cap, ctx.x_is_leaf = cap, x.is_leaf
        cap.pending, cap.ctx = True, weakref.ref(ctx)
        cap.static_in.copy_(x)
        cap.fwd.replay()
        return cap.static_out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        cap = ctx.cap
        cap.static_dy.copy_(dy)
        cap.bwd.replay()
        cap.pending = False
        dx, *dparams = cap.static_grads
        # AccumulateGrad adopts a gradient that nothing else references as .grad; a static buffer adopted so would
        # be overwritten by the next micro-batch's replay. So what may become .grad is returned as a copy.
        return (dx.clone() if ctx.x_is_leaf else dx.detach()), None, *(g.clone() for g in dparams)


class GraphedFwdBwd:
    """y = fn(x) and its backward (dx and the parameters' gradients) replayed from two CUDA graphs.

    What torch.cuda.make_graphed_callables does, with two differences: parameter gradients are returned as copies
    (make_graphed_callables returns its static buffers, which breaks gradient accumulation over micro-batches, see
    _GraphReplay.backward), and `busy()` says whether a replay's backward is still owed, when a second replay would
    overwrite what that backward reads. Captured on the current stream's device with autocast off: fn must cast
    itself. x must have the sample's shape and dtype.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], params: Sequence[torch.Tensor],
                 sample: torch.Tensor, warmup: int = 3):
        self.params = tuple(params)
        self.static_in = sample.detach().clone().requires_grad_(True)
        self.pending, self.ctx = False, lambda: None
        inputs = (self.static_in, *self.params)
        with torch.autocast("cuda", enabled=False), torch.enable_grad():
            side = torch.cuda.Stream()  # warm-up off the capture stream: lazy inits (cuBLAS, Triton) happen here
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    out = fn(self.static_in)
                    torch.autograd.grad(out, inputs, torch.ones_like(out))
            torch.cuda.current_stream().wait_stream(side)
            self.fwd = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.fwd):
                self.static_out = fn(self.static_in)
            self.static_dy = torch.empty_like(self.static_out)
            self.bwd = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.bwd, pool=self.fwd.pool()):
                self.static_grads = torch.autograd.grad(self.static_out, inputs, self.static_dy)

    def busy(self) -> bool:
        """A replay's output still has a backward to come (its autograd graph is alive and was not run)."""
        return self.pending and self.ctx() is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _GraphReplay.apply(x, self, *self.params)


class SparseMLP24(nn.Module):
    """GPT-2's MLP (c_fc -> GELU -> c_proj -> dropout) over two Linear24, with the three of them CUDA-graphed.

    Adopts the MLP's submodules under the same names, so state_dict keys stay the dense model's. On CUDA with both
    linears on cuSPARSELt, in training with gradients, each input shape runs `warmup` eager calls (which make the
    graph-timed GEMM plans) and is then captured once (fwd and bwd graphs) and replayed; the packed weights are
    re-packed in place before each replay when stale. Anything else (CPU, reference kernels, dense fine-tune,
    no_grad, eval, a replay still awaiting its backward) runs the eager path. A failed capture logs one warning
    and turns graphs off for every SparseMLP24 of the process: training goes on eagerly.

    All of that runs inside one custom op (`sparse_pretrain::mlp24`), so torch.compile sees the MLP as one opaque
    op and its graphs still replay. With gradients, the op's body records the autograd graph of the eager path
    (from a detached x to the parameters) and keeps it under a ticket, a tensor the op also returns and its autograd
    formula saves: the backward op runs the graph of its own forward, and a graph whose backward will never come
    (its caller's graph is gone) is dropped with the ticket, as eager autograd would drop it.
    """

    def __init__(self, mlp: nn.Module, cuda_graph: bool = True, warmup: int = 2):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj, self.dropout = mlp.c_fc, mlp.gelu, mlp.c_proj, mlp.dropout
        self.cuda_graph, self.warmup = cuda_graph, warmup
        self._graphs: dict[tuple, GraphedFwdBwd] = {}
        self._calls: dict[tuple, int] = {}
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # ticket -> (detached x, output)
        self.handle = _register(self)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # graphs are bound to their buffers and device: a copy re-captures
        state["_graphs"], state["_calls"], state["_pending"] = {}, {}, {}
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.handle = _register(self)

    def core(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))

    def _graph_key(self, x: torch.Tensor) -> tuple | None:
        linears = (self.c_fc, self.c_proj)
        if "graph" in _BROKEN or not self.cuda_graph:
            for m in linears:
                if m.static:
                    m.set_graph_mode(False)
            return None
        if any(m.dense for m in linears) and self._graphs:
            self._graphs.clear()  # the dense fine-tune is final: give the graphs' memory back
        if not (x.is_cuda and self.training and torch.is_grad_enabled() and x.requires_grad):
            return None
        if torch.cuda.is_current_stream_capturing():
            return None
        if any(m.dense or m.mask is None or m.kernel != "cusparselt" for m in linears):
            return None
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        return tuple(x.shape), x.dtype, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        params = [p for p in self.parameters() if p.requires_grad]
        x_grad = torch.is_grad_enabled() and x.requires_grad
        grad = x_grad or (torch.is_grad_enabled() and len(params) > 0)
        return self.dropout(_mlp24_op(x, params, self.handle, amp, grad, x_grad)[0])

    def _op_forward(self, x: torch.Tensor, amp: torch.dtype | None, grad: bool,
                    x_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ticket = next(_TICKETS)
        with torch.autocast(x.device.type, amp) if amp is not None else contextlib.nullcontext():
            if not grad:
                return self._core_maybe_graphed(x), torch.tensor(ticket)
            with _autograd_in_op(), torch.enable_grad():
                xl = x.detach().requires_grad_(x_grad)
                # A leaf: dx never aliases a graph's static buffer (returned from an op, compiled code might reuse it).
                y = self._core_maybe_graphed(xl)
        self._pending[ticket] = xl, y
        held = torch.tensor(ticket)
        weakref.finalize(held, self._pending.pop, ticket, None)
        return y.detach(), held

    def _op_backward(self, dy: torch.Tensor, ticket: torch.Tensor, x_grad: bool) -> list[torch.Tensor]:
        entry = self._pending.pop(int(ticket), None)
        if entry is None:
            raise RuntimeError("SparseMLP24: this forward's graph was already run by a backward (no retain_graph)")
        xl, y = entry
        params = [p for p in self.parameters() if p.requires_grad]
        return list(torch.autograd.grad(y, [xl, *params] if x_grad else params, dy))

    def _core_maybe_graphed(self, x: torch.Tensor) -> torch.Tensor:
        key = self._graph_key(x)
        if key is None:
            return self._eager(x)
        dtype = key[2]
        for m in (self.c_fc, self.c_proj):
            if not m.static:
                m.set_graph_mode(True)
            m.operands(dtype)  # re-pack in place if the weights or the mask changed since the last replay
        xc = x.to(dtype)
        cap = self._graphs.get(key)
        if cap is None:
            calls = self._calls.get(key, 0)
            self._calls[key] = calls + 1
            if calls >= self.warmup:
                cap = self._capture(key, xc)
        if cap is None:
            return self.core(xc)  # a warm-up call: its GEMM plans are timed as graph replays
        if cap.busy():
            return self._eager(xc)
        return cap(xc)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        linears = (self.c_fc, self.c_proj)
        timing = [m.plan_timing for m in linears]
        for m in linears:  # plain calls pay cuSPARSELt's host overhead: plan them by eager timings
            m.plan_timing = "eager"
        try:
            return self.core(x)
        finally:
            for m, t in zip(linears, timing, strict=True):
                m.plan_timing = t

    def _capture(self, key: tuple, xc: torch.Tensor) -> GraphedFwdBwd | None:
        params = [p for p in self.parameters() if p.requires_grad]
        seeds = [m.seed_dev.clone() for m in (self.c_fc, self.c_proj)]
        try:
            cap = GraphedFwdBwd(self.core, params, xc)
        except Exception as e:  # an op that cannot be captured, OOM, an old driver: train on, eagerly
            _BROKEN.add("graph")
            log.warning("2:4 MLP CUDA-graph capture failed (%s: %s); running eagerly from now on",
                        type(e).__name__, e)
            try:
                torch.cuda.synchronize()
            except Exception:  # a sticky CUDA error surfaces at the next op anyway
                pass
            return None
        finally:
            for m, s in zip((self.c_fc, self.c_proj), seeds, strict=True):
                m.seed_dev.copy_(s)  # the capture's warm-up draws must not shift this step's seeds
        self._graphs[key] = cap
        log.info("2:4 MLP captured for input %s (%s compute)", key[0], key[2])
        return cap


# --------------------------------------------------------------------------------- custom ops: SparseMLP24
def _autograd_in_op() -> torch._C._ForceDispatchKeyGuard:
    """Autograd recording inside a custom op's body, which the dispatcher runs with autograd excluded (the op's own
    formula stands for it there): SparseMLP24's body records the graph that its backward op then runs."""
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(torch._C.DispatchKey.AutogradFunctionality)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


_TICKETS = itertools.count()


@torch.library.custom_op("sparse_pretrain::mlp24", mutates_args=())
def _mlp24_op(x: torch.Tensor, params: list[torch.Tensor], handle: int, amp: torch.dtype | None, grad: bool,
              x_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(SparseMLP24's c_proj(gelu(c_fc(x))), CUDA-graph replay included; a ticket: int64 scalar on the CPU).

    params are inputs only so that their gradients flow. amp: the caller's autocast dtype, re-entered in the body
    (compiled code calls ops with autocast off); grad, x_grad: a backward may follow, and it needs dx.
    """
    return _MODULES[handle]._op_forward(x, amp, grad, x_grad)


@_mlp24_op.register_fake
def _(x, params, handle, amp, grad, x_grad):
    return x.new_empty(x.shape, dtype=amp if amp is not None else x.dtype), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("sparse_pretrain::mlp24_bwd", mutates_args=())
def _mlp24_bwd_op(dy: torch.Tensor, ticket: torch.Tensor, params: list[torch.Tensor], handle: int,
                  x_dtype: torch.dtype, x_grad: bool) -> list[torch.Tensor]:
    """[dx (if x_grad), a gradient per param] from the graph that the ticket's forward recorded."""
    return _MODULES[handle]._op_backward(dy, ticket, x_grad)


@_mlp24_bwd_op.register_fake
def _(dy, ticket, params, handle, x_dtype, x_grad):
    return ([dy.new_empty(dy.shape, dtype=x_dtype)] if x_grad else []) + [p.new_empty(p.shape) for p in params]


def _mlp24_setup(ctx, inputs, output) -> None:
    x, params, handle, amp, grad, x_grad = inputs
    ctx.save_for_backward(output[1], *params)
    ctx.handle, ctx.x_dtype, ctx.x_grad = handle, x.dtype, x_grad


def _mlp24_grad(ctx, dy, _dticket):
    ticket, *params = ctx.saved_tensors
    grads = _mlp24_bwd_op(dy, ticket, params, ctx.handle, ctx.x_dtype, ctx.x_grad)
    dx, dparams = (grads[0], grads[1:]) if ctx.x_grad else (None, grads)
    return dx, dparams, None, None, None, None


_mlp24_op.register_autograd(_mlp24_grad, setup_context=_mlp24_setup)
