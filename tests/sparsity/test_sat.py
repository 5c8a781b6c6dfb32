"""SAT (sparsity/sat.py) against sat.md §8: schedule, selection, metrics, optimizer modes, dense path, resume."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from kernels.sliced_attention import head_slices
from kernels.sliced_mlp import positions
from model.gpt import GPT, GPTConfig
from sparsity.sat import SAT, SATConfig, _observe_attn, _observe_mlp, kept_count, omission_rate, select_kept
from tests.helpers import method_step

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, bias=True)


def _setup(seed=0, total_steps=8, **knobs):
    torch.manual_seed(seed)
    model_cfg = GPTConfig(**TINY)
    model = GPT(model_cfg)
    knobs = dict(dict(warmup_frac=0.0, channel_multiple=1, subsample=1, omit_heads=True), **knobs)
    method = SAT(SATConfig(**knobs), model_cfg, total_steps, seed=seed)
    model = method.attach(model)
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-2, betas=(0.9, 0.95), device_type="cpu")
    return model, method, opt


def _batch(step, micro):
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randint(0, TINY["vocab_size"], (4, TINY["block_size"]), generator=g)
    return x, torch.roll(x, -1, dims=1)


def _run(model, method, opt, steps, micro=2):
    """Drive the hooks in train.py's order; returns the losses."""
    out = []
    for step in steps:
        losses, _ = method_step(model, method, opt, step, [_batch(step, m) for m in range(micro)])
        out.append(sum(loss / micro for loss in losses))
    return out


@pytest.mark.parametrize(
    "knob,value",
    [("metric", "l1"), ("aggregation", "sum"), ("variant", "x"), ("norm", "l2"), ("selection", "greedy"),
     ("schedule", "cosine"), ("optimizer_mode", "sgd"), ("temperature", 0.0), ("omission_rate", 1.0),
     ("lors_frac", 1.0), ("warmup_frac", -0.1), ("lors_rungs", 0), ("subsample", 0), ("channel_multiple", 0)],
)
def test_bad_knobs_name_the_knob(knob, value):
    with pytest.raises(ValueError, match=f"sat.{knob}"):
        SATConfig(**{knob: value})


def test_lors_values_at_every_rung():
    cfg, S = SATConfig(omission_rate=0.5, lors_frac=0.5, lors_rungs=4, warmup_frac=0.0), 1000
    expect = {0: 0.5, 499: 0.5, 500: 0.375, 624: 0.375, 625: 0.25, 626: 0.25, 749: 0.25, 750: 0.125, 751: 0.125,
              874: 0.125, 875: 0.0, 876: 0.0, 999: 0.0}
    assert {t: omission_rate(cfg, t, S) for t in expect} == expect
    rates = [omission_rate(cfg, t, S) for t in range(S)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_warmup_and_other_schedules():
    S = 100
    lors = SATConfig(warmup_frac=0.2, lors_frac=0.5, lors_rungs=2, omission_rate=0.4)
    assert omission_rate(lors, 19, S) == 0.0 and omission_rate(lors, 20, S) == 0.4  # dense warm-up, then r0
    assert omission_rate(lors, 59, S) == 0.4 and omission_rate(lors, 60, S) == pytest.approx(0.2)
    assert omission_rate(lors, 99, S) == 0.0
    const = SATConfig(schedule="constant", warmup_frac=0.0, omission_rate=0.3)
    assert {omission_rate(const, t, S) for t in range(S)} == {0.3}
    lin = SATConfig(schedule="linear", warmup_frac=0.0, omission_rate=0.5)
    rates = [omission_rate(lin, t, S) for t in range(S)]
    assert rates[0] == 0.5 and rates[50] == pytest.approx(0.25) and all(a > b for a, b in zip(rates, rates[1:]))


def test_kept_count_rounding():
    assert kept_count(3072, 0.5, 128) == 1536
    assert kept_count(3072, 0.4, 128) == 1920  # 3072 - 1229 = 1843 -> up to 15·128
    assert kept_count(256, 0.1, 128) == 256  # clamps to N
    assert kept_count(12, 0.5) == 6 and kept_count(2, 0.99) == 1  # heads: at least one


def test_selection_returns_k_unique_sorted_and_topk_limit():
    scores = torch.rand(50)
    g = torch.Generator().manual_seed(0)
    idx = select_kept(scores, 20, "sample", 0.05, "max", g)
    assert idx.numel() == 20 and idx.unique().numel() == 20 and torch.equal(idx, idx.sort().values)
    topk = scores.topk(20).indices.sort().values
    assert torch.equal(select_kept(scores, 20, "topk"), topk)
    for norm in ("max", "minmax", "sum"):
        assert torch.equal(select_kept(scores, 20, "sample", 1e-8, norm, g), topk)


def test_high_temperature_is_uniform_chi_square():
    n, k, draws = 10, 4, 4000
    scores = torch.linspace(0.1, 1.0, n)
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(n)
    for _ in range(draws):
        counts[select_kept(scores, k, "sample", 1e6, "max", g)] += 1
    expected = draws * k / n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 27.9  # chi-square(9 dof) 0.999 quantile


def test_gumbel_topk_matches_multinomial_without_replacement():
    n, k, draws, T = 8, 3, 10_000, 0.5
    scores = torch.tensor([1.0, 0.9, 0.7, 0.6, 0.5, 0.3, 0.2, 0.1])
    g = torch.Generator().manual_seed(2)
    gumbel = torch.zeros(n)
    for _ in range(draws):
        gumbel[select_kept(scores, k, "sample", T, "max", g)] += 1
    p = torch.softmax(scores / scores.max() / T, 0)
    picks = torch.multinomial(p.expand(draws, n), k, replacement=False, generator=g)
    multi = torch.zeros(n).index_add_(0, picks.flatten(), torch.ones(picks.numel()))
    f1, f2 = gumbel / draws, multi / draws
    sigma = torch.sqrt(f2 * (1 - f2) / draws * 2)
    assert ((f1 - f2).abs() <= 3 * sigma + 1e-3).all(), (f1, f2)


def test_metrics_on_a_hand_case():
    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=2, block_size=4, vocab_size=8, bias=True)
    model = GPT(cfg)
    with torch.no_grad():
        fc = model.transformer.h[0].mlp.c_fc
        fc.weight.zero_()
        fc.bias.zero_()
        fc.weight[:3] = torch.tensor([[1.0, -2.0], [0.0, 3.0], [-1.0, 0.0]])
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (B=1, T=2, d=2)
    gelu = lambda v: F.gelu(torch.tensor(v), approximate="tanh").item()
    h = [[1.0, 0.0, -1.0], [-4.0, 6.0, 0.0]]  # x W1ᵀ for the three hand rows
    expected = {
        "magnitude": [3.0, 3.0, 1.0],
        "wanda": [1.0 * 1 + 2 * 2, 3.0 * 2, 1.0 * 1],  # ‖X_:,0‖ = 1, ‖X_:,1‖ = 2
        "maxip": [math.hypot(gelu(h[0][i]), gelu(h[1][i])) for i in range(3)],
    }
    for metric, want in expected.items():
        method = SAT(SATConfig(metric=metric, warmup_frac=0.0, omit_heads=True), cfg, 10)
        m = method.attach(GPT(cfg))
        m.load_state_dict(model.state_dict())
        layer = method.layers[1]
        assert layer.is_mlp
        _observe_mlp(layer.module, x, metric, "l2", 1)
        torch.testing.assert_close(method._scores(layer)[:3], torch.tensor(want), rtol=1e-5, atol=1e-6)
    # maxip of a head is ‖o_h‖ over tokens and head dims: one head, one token -> o = v
    method = SAT(SATConfig(metric="maxip", aggregation="max", warmup_frac=0.0, omit_heads=True), cfg, 10)
    m = method.attach(GPT(cfg))
    attn = method.layers[0].module
    xs = torch.tensor([[[3.0, -4.0]]])
    _observe_attn(attn, xs, "maxip", "max", 1)
    v = attn.c_attn(xs)[0, 0, 4:]
    assert method._scores(method.layers[0]).item() == pytest.approx(v.abs().max().item())


def test_rate_zero_is_bit_identical_to_dense():
    torch.manual_seed(0)
    dense = GPT(GPTConfig(**TINY))
    model, method, _ = _setup(omission_rate=0.5, warmup_frac=0.5, total_steps=10)
    model.load_state_dict(dense.state_dict())
    assert model.state_dict().keys() == dense.state_dict().keys()
    method.on_step_start(0)  # inside the dense warm-up
    assert method.metrics()["sat/omission_rate"] == 0.0
    for m in (dense, model):
        m(*_batch(0, 0))[1].backward()
    for (n, a), b in zip(dense.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), n
    assert torch.equal(dense(*_batch(1, 0))[1], model(*_batch(1, 0))[1])


@pytest.mark.parametrize("variant", ["predict", "observe"])
def test_sparse_step_full_grads_and_profile(variant):
    model, method, opt = _setup(omission_rate=0.5, variant=variant)
    _run(model, method, opt, range(2))  # predict: step 0 runs dense to observe, step 1 is sparse
    assert method.rate == 0.5
    method.on_step_start(2)
    model(*_batch(2, 0))[1].backward()
    mlp = model.transformer.h[0].mlp
    kept = mlp.kept.cpu()
    assert kept.numel() == 64 and all(p.grad is not None for p in model.parameters())
    omitted = torch.ones(128, dtype=torch.bool)
    omitted[kept] = False
    assert (mlp.c_fc.weight.grad[omitted] == 0).all() and (mlp.c_proj.weight.grad[:, omitted] == 0).all()
    assert (mlp.c_fc.weight.grad[~omitted] != 0).any()
    attn = model.transformer.h[0].attn
    assert attn.kept.numel() == 1 and (attn.c_proj.weight.grad[:, attn.cols] != 0).any()
    prof = method.flop_profile(2)
    assert prof.linear["transformer.h.0.mlp.c_proj"].total == pytest.approx(1.5)
    assert prof.attn_density(1) >= 0.5
    metrics = method.metrics()
    assert metrics["sat/kept/h.1.mlp"] == 64 and metrics["sat/kept/h.1.attn"] == 1
    assert 0 <= metrics["sat/overlap/mlp"] <= 1 and 0 <= metrics["sat/topk_overlap/mlp"] <= 1


def test_observe_variant_selects_per_micro_batch():
    model, method, opt = _setup(omission_rate=0.5, variant="observe")
    method.on_step_start(0)
    sets = []
    for m in range(3):
        model(*_batch(0, m))[1].backward()
        sets.append(model.transformer.h[0].mlp.kept.cpu().clone())
    assert method.micro["h.0.mlp"] == 3 and not all(torch.equal(sets[0], s) for s in sets[1:])


def _snapshot(model, opt):
    return {n: p.detach().clone() for n, p in model.named_parameters()}, {
        n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}


def test_optimizer_modes():
    for mode in ("lazy", "zero_grad"):
        model, method, opt = _setup(omission_rate=0.5, optimizer_mode=mode, metric="magnitude")
        _run(model, method, opt, range(2))  # optimizer state exists for every parameter now
        method.on_step_start(2)
        model(*_batch(2, 0))[1].backward()
        params, states = _snapshot(model, opt)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        method.after_backward(2)
        assert method.before_optimizer_step(2, opt)
        opt.step()
        method.after_optimizer_step(2, opt)
        mlp = model.transformer.h[1].mlp
        om = torch.ones(128, dtype=torch.bool)
        om[mlp.kept.cpu()] = False
        name = "transformer.h.1.mlp.c_fc.weight"
        new_state = opt.state[mlp.c_fc.weight]
        if mode == "lazy":
            assert torch.equal(mlp.c_fc.weight[om], params[name][om])
            assert torch.equal(mlp.c_proj.weight[:, om], params["transformer.h.1.mlp.c_proj.weight"][:, om])
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(new_state[key][om], states[name][key][om])
            assert not torch.equal(mlp.c_fc.weight[~om], params[name][~om])
        else:  # the same as a plain AdamW fed the (zero-on-omitted) grads
            ref = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
            ref_opt = GPT.configure_optimizer(_FakeGPT(ref), 0.1, 1e-2, (0.9, 0.95), "cpu")
            for n, p in ref.items():
                p.grad = grads[n]
                ref_opt.state[p] = {k: v.clone() for k, v in states[n].items()}
            ref_opt.step()
            for n, p in model.named_parameters():
                assert torch.equal(p, ref[n]), n
            assert not torch.equal(mlp.c_fc.weight[om], params[name][om])  # decayed and moved by stale moments


class _FakeGPT(torch.nn.Module):
    """Parameters in the same order as the model, for GPT.configure_optimizer's grouping."""

    def __init__(self, params):
        super().__init__()
        self._list = torch.nn.ParameterList(params.values())


@pytest.mark.parametrize("knobs", [dict(metric="maxip"), dict(metric="wanda", selection="topk", optimizer_mode="lazy")])
def test_resume_is_bit_identical(knobs):
    steps, cut = 6, 3
    model, method, opt = _setup(omission_rate=0.5, total_steps=steps, lors_frac=0.5, lors_rungs=2, **knobs)
    full = _run(model, method, opt, range(steps))
    final = {n: p.detach().clone() for n, p in model.named_parameters()}

    model, method, opt = _setup(omission_rate=0.5, total_steps=steps, lors_frac=0.5, lors_rungs=2, **knobs)
    first = _run(model, method, opt, range(cut))
    ckpt = dict(model=model.state_dict(), opt=opt.state_dict(), method=method.state_dict())
    model2, method2, opt2 = _setup(total_steps=steps, omission_rate=0.5, lors_frac=0.5, lors_rungs=2, **knobs)
    model2.load_state_dict(ckpt["model"])
    method2.load_state_dict(ckpt["method"])
    opt2.load_state_dict(ckpt["opt"])
    rest = _run(model2, method2, opt2, range(cut, steps))
    assert first + rest == full
    for n, p in model2.named_parameters():
        assert torch.equal(p, final[n]), n


def test_batched_selection_rows_are_independent():
    scores = torch.rand(3, 40)
    scores[1] = 0.0  # a degenerate row normalizes to uniform instead of failing
    topk = select_kept(scores, 10, "topk")
    for i in (0, 2):
        assert torch.equal(topk[i], select_kept(scores[i], 10, "topk"))
    drawn = select_kept(scores, 10, "sample", 0.05, "max", torch.Generator().manual_seed(0))
    assert drawn.shape == (3, 10) and all(row.unique().numel() == 10 for row in drawn)
    assert torch.equal(drawn, drawn.sort(dim=1).values)


def test_kept_sets_live_in_one_buffer_rewritten_in_place():
    """One topk per layer kind selects for every layer; modules hold rows of one buffer, so within a rung the
    tensors torch.compile sees keep their identity while their contents change."""
    model, method, opt = _setup(omission_rate=0.5, metric="magnitude", selection="sample", temperature=10.0)
    _run(model, method, opt, range(1))
    mlps = [model.transformer.h[i].mlp for i in range(2)]
    attn = model.transformer.h[1].attn
    before = [m.kept for m in mlps], (attn.kept, attn.rows, attn.cols), [m.pos for m in mlps]
    snap = [m.kept.clone() for m in mlps]
    _run(model, method, opt, range(1, 3))
    assert all(m.kept is b for m, b in zip(mlps, before[0], strict=True))
    # the gradient expand's inverse map is rewritten with the kept sets: same tensors, the new sets' positions
    assert all(m.pos is b and torch.equal(m.pos, positions(m.kept, m.c_fc.out_features))
               for m, b in zip(mlps, before[2], strict=True))
    assert (attn.kept, attn.rows, attn.cols) == before[1]
    assert not all(torch.equal(m.kept, s) for m, s in zip(mlps, snap, strict=True))  # resampled each step
    group = method.groups[True]
    assert mlps[1].kept.data_ptr() == group.kept[1].data_ptr()
    assert torch.equal(method.kept["h.1.mlp"], mlps[1].kept)
    rows, cols = head_slices(attn.kept, attn.n_head, attn.head_dim)
    assert torch.equal(attn.rows, rows) and torch.equal(attn.cols, cols)


@pytest.mark.gpu
def test_cuda_selection_never_syncs_the_host():
    torch.manual_seed(0)
    cfg = GPTConfig(**TINY)
    method = SAT(SATConfig(omission_rate=0.5, warmup_frac=0.0, channel_multiple=1, subsample=1, omit_heads=True),
                 cfg, 8)
    model = method.attach(GPT(cfg).cuda())
    for step in range(3):
        torch.cuda.set_sync_debug_mode("error" if step > 0 else "default")  # step 0 runs dense to observe
        try:
            method.on_step_start(step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        model(*(t.cuda() for t in _batch(step, 0)))[1].backward()
    mlp = model.transformer.h[0].mlp
    assert mlp.kept.is_cuda and mlp.kept.numel() == 64 and mlp.kept.unique().numel() == 64


@pytest.mark.slow  # ~10 s each on 2 CPU cores
@pytest.mark.parametrize("variant", ["predict", "observe"])
def test_compiled_step_recompiles_only_when_the_rung_changes(variant):
    """torch.compile sees SAT's per-step state (kept sets rewritten in place, hooks bound once) without a graph break
    (predict) and without recompiling inside a rung; observe breaks once per sliced layer by design (its selection
    runs inside the forward). aot_eager: dynamo's guards and AOTAutograd's tracing, without inductor's codegen."""
    torch._dynamo.reset()
    counters.clear()
    model, method, opt = _setup(omission_rate=0.5, total_steps=12, warmup_frac=0.25, lors_frac=0.5, lors_rungs=2,
                                variant=variant)
    compiled = torch.compile(model, backend="aot_eager")
    graphs, rates = [], []
    for step in range(12):  # dense 0-2 (2 observes for 3), r0 3-7, r0/2 8-9, dense 10-11
        method_step(compiled, method, opt, step, [_batch(step, m) for m in range(2)])
        graphs.append(counters["stats"]["unique_graphs"])
        rates.append(method.rate)
    torch._dynamo.reset()
    assert rates[3:8] == [0.5] * 5 and rates[8:] == [0.25, 0.25, 0.0, 0.0]
    assert graphs[3] == graphs[7] and graphs[10] == graphs[11]  # each rung compiles on its first step only
    if variant == "predict":
        assert graphs[9] == graphs[11]  # the dense last rung reuses the warm-up's graph
        assert sum(counters["graph_break"].values()) == 0
