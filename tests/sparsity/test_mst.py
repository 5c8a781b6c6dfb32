"""MST, RigL and static sparse training (sparsity/mst.py) and the FLOP matcher (tools/flop_match.py); mst.md §9."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import gpt as gpt_module
from model.flops import FlopProfile, LinearCost, dense_flops_per_token, train_flops_per_token
from model.gpt import GPT, GPTConfig
from sparsity.mst import (
    MST,
    DSTSchedule,
    MSTConfig,
    RigL,
    RigLConfig,
    Static,
    StaticConfig,
    er_densities,
    growth_counts,
    layer_counts,
    mixed_growing,
    plan_profile,
    sparse_shapes,
)
from tests.helpers import method_step
from tools.flop_match import load_config, match_dense, method_total_flops, mst_total_flops, run_total_flops

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = GPTConfig(preset="tiny", vocab_size=128, block_size=16)
GPT2 = GPTConfig(preset="gpt2")
NO_HSA = dict(hsa_end=0.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: intra-op threads only contend (2 shared cores), slowing these tests by 10x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(step: int, micro: int, cfg: GPTConfig = TINY) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=g)


def build(method_cls, cfg, total: int, seed: int = 0, model_cfg: GPTConfig = TINY):
    torch.manual_seed(0)
    model = GPT(model_cfg)
    method = method_cls(cfg, model_cfg, total, seed)
    model = method.attach(model)
    opt = method.configure_optimizer(model, weight_decay=0.1, lr=1e-2, betas=(0.9, 0.95), device_type="cpu")
    return model, method, opt


def train(model, method, opt, start: int, stop: int, clip: float = 1.0, check=None, accum: int = 1):
    """The trainer's hook order, on CPU in fp32."""
    for step in range(start, stop):
        micro = [(batch(step, m), batch(step, m)) for m in range(accum)]
        method_step(model, method, opt, step, micro, clip, check)


# --------------------------------------------------------------------------------------------------------------
# §9.1 ER allocation


def _sparsities(shapes, s):
    return {k: 1 - d for k, d in er_densities(shapes, s).items()}


def test_er_gpt2_small_with_lm_head():
    shapes = sparse_shapes(GPT2, MSTConfig())
    expected = {0.9: (0.8919, 0.8379, 0.8987, 0.8987, 0.9177), 0.5: (0.4597, 0.1896, 0.4935, 0.4935, 0.5886)}
    layers = (
        "transformer.h.5.attn.c_attn",
        "transformer.h.5.attn.c_proj",
        "transformer.h.5.mlp.c_fc",
        "transformer.h.5.mlp.c_proj",
        "lm_head",
    )
    for s, values in expected.items():
        got = _sparsities(shapes, s)
        assert [round(got[k], 4) for k in layers] == list(values)
        n = {k: o * i for k, (o, i) in shapes.items()}
        assert sum(got[k] * n[k] for k in n) / sum(n.values()) == pytest.approx(s, abs=1e-9)
    assert set(_sparsities(shapes, 0.0).values()) == {0.0}


def test_er_gpt2_small_without_lm_head():
    shapes = sparse_shapes(GPT2, MSTConfig(include_lm_head=False))
    assert "lm_head" not in shapes
    got = _sparsities(shapes, 0.9)
    layers = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert [round(got[f"transformer.h.0.{k}"], 5) for k in layers] == [0.9, 0.85, 0.90625, 0.90625]


def test_er_resolves_epsilon_when_a_layer_saturates():
    shapes = {"thin": (4, 4), "wide": (1000, 1000)}
    dens = er_densities(shapes, 0.5)
    assert dens["thin"] == 1.0  # ε·raw would exceed 1: dense, and ε re-solved for the rest
    assert (16 + dens["wide"] * 1e6) / (16 + 1e6) == pytest.approx(0.5)
    counts = layer_counts(shapes, {"thin": 16, "wide": 10**6}, 0.999999, "er")
    assert min(counts.values()) >= 1  # per-layer sparsity clamped below 1 (§8)


# --------------------------------------------------------------------------------------------------------------
# §2 schedule, §3 drop fraction, §9.6 update steps


def test_schedule_values_at_phase_boundaries():
    cfg = MSTConfig(sparsity=0.9, warmup_frac=0.1, restore_frac=0.2, **NO_HSA)
    s = DSTSchedule(cfg, 1000)
    assert s.stair == 10  # scale-aware: 1000 steps // 100 stairs
    assert s.sparsity(0) == 0.0
    assert s.sparsity(50) == pytest.approx(0.9 * (1 - 0.5**3))  # cubic ramp at mid warm-up
    assert s.sparsity(100) == s.sparsity(500) == s.sparsity(800) == 0.9
    assert s.sparsity(900) == pytest.approx(0.9 * (1 - 0.5**3))  # restoration mirrors the warm-up
    assert s.sparsity(1000) == 0.0
    assert [s.phase(t) for t in (0, 99, 100, 799, 800, 999)] == [0, 0, 1, 1, 2, 2]
    assert s.target(0) == s.target(9) == 0.0 and s.target(57) == s.sparsity(50)  # staircase
    lin = DSTSchedule(MSTConfig(ramp="linear", warmup_frac=0.1, restore_frac=0.1, **NO_HSA), 1000)
    assert lin.sparsity(50) == pytest.approx(0.45) and lin.sparsity(950) == pytest.approx(0.45)
    assert DSTSchedule(MSTConfig(), 600_000).stair == 1000  # [C] at full length
    rigl = DSTSchedule(RigLConfig(), 1000)
    assert {rigl.target(t) for t in range(1000)} == {0.8} and {rigl.phase(t) for t in range(1000)} == {1}


def test_zeta_stepwise_phase_start_mid_end():
    cfg = MSTConfig(zeta=0.3, zeta_schedule="stepwise", warmup_frac=0.1, restore_frac=0.2, **NO_HSA)
    s = DSTSchedule(cfg, 1000)
    for start, end in ((0, 100), (100, 800), (800, 1000)):
        assert s.zeta(start) == pytest.approx(0.3)
        assert s.zeta((start + end) / 2) == pytest.approx(0.15)
        assert s.zeta(end - 1e-6) == pytest.approx(0.0, abs=1e-9)
    cos = DSTSchedule(RigLConfig(zeta=0.3), 1000)
    assert (cos.zeta(0), cos.zeta(500)) == (pytest.approx(0.3), pytest.approx(0.15))


def test_update_steps():
    s = DSTSchedule(RigLConfig(delta_t=100), 450)
    assert [t for t in range(450) if s.is_update(t)] == [100, 200, 300, 400]
    s = DSTSchedule(RigLConfig(delta_t=100), 400)
    assert [t for t in range(400) if s.is_update(t)] == [100, 200, 300]
    assert not any(DSTSchedule(StaticConfig(), 400).is_update(t) for t in range(400))


def test_config_validation_names_the_knob():
    with pytest.raises(ValueError, match=r"mst\.sparsity must be in \[0, 1\)"):
        MSTConfig(sparsity=1.0)
    with pytest.raises(ValueError, match=r"static\.delta_t must be > 0"):
        StaticConfig(warmup_frac=0.1)
    with pytest.raises(ValueError, match=r"rigl\.granularity must be one of"):
        RigLConfig(granularity="row")


# --------------------------------------------------------------------------------------------------------------
# §9.4 counts, §9.5 Mixed-Growing rules


def test_growth_counts_integer_delta():
    assert growth_counts(1000, 1000, 0.3, 0.25) == (300, 300, 225, 75)  # S*=0.9 of N=10,000
    assert growth_counts(1000, 500, 0.3, 0.25)[:2] == (500, 0)  # S*=0.95: prune only
    assert growth_counts(1000, 500, 0.6, 0.25)[:2] == (600, 100)
    assert growth_counts(1000, 2000, 0.3, 0.25)[:2] == (300, 1300)  # S*=0.8: n_on becomes 2,000
    n = 10_000
    assert [round((1 - s) * n) for s in (0.9, 0.95, 0.8)] == [1000, 500, 2000]  # the code's int() gives 499, -999


def _layer(n=400, n_on=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:n_on]] = True
    w = torch.randn(n, generator=g) * mask
    grad = torch.randn(n, generator=g)
    return mask, w, grad


@pytest.mark.parametrize("n_target", [100, 60, 150])
def test_mixed_growing_rules(n_target):
    mask, w, grad = _layer()
    gen = torch.Generator().manual_seed(1)
    new, (n_prune, n_grow, n_grad, n_rand) = mixed_growing(mask, w.abs(), grad.abs(), n_target, 0.3, 0.25, gen)
    assert int(new.sum()) == n_target == 100 - n_prune + n_grow
    if n_target == 100:
        assert n_prune == n_grow == 30  # constant target: prune = grow
    assert (n_grad, n_rand) == (math.floor(n_grow * 0.75), n_grow - math.floor(n_grow * 0.75))
    # Keep set: the top (n_on - n_prune) active entries by |W|.
    active = mask.nonzero().flatten().tolist()
    keep = set(sorted(active, key=lambda i: -abs(w[i].item()))[: 100 - n_prune])
    assert keep <= set(new.nonzero().flatten().tolist())
    grown = set(new.nonzero().flatten().tolist()) - keep
    assert len(grown) == n_grow and not grown & keep
    # Gradient share: the top-n_grad |G| among the candidates (complement of K) are all grown.
    cands = [i for i in range(400) if i not in keep]
    top_grad = set(sorted(cands, key=lambda i: -abs(grad[i].item()))[:n_grad])
    assert top_grad <= grown


def test_r0_grows_only_top_gradient_entries():
    mask, w, grad = _layer(n=300, n_on=80, seed=3)
    new, (n_prune, n_grow, _, n_rand) = mixed_growing(mask, w.abs(), grad.abs(), 80, 0.5, 0.0, torch.Generator())
    assert n_rand == 0 and n_grow == 40
    keep = torch.where(mask, w.abs(), torch.tensor(-1.0)).argsort(descending=True)[: 80 - n_prune]
    cand_scores = grad.abs().clone()
    cand_scores[keep] = -1.0
    expected = set(keep.tolist()) | set(cand_scores.argsort(descending=True)[:n_grow].tolist())
    assert set(new.nonzero().flatten().tolist()) == expected


def test_batched_mixed_growing_rows_follow_the_one_layer_rules():
    layers = [_layer(seed=s) for s in range(3)]
    mask, w, grad = (torch.stack(t) for t in zip(*layers, strict=True))
    gen = torch.Generator().manual_seed(1)
    new, counts = mixed_growing(mask, w.abs(), grad.abs(), 70, 0.3, 0.0, gen)  # R = 0: nothing random
    for row, (m, wl, gl) in zip(new, layers, strict=True):
        one, c = mixed_growing(m, wl.abs(), gl.abs(), 70, 0.3, 0.0, torch.Generator())
        assert torch.equal(row, one) and c == counts
    new, (_, n_grow, _, n_rand) = mixed_growing(mask, w.abs(), grad.abs(), 120, 0.3, 0.25, gen)
    assert new.sum(1).tolist() == [120] * 3 and n_rand > 0
    for row, (m, wl, _) in zip(new, layers, strict=True):
        keep = torch.where(m, wl.abs(), torch.tensor(-1.0)).argsort(descending=True)[: 100 - (n_grow - 20)]
        assert row[keep].all()
    mask[0, mask[0].nonzero()[0]] = False
    with pytest.raises(ValueError, match="equal active counts"):
        mixed_growing(mask, w.abs(), grad.abs(), 70, 0.3, 0.0, gen)


@pytest.mark.parametrize("granularity", ["element", "block"])
def test_update_batches_same_shape_layers_exactly(granularity):
    """_update runs one Mixed-Growing per group of same-shape layers; without random growth (R = 0) every layer's
    new mask equals the one-layer update on its own scores."""
    block = dict(granularity="block", block_size=32) if granularity == "block" else {}
    cfg = MSTConfig(delta_t=3, warmup_frac=0.0, restore_frac=0.0, sparsity=0.7, random_frac=0.0, hsa_end=0.0,
                    block_dense_above=1.0, **block)
    model, method, opt = build(MST, cfg, 12)
    train(model, method, opt, 0, 3)
    step = 3
    method.on_step_start(step)
    _, loss = model(batch(step, 0), batch(step, 0))
    loss.backward()
    old, n_on = dict(method.unit_masks), dict(method.n_on)
    counts = method._counts(method.schedule.target(step))
    expected = {}
    for name, w in zip(method.modules, method.weights, strict=True):
        expected[name], _ = mixed_growing(old[name], method._scores(name, w), method._scores(name, w.grad),
                                          counts[name], method.schedule.zeta(step), 0.0, torch.Generator(), n_on[name])
    method.after_backward(step)
    assert len({method.shapes[k] for k in method.modules}) < len(method.modules)  # some layers were batched
    for name in method.modules:
        assert torch.equal(method.unit_masks[name], expected[name]), name
    assert method.metrics()["mst/flip_rate"] > 0


# --------------------------------------------------------------------------------------------------------------
# The method through the trainer's hooks


def _invariant_checker(method, counts_at, log):
    def check(where, step, stepped=None):
        if where == "step_start":
            return
        for name, w, m in zip(method.modules, method.weights, method.masks, strict=True):
            off = m == 0
            if where == "after_backward" and not method.schedule.is_update(step):
                assert (w.grad[off] == 0).all(), f"{name}: masked grad not zero at step {step}"
            if where == "after_optimizer_step":
                assert (w.detach()[off] == 0).all(), f"{name}: masked weight not zero after step {step}"
        if where == "after_optimizer_step":
            assert stepped == (not method.schedule.is_update(step))
            if method.schedule.is_update(step):
                assert method.n_on == counts_at(step)
            log.append(method.metrics())

    return check


def test_mst_run_invariants_targets_and_skipped_steps():
    cfg = MSTConfig(delta_t=3, warmup_frac=0.3, restore_frac=0.3, **NO_HSA)
    model, method, opt = build(MST, cfg, 30)
    counts_at = lambda step: method._counts(method.schedule.target(step))
    log: list[dict[str, float]] = []
    snap: dict[str, dict[str, torch.Tensor]] = {}

    def check(where, step, stepped=None):
        if where == "step_start":
            snap["mask"] = {k: m.clone() for k, m in method.unit_masks.items()}
            snap["w"] = {k: w.detach().clone() for k, w in zip(method.modules, method.weights, strict=True)}
            return
        inner(where, step, stepped)
        if where == "after_optimizer_step" and method.schedule.is_update(step):
            for name, w in zip(method.modules, method.weights, strict=True):
                old, new = snap["mask"][name].view_as(w), method.unit_masks[name].view_as(w)
                # Skipped step: weights only lose pruned entries; new entries are exactly 0, regrown keep value.
                assert torch.equal(w.detach(), snap["w"][name] * (old & new))

    inner = _invariant_checker(method, counts_at, log)
    train(model, method, opt, 0, 30, clip=0.05, check=check)
    updates = [m for m in log if "mst/flip_rate" in m]
    assert len(updates) == 9  # steps 3, 6, ..., 27
    for m in updates:
        assert m["mst/grown_grad"] + m["mst/grown_random"] == m["mst/grown"]
        assert abs(m["mst/grown_random"] - 0.25 * m["mst/grown"]) <= len(method.modules)
    held = [b for a, b in zip(updates, updates[1:]) if a["mst/sparsity"] == b["mst/sparsity"]]
    assert held and all(m["mst/pruned"] == m["mst/grown"] > 0 for m in held)  # unchanged target: prune = grow
    assert {m["mst/phase"] for m in log} == {0.0, 1.0, 2.0}
    assert max(m["mst/sparsity"] for m in log) == pytest.approx(0.9, abs=1e-3)
    per_layer = [k for k in log[-1] if k.startswith("mst/sparsity/")]
    assert "mst/sparsity/h.0.attn.c_attn" in per_layer and "mst/sparsity/lm_head" in per_layer


def test_rigl_and_static_keep_density():
    for cls, cfg in ((RigL, RigLConfig(delta_t=3)), (Static, StaticConfig())):
        model, method, opt = build(cls, cfg, 10)
        start = {k: m.clone() for k, m in method.unit_masks.items()}
        target = method._counts(cfg.sparsity)
        log: list[dict[str, float]] = []
        train(model, method, opt, 0, 10, check=_invariant_checker(method, lambda s, t=target: t, log))
        assert method.n_on == target
        changed = any(not torch.equal(start[k], method.unit_masks[k]) for k in start)
        assert changed == (cls is RigL)
        assert all(m[f"{cls.name}/grown_random"] == 0 for m in log if f"{cls.name}/grown" in m)


def test_masks_are_not_model_state_and_wte_tie_survives():
    model, method, _ = build(RigL, RigLConfig(), 10)
    assert set(model.state_dict()) == set(GPT(TINY).state_dict())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert (model.transformer.wte.weight[method.masks[-1] == 0] == 0).all()  # the tied embedding is sparse too
    assert method.masks[0].dtype == model.lm_head.weight.dtype


def test_zero_grown_moments():
    cfg = RigLConfig(delta_t=3, zero_grown_moments=True)
    model, method, opt = build(RigL, cfg, 4)
    train(model, method, opt, 0, 3)
    old = {k: m.clone() for k, m in method.unit_masks.items()}
    train(model, method, opt, 3, 4)
    for name, w in zip(method.modules, method.weights, strict=True):
        grown = (method.unit_masks[name] & ~old[name]).view_as(w)
        for key in ("exp_avg", "exp_avg_sq"):
            assert (opt.state[w][key][grown] == 0).all()


@pytest.mark.parametrize("granularity", ["element", "block"])
def test_zero_pruned_moments_keeps_pruned_weights_zero_without_remasking(granularity):
    """With exp_avg zeroed at pruned entries, AdamW itself leaves every off-mask weight exactly 0 (weight, gradient
    and exp_avg all 0), so after_optimizer_step re-masks nothing. Off (the code's way), stale exp_avg moves them,
    which is why that mode re-masks: the check below fails there."""
    block = dict(granularity="block", block_size=32) if granularity == "block" else {}

    def off_mask_after_opt(zero_pruned):
        cfg = MSTConfig(delta_t=3, warmup_frac=0.3, restore_frac=0.0, sparsity=0.6, hsa_end=0.0,
                        block_dense_above=1.0, zero_pruned_moments=zero_pruned, **block)
        model, method, opt = build(MST, cfg, 12)
        assert method.zero_pruned == zero_pruned
        worst = []
        real_step = opt.step

        def step_and_check(*a, **k):
            real_step(*a, **k)
            pairs = zip(method.weights, method.masks, strict=True)
            worst.append(max((w.detach()[m == 0].abs().max().item() for w, m in pairs if (m == 0).any()),
                             default=0.0))
        opt.step = step_and_check
        train(model, method, opt, 0, 12)
        return worst, method

    worst, method = off_mask_after_opt(True)
    assert len(worst) == 9 and max(worst) == 0.0  # 12 steps, updates at 3, 6, 9 skip the optimizer
    assert max(off_mask_after_opt(False)[0]) > 0
    if granularity == "block":
        assert MSTConfig(granularity="block").zero_pruned_moments is None and method.zero_pruned
    assert not MST(MSTConfig(), TINY, 10, 0).zero_pruned  # element default: as the code


def test_block_adamw_trains_as_plain_adamw():
    """Block MST with AdamW over the nonzero blocks only (mst.block_adamw) and with torch's AdamW over everything: the
    same weights and masks through warm-up ramp, updates that prune and regrow blocks, and the restoration (up to
    the rounding of β2^n against n products)."""
    def run(block_adamw):
        cfg = MSTConfig(delta_t=3, warmup_frac=0.25, restore_frac=0.25, sparsity=0.7, hsa_end=0.0,
                        granularity="block", block_size=32, block_dense_above=1.0, block_adamw=block_adamw)
        model, method, opt = build(MST, cfg, 24, seed=3)
        assert (type(opt).__name__ == "BlockAdamW") == block_adamw
        train(model, method, opt, 0, 24)
        return model, method

    (fast, fast_m), (ref, ref_m) = run(True), run(False)
    assert all(torch.equal(fast_m.unit_masks[k], ref_m.unit_masks[k]) for k in ref_m.unit_masks)
    for (k, a), b in zip(fast.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match="block_adamw needs"):
        MSTConfig(block_adamw=True)  # element granularity
    with pytest.raises(ValueError, match="block_adamw needs"):
        MSTConfig(granularity="block", zero_pruned_moments=False, block_adamw=True)
    assert not MST(MSTConfig(granularity="block"), TINY, 10, 0).block_adamw  # off unless asked for


def test_resume_is_bit_identical():
    cfg = MSTConfig(delta_t=3, warmup_frac=0.3, restore_frac=0.3, **NO_HSA)
    model, method, opt = build(MST, cfg, 20, seed=5)
    train(model, method, opt, 0, 10)
    ckpt = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "opt": opt.state_dict(),
        "method": method.state_dict(),
    }
    ckpt = torch.load(_roundtrip(ckpt), weights_only=False)
    train(model, method, opt, 10, 20)

    model2, method2, opt2 = build(MST, cfg, 20, seed=5)
    model2.load_state_dict(ckpt["model"])
    method2.load_state_dict(ckpt["method"])
    opt2.load_state_dict(ckpt["opt"])
    train(model2, method2, opt2, 10, 20)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert all(torch.equal(method.unit_masks[k], method2.unit_masks[k]) for k in method.unit_masks)
    assert torch.equal(method.generator.get_state(), method2.generator.get_state())


def _roundtrip(obj) -> str:
    path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    torch.save(obj, path)
    return path


# --------------------------------------------------------------------------------------------------------------
# §7 FLOP accounting


def test_flop_average_over_delta_t():
    # d = 0.1 exactly: every layer of this shape has a multiple of 10 entries.
    mc = GPTConfig(n_layer=1, n_head=1, n_embd=80, vocab_size=160, block_size=16)
    cfg = RigLConfig(sparsity=0.9, distribution="uniform", delta_t=100)
    profiles = [plan_profile(mc, cfg, 1000, t) for t in range(101, 201)]
    for name in profiles[0].linear:
        assert sum(p.linear[name].total for p in profiles) / 100 == pytest.approx(0.309)  # units of F (fwd GEMM)
    assert dense_flops_per_token(GPT2) == pytest.approx(854.8e6, rel=1e-3)  # nanoGPT's 6N counts LayerNorms too


def test_hand_computed_step_total():
    # tiny GPT, d=64, L=2, V=128, T=16, uniform 50%: Σ in·out = 2·(64·192 + 64·64 + 64·256 + 256·64) + 64·128 = 106,496
    cfg = RigLConfig(sparsity=0.5, distribution="uniform", delta_t=5)
    model, method, _ = build(RigL, cfg, 20)
    tokens = 2 * 2 * 16  # batch 2 x accum 2 x T
    # normal step: 2·106,496·(3·0.5) + attention 12·T·d·L = 319,488 + 24,576 per token
    assert train_flops_per_token(TINY, method.flop_profile(4)) * tokens == 344_064 * 64
    # update step: 2·106,496·(0.5 + 0.5 + 1) + 24,576 = 450,560 per token
    assert train_flops_per_token(TINY, method.flop_profile(5)) * tokens == 450_560 * 64


def test_method_profile_matches_plan():
    cfg = MSTConfig(delta_t=3, warmup_frac=0.3, restore_frac=0.3, **NO_HSA)
    model, method, opt = build(MST, cfg, 20)

    def check(where, step, stepped=None):
        if where == "step_start":  # where the trainer asks: before this step's topology update
            assert method.flop_profile(step) == plan_profile(TINY, cfg, 20, step)

    train(model, method, opt, 0, 20, check=check)


def test_default_mst_costs_at_most_a_quarter_of_dense():
    steps, tokens = 600_000, 12 * 40 * 1024
    ratio = method_total_flops(GPT2, MSTConfig(), steps, tokens) / (dense_flops_per_token(GPT2) * steps * tokens)
    assert 0.15 < ratio <= 0.25
    run = load_config(CONFIGS / "mst-gpt2.toml")
    assert (run.method, run.model.n_embd, run.steps, run.tokens_per_step) == ("mst", 768, steps, tokens)
    assert mst_total_flops(run) == method_total_flops(GPT2, run.method_cfg, steps, tokens)


def test_tiny_config_matches_mst_flops():
    mst, tiny = load_config(CONFIGS / "mst-gpt2.toml"), load_config(CONFIGS / "tiny-gpt2.toml")
    assert tiny.method == "dense" and tiny.tokens_per_step == mst.tokens_per_step and tiny.steps == mst.steps
    assert tiny.model.n_embd % 64 == 0 and tiny.model.n_head == tiny.model.n_embd // 64
    assert run_total_flops(tiny) == pytest.approx(mst_total_flops(mst), rel=0.02)
    target = mst_total_flops(mst) / (mst.steps * mst.tokens_per_step)
    assert dataclasses.astuple(match_dense(mst.model, target)) == dataclasses.astuple(tiny.model)


def test_baseline_configs_load():
    for name, cls in (("rigl", RigLConfig), ("static", StaticConfig)):
        run = load_config(CONFIGS / f"{name}-gpt2.toml", ["train.steps=1000"])
        assert run.method == name and isinstance(run.method_cfg, cls) and run.steps == 1000
        assert run.method_cfg.sparsity == 0.8


# --------------------------------------------------------------------------------------------------------------
# Hybrid Sparse Attention wiring (the mask and kernel are tested in tests/kernels)


def test_hsa_window_switches_attention_and_flops():
    hsa = pytest.importorskip("kernels.hsa_attention")
    cfg = MSTConfig(delta_t=5, hsa_start=0.0, hsa_end=0.5, hsa_stride=4)
    model, method, opt = build(MST, cfg, 10)
    density = hsa.hsa_density(16, 4, "sparse")
    assert density == pytest.approx(82 / 136)  # rows keep min(i+1, 4) + floor(i/4) of the 136 causal pairs
    q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)
    for step in range(10):
        train(model, method, opt, step, step + 1)
        on = step < 5
        attends = {b.attn.attend for b in model.transformer.h}
        assert len(attends) == 1 and isinstance(attend := attends.pop(), hsa.HsaAttention)
        assert attend.runtime_mode == (0 if on else 1)  # 1: dense causal attention, the same compiled graph
        dense = gpt_module.causal_attention(q, k, v)
        assert torch.allclose(attend(q, k, v), dense, atol=1e-6) == (not on)
        assert method.metrics()["mst/attn_density"] == (density if on else 1.0)
        assert method.flop_profile(step).attn == (density if on else 1.0)
    # hand-computed: attention 24,576 FLOPs/token dense, scaled by the mask density
    prof = FlopProfile(linear={k: LinearCost(1.0, 1.0, 1.0) for k in method.modules}, attn=density)
    assert train_flops_per_token(TINY, prof) == pytest.approx(2 * 106_496 * 3 + 24_576 * 82 / 136)


def test_hsa_state_survives_resume():
    pytest.importorskip("kernels.hsa_attention")
    cfg = MSTConfig(delta_t=5, hsa_end=0.5, hsa_stride=4)
    model, method, opt = build(MST, cfg, 10)
    train(model, method, opt, 0, 2)
    state = method.state_dict()
    model2, method2, _ = build(MST, cfg, 10)
    method2.load_state_dict(state)
    assert all(b.attn.attend is method2._attention for b in model2.transformer.h)
    assert method2._attention.runtime_mode == 0


# --------------------------------------------------------------------------------------------------------------
# Block granularity (issue 8)


def test_block_granularity():
    pytest.importorskip("kernels.block_sparse")
    from kernels.block_sparse import BlockSparseLinear

    mc = GPTConfig(n_layer=1, n_head=2, n_embd=64, vocab_size=128, block_size=16)
    cfg = RigLConfig(granularity="block", block_size=32, sparsity=0.5, delta_t=2, block_lm_head=True)
    torch.manual_seed(0)
    model = GPT(mc)
    method = RigL(cfg, mc, 6, 0)
    model = method.attach(model)
    assert all(isinstance(m, BlockSparseLinear) for m in method.modules.values())
    assert model.lm_head.weight is model.transformer.wte.weight
    # by default the tied lm_head keeps element masks on an nn.Linear; every other linear is in tiles
    plain = RigL(dataclasses.replace(cfg, block_lm_head=False), mc, 6, 0)
    plain.attach(GPT(mc))
    assert list(plain.block_modules) == [k for k in plain.modules if k != "lm_head"]
    assert type(plain.modules["lm_head"]) is torch.nn.Linear and plain.units["lm_head"] == 128 * 64
    assert all(isinstance(m, BlockSparseLinear) and m.block == 32 for m in plain.block_modules.values())
    opt = method.configure_optimizer(model, 0.1, 1e-2, (0.9, 0.95), "cpu")
    assert type(opt) is torch.optim.AdamW  # mst.block_adamw is off by default
    for step in range(6):
        method.on_step_start(step)
        assert all(m.dense_wgrad == (step in (2, 4)) for m in method.modules.values())
        x = batch(step, 0, mc)
        model(x, x)[1].backward()
        method.after_backward(step)
        if method.before_optimizer_step(step, opt):
            opt.step()
        method.after_optimizer_step(step, opt)
        opt.zero_grad(set_to_none=True)
        for name, module in method.modules.items():
            o, i = method.shapes[name]
            assert torch.equal(module.block_mask, method.unit_masks[name].view(o // 32, i // 32).cpu())
            tiles = module.weight.detach().view(o // 32, 32, i // 32, 32).abs().sum((1, 3))
            assert (tiles[~module.block_mask] == 0).all()
    assert method.n_on == method._counts(0.5)


@pytest.mark.slow  # two compiles, ~8 s on 2 CPU cores
def test_block_granularity_compiles_to_one_graph():
    """MST on block-sparse linears (reference kernels, fp32) compiled with fullgraph=True (a graph break raises):
    the same losses and grads as eager through the warm-up's mask updates, whose block counts fall to one block in
    some layers; one graph for ordinary steps and update steps (dense weight gradients: a runtime mode of the ops),
    and later updates (new index tensors, new lengths) recompile nothing. HSA is on, as early in an MST run."""
    from torch._dynamo.testing import CompileCounterWithBackend

    cfg = MSTConfig(granularity="block", block_size=32, delta_t=2, warmup_frac=0.5, restore_frac=0.0, hsa_stride=4,
                    block_dense_above=1.0)  # the block kernels even at the dense start
    runs = [build(MST, cfg, 10), build(MST, cfg, 10)]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    calls = [runs[0][0], torch.compile(runs[1][0], backend=counter, fullgraph=True)]
    n_on = set()
    for step in range(6):
        results = []
        for (model, method, opt), call in zip(runs, calls, strict=True):
            method.on_step_start(step)
            x = batch(step, 0)
            loss = call(x, x)[1]
            loss.backward()
            results.append([loss.detach(), *(p.grad.clone() for p in model.parameters())])
            method.after_backward(step)
            if method.before_optimizer_step(step, opt):
                opt.step()
            method.after_optimizer_step(step, opt)
            opt.zero_grad(set_to_none=True)
        for got, want in zip(results[1], results[0], strict=True):
            torch.testing.assert_close(got, want)
        assert all(torch.equal(runs[1][1].unit_masks[k], m) for k, m in runs[0][1].unit_masks.items())
        n_on.add(tuple(runs[1][1].n_on.values()))
    assert len(n_on) >= 3 and min(min(c) for c in n_on) == 1  # the counts did change, down to a single block
    assert runs[1][1]._hsa_on and counter.frame_count == 1


def test_block_layers_above_the_dense_threshold_run_dense_and_train_the_same():
    """block_dense_above: a layer denser than it runs F.linear (dense start, the ramps' first stairs), a sparser one
    the block kernels. Both train the same: on the CPU the block path is the masked dense matmul and the weights are
    exact zeros off the mask, so the runs agree bit for bit, through updates that cross the threshold."""
    base = dict(granularity="block", block_size=32, delta_t=2, warmup_frac=0.5, restore_frac=0.3, hsa_stride=4)
    runs = {thr: build(MST, MSTConfig(**base, block_dense_above=thr), 10) for thr in (0.5, 1.0)}
    paths = set()
    for step in range(10):
        losses = {}
        for thr, (model, method, opt) in runs.items():
            losses[thr] = method_step(model, method, opt, step, [(batch(step, 0), batch(step, 0))])[0]
            for name, module in method.block_modules.items():
                density = method.n_on[name] / method.units[name]
                assert module.dense_path == (density > thr)
        paths.add(tuple(m.dense_path for m in runs[0.5][1].block_modules.values()))
        assert losses[0.5] == losses[1.0]
    (m1, meth1, _), (m2, meth2, _) = runs.values()
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters(), strict=True))
    assert all(torch.equal(meth1.unit_masks[k], meth2.unit_masks[k]) for k in meth1.unit_masks)
    assert len(paths) >= 2  # the threshold was crossed: some steps ran dense layers, some block ones
    with pytest.raises(ValueError, match=r"mst\.block_dense_above must be in \[0, 1\]"):
        MSTConfig(block_dense_above=1.5)


def test_block_grads_are_zero_off_the_mask_without_a_masking_pass():
    """after_backward leaves the block kernels' gradients alone (their dW is zero on empty blocks) and masks the
    rest: lm_head's, which is wte's and carries the embedding's dense rows, and dense-path layers'. Every gradient
    the optimizer sees is zero off the mask either way."""
    cfg = MSTConfig(granularity="block", block_size=32, delta_t=3, warmup_frac=0.0, restore_frac=0.0, sparsity=0.5,
                    hsa_end=0.0, block_dense_above=0.6)
    model, method, opt = build(MST, cfg, 6)
    skipped = [k for k, need in zip(method.modules, method._mask_grad, strict=True) if not need]
    assert "lm_head" in method._shared and "lm_head" not in skipped and skipped
    assert all(not method.modules[k].dense_path for k in skipped)

    def check(where, step, *_):
        if where == "after_backward" and not method.schedule.is_update(step):
            for w, m in zip(method.weights, method.masks, strict=True):
                assert (w.grad[m == 0] == 0).all()

    train(model, method, opt, 0, 6, check=check)


def test_kernel_warmups_list_the_block_layers_and_hsa_a_run_launches():
    """One block_sparse spec per layer that runs the block kernels at the peak sparsity (its block count there, its
    dW split density, the run's tokens), none for a layer dense even then, and HSA's kernels when HSA is ever on."""
    from kernels import prewarm

    cfg = MSTConfig(granularity="block", block_size=32, delta_t=2, warmup_frac=0.4, hsa_stride=4)
    model, method, _ = build(MST, cfg, 10)
    specs = method.kernel_warmups(4, 16)
    target = method._counts(cfg.sparsity)
    sparse = {k for k in method.block_modules if target[k] / method.units[k] <= cfg.block_dense_above}
    blocks = [s for s in specs if s["kind"] == "block_sparse"]
    names = [k for k in method.block_modules if k in sparse]
    assert names and len(blocks) == len(names)
    for spec, name in zip(blocks, names, strict=True):
        assert (spec["out"], spec["in"]) == method.shapes[name] and spec["blocks"] == target[name]
        assert spec["dw_density"] == method.block_modules[name].dw_density and spec["tokens"] == 64
    hsa = [s for s in specs if s["kind"] == "hsa"]
    assert hsa == [{"kind": "hsa", "batch": 4, "heads": 2, "T": 16, "head_dim": 32, "stride": 4}]
    for spec in specs:
        prewarm.check(spec)
    dense_top = MST(MSTConfig(granularity="block", block_size=32, block_dense_above=0.0, **NO_HSA), TINY, 10)
    dense_top.attach(GPT(TINY))
    assert dense_top.kernel_warmups(4, 16) == []
    element = MST(MSTConfig(**NO_HSA), TINY, 10)
    element.attach(GPT(TINY))
    assert element.kernel_warmups(4, 16) == []


@pytest.mark.slow  # two compiles with aot_eager
def test_compiled_graphs_bounds_what_a_compiled_run_builds():
    """The trainer raises dynamo's recompile limit to Method.compiled_graphs(): it must be at least the number of
    graphs a compiled run really builds over its whole schedule, else the rest of the run would silently go eager.
    Through the dense start, ramps crossing block_dense_above and update steps (runtime modes: no graph of their
    own) that is one graph, and one more for HSA switching off (on the CPU the reference attention branches on
    it)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    cfg = MSTConfig(granularity="block", block_size=32, delta_t=2, warmup_frac=0.4, restore_frac=0.3, hsa_end=0.6,
                    hsa_stride=4)
    model, method, opt = build(MST, cfg, 14)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    paths = set()
    with torch._dynamo.config.patch(recompile_limit=64):
        for step in range(14):
            method_step(compiled, method, opt, step, [(batch(step, 0), batch(step, 0))])
            paths.add(tuple(m.dense_path for m in method.block_modules.values()))
    assert len(paths) >= 3  # all dense, mixed, all block kernels
    assert counter.frame_count == method.compiled_graphs() == 2
    assert Static(StaticConfig(), TINY, 14).compiled_graphs() == 1


# --------------------------------------------------------------------------------------------------------------
# §9.8 DDP: identical masks on every rank


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = GPT(TINY)
        # Different seeds on purpose: the broadcast from rank 0 must still make the masks agree.
        method = MST(MSTConfig(delta_t=2, warmup_frac=0.3, restore_frac=0.3, **NO_HSA), TINY, 8, seed=rank)
        method.attach(model)
        opt = model.configure_optimizer(0.1, 1e-2, (0.9, 0.95), "cpu")
        hashes = []
        for step in range(8):
            method.on_step_start(step)
            x = batch(step, rank)
            model(x, x)[1].backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
            method.after_backward(step)
            if method.before_optimizer_step(step, opt):
                opt.step()
            method.after_optimizer_step(step, opt)
            opt.zero_grad(set_to_none=True)
            hashes.append(torch.cat([m.flatten() for m in method.unit_masks.values()]).clone())
        torch.save(hashes, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: gloo's threads at CPython's finalisation aborted a worker now and then (SIGABRT,
    # "terminate called without an active exception": 2 runs in ~25 on 2 cores), failing a run that had passed.
    os._exit(0)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_ranks_hold_identical_masks():
    tmp = tempfile.mkdtemp()
    mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
    a, b = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in (0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[-1])  # the masks did change


# --------------------------------------------------------------------------------------------------------------
# GPU: masks in the weights' dtype/device, bf16 autocast, HSA kernel in the loop


@pytest.mark.gpu
def test_cuda_bf16_run_keeps_invariants():
    pytest.importorskip("kernels.hsa_attention")
    mc = GPTConfig(preset="tiny", vocab_size=128, block_size=64)
    model = GPT(mc).cuda()
    cfg = MSTConfig(delta_t=2, warmup_frac=0.3, restore_frac=0.3, hsa_end=0.5, hsa_stride=16)
    method = MST(cfg, mc, 10, 0)
    model = method.attach(model)
    assert all(m.device.type == "cuda" and m.dtype == w.dtype for m, w in zip(method.masks, method.weights))
    opt = model.configure_optimizer(0.1, 1e-2, (0.9, 0.95), "cuda")
    for step in range(10):
        x = batch(step, 0, mc).cuda()
        method_step(model, method, opt, step, [(x, x)], autocast=torch.autocast("cuda", dtype=torch.bfloat16))
        for w, m in zip(method.weights, method.masks, strict=True):
            assert (w.detach()[m == 0] == 0).all()
        if method.schedule.is_update(step):
            assert method.n_on == method._counts(method.schedule.target(step))


@pytest.mark.gpu
def test_block_granularity_compiled_cuda():
    """The trainer's compiled MST-block step on CUDA: Triton block-sparse and HSA kernels as custom ops inside one
    inductor graph (fullgraph), bf16 autocast. Losses track the eager run's through the warm-up's mask updates (the
    masks may part ways on near-tied growth scores, so to a tolerance), and the updates compile nothing beyond the
    graphs of ordinary and update steps."""
    from torch._dynamo.testing import CompileCounterWithBackend

    mc = GPTConfig(preset="tiny", vocab_size=128, block_size=64)
    cfg = MSTConfig(granularity="block", block_size=32, delta_t=2, warmup_frac=0.5, restore_frac=0.0, hsa_stride=16,
                    block_dense_above=1.0, block_adamw=True)  # the block kernels even at the dense start

    def make():
        torch.manual_seed(0)
        model = GPT(mc).cuda()
        method = MST(cfg, mc, 10, 0)
        model = method.attach(model)
        return model, method, method.configure_optimizer(model, 0.1, 1e-2, (0.9, 0.95), "cuda")

    runs = [make(), make()]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    calls = [runs[0][0], torch.compile(runs[1][0], backend=counter, fullgraph=True)]
    for step in range(8):
        x = batch(step, 0, mc).cuda()
        losses = []
        for (_model, method, opt), call in zip(runs, calls, strict=True):
            amp = torch.autocast("cuda", dtype=torch.bfloat16)
            losses += method_step(call, method, opt, step, [(x, x)], autocast=amp)[0]
            for w, m in zip(method.weights, method.masks, strict=True):
                assert (w.detach()[m == 0] == 0).all()
        assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    assert runs[1][1]._hsa_on and counter.frame_count == 1
