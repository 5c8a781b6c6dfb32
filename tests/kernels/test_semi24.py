"""2:4 kernels against their definitions (spec 2of4.md §11, items 1-3, 7, 8)."""

import copy
import textwrap

import pytest
import torch
import torch.nn.functional as F

from kernels import fp8
from kernels import semi24 as s
from model.gpt import MLP, GPTConfig
from tests.interpreted import check_interpreted


def _blocks(w: torch.Tensor) -> torch.Tensor:
    R, C = w.shape
    return w.reshape(R // 4, 4, C // 4, 4).permute(0, 2, 1, 3).reshape(-1, 16)


def test_patterns_are_the_90_transposable_ones():
    P = s.PATTERNS.reshape(-1, 4, 4)
    assert P.shape[0] == 90 and len({tuple(p) for p in s.PATTERNS.int().tolist()}) == 90
    assert (P.sum(1) == 2).all() and (P.sum(2) == 2).all()
    # Brute force over all 2^16 masks: exactly these 90 have two per row and two per column.
    bits = (torch.arange(2**16)[:, None] >> torch.arange(16)) & 1
    ok = (bits.reshape(-1, 4, 4).sum(1) == 2).all(1) & (bits.reshape(-1, 4, 4).sum(2) == 2).all(1)
    assert set(map(tuple, bits[ok].tolist())) == set(map(tuple, s.PATTERNS.int().tolist()))
    assert torch.equal(s.PATTERN_DIFF, s.PATTERN_DIFF.t()) and (s.PATTERN_DIFF.diagonal() == 0).all()


@pytest.mark.parametrize("shape", [(8, 12), (16, 32), (36, 20)])
def test_search_equals_brute_force(shape):
    w = torch.randn(shape)
    mask = s.transposable_mask_ref(w)
    kept = _blocks(w.abs() * mask).sum(1)
    every = torch.stack([_blocks(w.abs())[:, p].sum(1) for p in s.PATTERNS])  # (90, blocks), explicit sums
    assert torch.allclose(kept, every.max(0).values, rtol=1e-6)
    assert torch.equal(_blocks(mask), s.PATTERNS[every.argmax(0)])  # random data: the maximum is unique
    assert (mask.reshape(-1, 4).sum(1) == 2).all() and (mask.t().reshape(-1, 4).sum(1) == 2).all()
    assert (_blocks(mask).sum(1) == 8).all()


def test_search_ties_take_the_lower_index():
    assert (s.transposable_search_ref(torch.ones(8, 8)) == 0).all()


def test_search_beats_pytorch_greedy_tile():
    if not hasattr(torch, "_sparse_semi_structured_tile") or not torch.cuda.is_available():
        pytest.skip("torch._sparse_semi_structured_tile has only a CUDA kernel")
    w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    bitmask = torch._sparse_semi_structured_tile(w, "", False)[4]  # greedy transposable prune, as a bitmask
    pruned = torch.ops.aten._sparse_semi_structured_apply_dense(w, bitmask)
    ours = (w.abs() * s.transposable_mask_ref(w)).float().sum()
    assert ours >= pruned.abs().float().sum()


def test_mask_24_ref_keeps_two_largest():
    w = torch.tensor([[1.0, -5.0, 3.0, 0.5, 0.0, 2.0, -2.5, 1.0]])
    assert s.mask_24_ref(w).tolist() == [[False, True, True, False, False, True, True, False]]


def test_flipped_entries_hand_case():
    # Blocks [1100 1100 0011 0011] and [1010 1100 0101 0011]: rows 0 and 2 each move one kept entry.
    a = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 1]], dtype=torch.bool)
    index = {tuple(p): i for i, p in enumerate(s.PATTERNS.int().tolist())}
    ia = torch.tensor([[index[tuple(a.flatten().int().tolist())]]], dtype=torch.uint8)
    ib = torch.tensor([[index[tuple(b.flatten().int().tolist())]]], dtype=torch.uint8)
    assert s.flipped_entries(ia, ib).item() / 16 == 0.25
    assert s.flipped_entries(ia, ia).item() == 0
    assert torch.equal(s.mask_from_index(ib), b)


def test_mvue_unbiased_24_bounded():
    x = torch.randn(4, 16)
    x[1, 4:8] = 0.0  # a zero group
    n = 10_000
    gen = torch.Generator().manual_seed(0)
    out = s.mvue24_ref(x.repeat(n, 1), gen).reshape(n, 4, 16)
    assert not out.isnan().any() and (out[:, 1, 4:8] == 0).all()
    assert ((out.reshape(-1, 4) != 0).sum(1) <= 2).all()
    l1 = x.abs().reshape(4, 4, 4).sum(-1, keepdim=True).expand(4, 4, 4).reshape(4, 16)
    assert (out.abs() <= l1 + 4 * 1.2e-7 + 1e-6 * l1).all()
    mean, se = out.mean(0), out.std(0) / n**0.5
    assert (mean - x).norm() / x.norm() < 0.02
    assert ((mean - x).abs() <= 5 * se + 1e-6).all()


def test_derive_seed_is_stable_and_distinct():
    seeds = {s.derive_seed(0, st, la, mi) for st in range(4) for la in range(4) for mi in range(4)}
    assert len(seeds) == 64 and s.derive_seed(1, 2, 3, 4) == s.derive_seed(1, 2, 3, 4) < 2**31


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mvue", [False, True])
def test_sparse_linear_ref_equals_masked_dense(bias, mvue):
    lin = torch.nn.Linear(32, 16, bias=bias)
    m = s.Linear24.from_dense(lin, backend="ref", mvue=mvue, seed=3, layer_id=1)
    m.set_mask(s.transposable_search_ref(lin.weight))
    x = torch.randn(2, 6, 32, requires_grad=True)
    y = m(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    wm = lin.weight.detach() * m.mask
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(y, F.linear(x2, wm, lin.bias), rtol=0, atol=0)
    dy2, x2d = dy.reshape(-1, 16), x.detach().reshape(-1, 32)
    torch.testing.assert_close(x.grad, (dy2 @ wm).reshape(x.shape))
    dyt = s.mvue24_t(dy2, s.derive_seed(3, 0, 1, 0), "ref") if mvue else dy2.t()
    torch.testing.assert_close(lin.weight.grad, dyt @ x2d)  # straight-through: unmasked
    if bias:
        torch.testing.assert_close(lin.bias.grad, dy2.sum(0))
    assert set(dict(m.named_parameters())) == set(dict(lin.named_parameters()))
    assert m.weight is lin.weight


@pytest.mark.parametrize("tokens", [16, 6])
def test_fp8_linear_ref_is_the_e4m3_rounded_linear(tokens):
    # fp8: every GEMM sees its operands rounded through e4m3 with per-tensor scales; dW from the unpruned dY
    lin = torch.nn.Linear(32, 16)
    m = s.Linear24.from_dense(lin, backend="ref", fp8=True)
    m.set_mask(s.transposable_search_ref(lin.weight))
    x = torch.randn(tokens, 32, requires_grad=True)
    y = m(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    wq = fp8.fake_quant(lin.weight.detach() * m.mask)
    xq, dyq = fp8.fake_quant(x.detach()), fp8.fake_quant(dy)
    torch.testing.assert_close(y, xq @ wq.t() + lin.bias, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, dyq @ wq, rtol=0, atol=0)
    torch.testing.assert_close(lin.weight.grad, dyq.t() @ xq, rtol=0, atol=0)
    torch.testing.assert_close(lin.bias.grad, dy.sum(0), rtol=0, atol=0)
    exact = F.linear(x.detach(), lin.weight.detach() * m.mask, lin.bias)
    assert 0 < _rel(y, exact) < 0.06  # rounded, but only by e4m3's ~3% step


def test_linear24_dense_mode_is_linear():
    lin = torch.nn.Linear(8, 8)
    m = s.Linear24.from_dense(lin, backend="ref")
    m.set_mask(s.transposable_search_ref(lin.weight))
    m.dense = True
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=0)


def test_mvue_reference_takes_a_device_seed():
    x = torch.randn(16, 8)
    dev_seed = torch.tensor([99, 2], dtype=torch.int64)
    assert torch.equal(s.mvue24_t(x, dev_seed, "ref"), s.mvue24_t(x, s.mixed_seed(99, 2), "ref"))
    assert not torch.equal(s.mvue24_t(x, dev_seed, "ref"), s.mvue24_t(x, s.mixed_seed(99, 3), "ref"))


def test_static_operands_keep_addresses_across_repack_and_refresh():
    lin = torch.nn.Linear(32, 16, bias=False)
    m = s.Linear24.from_dense(lin, backend="ref", seed=5, layer_id=2)
    m.set_mask(s.transposable_search_ref(lin.weight))
    eager_ops = m.operands(torch.float32)
    m.set_graph_mode(True)
    m.begin_step(7)
    assert m.seed_dev.tolist() == [s.derive_seed(5, 7, 2, 0), 0]
    ops = m.operands(torch.float32)
    assert ops is not eager_ops and ops is m._static[torch.float32]
    ptr = ops.pruned.data_ptr()
    with torch.no_grad():
        lin.weight.mul_(-2.0)  # an optimizer step: values change, the mask does not
    m.invalidate()
    assert m.operands(torch.float32) is ops and ops.pruned.data_ptr() == ptr
    assert torch.equal(ops.pruned, lin.weight.detach() * m.mask)
    new_idx = s.transposable_search_ref(torch.randn(16, 32))  # a mask refresh
    m.set_mask(new_idx)
    assert m.operands(torch.float32) is ops and ops.pruned.data_ptr() == ptr
    assert torch.equal(ops.pruned, lin.weight.detach() * s.mask_from_index(new_idx))
    x = torch.randn(3, 32)
    torch.testing.assert_close(m(x), F.linear(x, lin.weight * m.mask), rtol=0, atol=0)
    m.set_graph_mode(False)
    assert not m.static and m.seed_dev is None and m.plan_timing == "eager"


def _tiny_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(GPTConfig(preset="tiny", block_size=16, vocab_size=64))


def test_sparse_mlp_runs_eagerly_on_cpu_and_equals_the_plain_mlp():
    plain = _tiny_mlp()
    for k in ("c_fc", "c_proj"):
        lin24 = s.Linear24.from_dense(getattr(plain, k), backend="ref", mvue=False)
        lin24.set_mask(s.transposable_search_ref(lin24.weight))
        setattr(plain, k, lin24)
    keys = set(plain.state_dict())
    mlp = s.SparseMLP24(plain)
    assert set(mlp.state_dict()) == keys
    grads = []
    for m in (mlp, plain):
        for p in m.parameters():
            p.grad = None
        x_grads = []
        for step in range(4):  # past the warm-up count: a GPU would have captured by now
            g = torch.Generator().manual_seed(step)
            xs = [torch.randn(2, 8, 64, generator=g, requires_grad=True) for _ in range(2)]
            ys = [m(x) for x in xs]  # two forwards before the backwards, which then run in forward order
            m(xs[0])  # a forward whose backward never comes
            for y in ys:
                y.square().sum().backward()
            x_grads += [x.grad for x in xs]
        grads.append([p.grad.clone() for p in m.parameters()] + x_grads)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert mlp._pending == {}  # each backward ran its own forward's graph; the dropped one went with its output
    assert mlp._graphs == {} and mlp._calls == {}  # CPU: never a capture, never counted towards one
    assert not mlp.c_fc.static and mlp.c_fc.plan_timing == "eager"
    clone = copy.deepcopy(mlp)
    assert clone._graphs == {} and clone.c_fc.weight is not mlp.c_fc.weight
    # The custom ops find a layer by its handle: a copy (search_decay's trial models) must get handles of its own.
    assert s._MODULES[clone.handle] is clone and s._MODULES[clone.c_fc.handle] is clone.c_fc
    with torch.no_grad():
        clone.c_fc.weight.mul_(-1.0)
        clone.c_fc.invalidate()
        x = torch.randn(2, 8, 64)
        h = F.gelu(F.linear(x, clone.c_fc.weight * clone.c_fc.mask), approximate="tanh")
        torch.testing.assert_close(clone(x), F.linear(h, clone.c_proj.weight * clone.c_proj.mask), rtol=0, atol=0)
        assert not torch.equal(clone(x), mlp(x))


_TRITON_CHECK = textwrap.dedent(
    """
    import tests.triton_interp  # noqa: F401  (interpreter on, numpy shim)
    import torch
    from kernels import semi24 as s
    from kernels import semi24_triton as st
    torch.manual_seed(0)
    w = torch.randn(36, 136)
    idx = st.transposable_search(w, s.PATTERNS.float())
    assert torch.equal(idx, s.transposable_search_ref(w)), "search"
    p, pt = st.prune24(w, idx, s.PATTERN_BITS, torch.float32)
    assert torch.equal(p, w * s.mask_from_index(idx)) and torch.equal(pt, p.t()), "prune"
    x = torch.randn(8, 5)
    x[4:8, 3] = 0.0
    n = 1200  # independent draws = the same 5 columns repeated, one call (Philox counters differ per group)
    out = st.mvue24_t(x.repeat(1, n), s.derive_seed(0, 1, 2, 3))
    assert out.shape == (5 * n, 8) and not out.isnan().any(), "shape"
    assert ((out.reshape(-1, 4) != 0).sum(1) <= 2).all() and (out[3::5, 4:8] == 0).all(), "2:4"
    draws = out.reshape(n, 5, 8)
    mean, se = draws.mean(0), draws.std(0) / n**0.5
    assert ((mean - x.t()).abs() <= 5 * se + 1e-6).all(), "unbiased"
    assert torch.equal(st.mvue24_t(x, 7), st.mvue24_t(x, 7)), "deterministic"
    dev_seed = torch.tensor([12345, 3], dtype=torch.int64)  # graph mode: the kernel reads [base, micro]
    assert torch.equal(st.mvue24_t(x, dev_seed), st.mvue24_t(x, s.mixed_seed(12345, 3))), "device seed"
    print("ok")
    """
)


@pytest.mark.slow
def test_triton_kernels_match_reference_in_interpreter():
    pytest.importorskip("triton")
    check_interpreted(_TRITON_CHECK, timeout=240)


# ------------------------------------------------------------------------------------------------------- GPU
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
def test_gpu_search_and_prune_match_reference():
    w = torch.randn(1024, 768, device="cuda")
    idx = s.transposable_search(w, "triton")
    ref = s.transposable_search_ref(w)
    kept = lambda i: _blocks(w.abs() * s.mask_from_index(i)).sum(1)
    torch.testing.assert_close(kept(idx), kept(ref), rtol=1e-5, atol=1e-6)  # near-ties may pick either
    p, pt = s.prune24(w, idx, torch.bfloat16)
    assert torch.equal(p, (w * s.mask_from_index(idx)).bfloat16()) and torch.equal(pt, p.t())


@pytest.mark.gpu
def test_gpu_mvue_matches_reference_statistics():
    x = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16)
    out = s.mvue24_t(x, 5, "triton")
    assert out.shape == (256, 4096) and ((out.reshape(-1, 4) != 0).sum(1) <= 2).all()
    draws = torch.stack([s.mvue24_t(x[:64], s.derive_seed(0, k, 0, 0), "triton").float() for k in range(2000)])
    assert _rel(draws.mean(0), x[:64].t()) < 0.05


def _fast_and_ref(lin: torch.nn.Linear, backend: str, **knobs) -> tuple[s.Linear24, list[tuple]]:
    """(the fast layer, [its (y, dx, grads...), the reference's]) for one 8k-token bf16 fwd+bwd under one mask."""
    fast = s.Linear24.from_dense(lin, backend=backend, **knobs)
    ref = s.Linear24.from_dense(lin, backend="ref", **knobs)
    idx = s.transposable_search(lin.weight)
    fast.set_mask(idx)
    ref.set_mask(idx)
    x = torch.randn(8192, lin.in_features, device="cuda")
    dy = torch.randn(8192, lin.out_features, device="cuda", dtype=torch.bfloat16)
    outs = []
    for m in (fast, ref):
        xx = x.clone().requires_grad_(True)
        for p in lin.parameters():
            p.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            y = m(xx)
        y.backward(dy)
        outs.append((y, xx.grad, *(p.grad.clone() for p in lin.parameters())))
    assert fast.kernel == "cusparselt" and ref.kernel == "ref"
    return fast, outs


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cusparselt", "auto"])
def test_gpu_sparse_linear_matches_reference(backend):
    if not s.cusparselt_available():
        pytest.skip("no cuSPARSELt-capable GPU")
    _, outs = _fast_and_ref(torch.nn.Linear(1024, 4096, bias=False, device="cuda"), backend, mvue=False)
    for a, b in zip(*outs, strict=True):
        assert _rel(a, b) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cusparselt", "auto"])
def test_gpu_fp8_linear_matches_its_reference(backend):
    # Same quantization (Triton on both sides), so fast and reference differ only by GEMM accumulation order.
    if not s.cusparselt_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs an sm89+ GPU with cuSPARSELt")
    _, outs = _fast_and_ref(torch.nn.Linear(1024, 4096, device="cuda"), backend, fp8=True)
    for a, b in zip(*outs, strict=True):  # y, dx, dW, db
        assert _rel(a, b) < 1e-2
    plans = [p for k, p in s.PLANS.items() if k[4] == "fp8" and k[1:4] == (4096, 1024, 8192)]
    assert plans and all(p.reason in ("measured", "dense is faster", "forced") for p in plans)  # none failed
    if backend == "cusparselt":
        assert all(p.sparse for p in plans)  # forced: the sparse e4m3 kernels ran


def _graph_variants(d: int, mvue: bool, backend: str = "cusparselt") -> dict[str, s.SparseMLP24]:
    """The same MLP weights three ways: graphed sparse, eager sparse, reference (all sharing the Parameters)."""
    torch.manual_seed(0)
    base = MLP(GPTConfig(n_layer=1, n_head=4, n_embd=d, block_size=64, vocab_size=64, bias=False)).cuda()
    idx = {k: s.transposable_search(getattr(base, k).weight) for k in ("c_fc", "c_proj")}
    out = {}
    for name, kind, graph in (("graph", backend, True), ("eager", backend, False), ("ref", "ref", False)):
        mlp = MLP(GPTConfig(n_layer=1, n_head=4, n_embd=d, block_size=64, vocab_size=64, bias=False))
        for i, k in enumerate(("c_fc", "c_proj")):
            lin = s.Linear24.from_dense(getattr(base, k), backend=kind, mvue=mvue, seed=1, layer_id=i)
            lin.set_mask(idx[k])
            setattr(mlp, k, lin)
        out[name] = s.SparseMLP24(mlp.cuda(), cuda_graph=graph)
    return out


def _run_steps(mlp: s.SparseMLP24, steps: int, micro: int, d: int, refresh_at: int, idx_new: list[torch.Tensor]):
    """Micro-batches with gradient accumulation, a weight update after each step, a mask refresh at refresh_at."""
    ys, grads = [], []
    weights = [mlp.c_fc.weight, mlp.c_proj.weight]
    saved = [w.detach().clone() for w in weights]
    for step in range(steps):
        for m in (mlp.c_fc, mlp.c_proj):
            m.begin_step(step)
        for w in weights:
            w.grad = None
        for k in range(micro):
            g = torch.Generator(device="cuda").manual_seed(100 * step + k)
            x0 = torch.randn(4, 64, d, device="cuda", generator=g, requires_grad=True)
            x = x0 * 1.0  # non-leaf, like ln_2's output
            with torch.autocast("cuda", torch.bfloat16):
                y = mlp(x)
            y.backward(torch.randn(y.shape, device="cuda", generator=g, dtype=y.dtype))
            ys.append((y.detach().clone(), x0.grad.clone()))
        grads.append([w.grad.clone() for w in weights])
        with torch.no_grad():  # a deterministic "optimizer step", then the method's refresh / invalidate
            for i, w in enumerate(weights):
                w.add_(torch.sin(w * (step + 1)) * 1e-2 + i * 1e-3)
        for m, new in zip((mlp.c_fc, mlp.c_proj), idx_new, strict=True):
            if step == refresh_at:
                m.set_mask(new)
            m.invalidate()
    with torch.no_grad():  # the variants share the Parameters: restore the weights for the next one
        for w, v in zip(weights, saved, strict=True):
            w.copy_(v)
    return ys, grads


_NEVER_CAPTURED = pytest.mark.xfail(
    run=False, reason="H100, 2026-11-24: since the 2:4 layers became custom ops the graphed MLP is never captured "
    "(2of4.cuda_graph, experimental); the failed capture also poisons the CUDA generator for every later test of the "
    "process, so this is not run")


@_NEVER_CAPTURED
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cusparselt", "auto"])  # auto: plans timed as graph replays
def test_gpu_graphed_mlp_matches_eager_and_reference(backend):
    if not s.cusparselt_available():
        pytest.skip("no cuSPARSELt-capable GPU")
    s._BROKEN.discard("graph")
    d = 256
    variants = _graph_variants(d, mvue=False, backend=backend)
    idx_new = [s.transposable_search(torch.randn(4 * d, d, device="cuda")),
               s.transposable_search(torch.randn(d, 4 * d, device="cuda"))]
    runs = {k: _run_steps(m, steps=4, micro=3, d=d, refresh_at=1, idx_new=idx_new) for k, m in variants.items()}
    g = variants["graph"]
    assert "graph" not in s._BROKEN and len(g._graphs) == 1, "the graphed MLP was never captured"
    assert g.c_fc.static and g.c_fc.operands(torch.bfloat16) is g.c_fc._static[torch.bfloat16]
    for other in ("eager", "ref"):
        for (ya, dxa), (yb, dxb) in zip(runs["graph"][0], runs[other][0], strict=True):
            assert _rel(ya, yb) < 2e-2 and _rel(dxa, dxb) < 2e-2
        for ga, gb in zip(runs["graph"][1], runs[other][1], strict=True):  # accumulated over micro-batches
            assert all(_rel(a, b) < 2e-2 for a, b in zip(ga, gb, strict=True))


@_NEVER_CAPTURED
@pytest.mark.gpu
def test_gpu_graphed_mvue_draws_change_per_micro_step_and_stay_unbiased():
    if not s.cusparselt_available():
        pytest.skip("no cuSPARSELt-capable GPU")
    s._BROKEN.discard("graph")
    d = 256
    variants = _graph_variants(d, mvue=True)
    mlp, ref = variants["graph"], variants["ref"]
    x = torch.randn(4, 64, d, device="cuda")
    dy = torch.randn(4, 64, d, device="cuda", dtype=torch.bfloat16)

    def mean_dw(m: s.SparseMLP24, n: int) -> torch.Tensor:
        m.c_fc.weight.grad = None
        for _ in range(n):
            with torch.autocast("cuda", torch.bfloat16):
                y = m(x.clone().requires_grad_(True) * 1.0)
            y.backward(dy)
        return m.c_fc.weight.grad / n

    for m in (mlp.c_fc, mlp.c_proj):
        m.begin_step(0)
    mean_dw(mlp, 3)  # two eager warm-up calls, then the capture
    assert "graph" not in s._BROKEN and len(mlp._graphs) == 1
    ref.c_fc.mvue = ref.c_proj.mvue = False
    exact = mean_dw(ref, 1)
    one_a, one_b = mean_dw(mlp, 1), mean_dw(mlp, 1)
    assert not torch.equal(one_a, one_b), "the replayed MVUE seed did not advance"
    assert _rel(mean_dw(mlp, 64), exact) < 0.5 * _rel(one_a, exact)  # unbiased: the noise averages out


def test_stacked_search_equals_per_weight_searches():
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(32, 16, generator=g) for _ in range(3)]
    stacked = s.transposable_search_stacked(ws, "ref")
    assert torch.equal(stacked, torch.cat([s.transposable_search_ref(w) for w in ws]))
    prev = s.transposable_search_stacked([w.flip(0) for w in ws], "ref")
    per = [s.flipped_entries(p, c) for p, c in zip(prev.chunk(3), stacked.chunk(3), strict=True)]
    assert torch.equal(s.flipped_entries(prev, stacked, 3), torch.stack(per))
    with pytest.raises(ValueError, match="one shape"):
        s.transposable_search_stacked([ws[0], ws[0].t()])
