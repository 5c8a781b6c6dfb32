import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.flops import FlopProfile, LinearCost, dense_flops_per_token, linear_shapes, train_flops_per_token
from model.gpt import GPT, PRESETS, GPTConfig


def test_presets_parameter_counts():
    # OpenAI's sizes (non-embedding count as nanoGPT reports it, vocab padded to 50304, with biases).
    expected = {"gpt2": 124.0, "gpt2-medium": 353.8, "gpt2-large": 772.4, "gpt2-xl": 1557.6}
    for name, millions in expected.items():
        cfg = GPTConfig(preset=name, bias=True)
        L, d = cfg.n_layer, cfg.n_embd
        n = 12 * L * d * d + 13 * L * d + 2 * d + cfg.vocab_size * d  # blocks + final LN + tied embedding
        assert n / 1e6 == pytest.approx(millions, rel=0.01), name
    assert set(expected) <= set(PRESETS)


def test_forward_shapes_and_initial_loss():
    cfg = GPTConfig(preset="tiny", vocab_size=256, block_size=16)
    model = GPT(cfg)
    x, y = torch.randint(0, 256, (2, 3, 16))
    logits, loss = model(x, y)
    assert logits.shape == (3, 16, 256)
    assert loss.requires_grad and not logits.requires_grad  # no zero gradient of the logits in backward
    assert loss.item() == pytest.approx(math.log(256), rel=0.05)  # near-uniform predictions at init
    logits, loss = model(x)
    assert logits.shape == (3, 1, 256) and loss is None


def test_tied_embeddings_and_count():
    model = GPT(GPTConfig(preset="tiny", vocab_size=256, block_size=16))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_params(non_embedding=False) - model.num_params() == 16 * 64


def test_bad_config_values():
    with pytest.raises(ValueError, match="n_embd"):
        GPTConfig(n_layer=2, n_head=3, n_embd=64)
    with pytest.raises(ValueError, match="preset"):
        GPTConfig(preset="gpt5")


def test_decay_groups():
    model = GPT(GPTConfig(preset="tiny", vocab_size=256, block_size=16, bias=True))
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_dense_flops_gpt2_small():
    # mst.md §7: 6N + 12·L·d·T = 854.8M FLOPs per token for GPT-2 124M at T=1024 (N counts LayerNorms too).
    assert dense_flops_per_token(GPTConfig(preset="gpt2")) / 1e6 == pytest.approx(854.8, rel=1e-3)


@pytest.mark.parametrize("vocab", [256, 1024])
def test_flops_match_flop_counter(vocab):
    cfg = GPTConfig(preset="tiny", vocab_size=vocab, block_size=64)
    model = GPT(cfg)
    x = torch.randint(0, vocab, (2, 64))
    counter = FlopCounterMode(display=False)
    # The math backend decomposes attention into counted matmuls (the CPU flash kernel is not registered).
    with counter, sdpa_kernel(SDPBackend.MATH):
        _, loss = model(x, x)
        loss.backward()
    analytic = train_flops_per_token(cfg) * x.numel()
    assert counter.get_total_flops() == pytest.approx(analytic, rel=0.02)


def test_sparse_profile_scales_each_gemm():
    cfg = GPTConfig(preset="tiny", vocab_size=256, block_size=8)
    dense = train_flops_per_token(cfg)
    name = "transformer.h.0.mlp.c_fc"
    i, o = linear_shapes(cfg)[name]
    half = FlopProfile(linear={name: LinearCost(0.5, 0.5, 0.5)})
    assert dense - train_flops_per_token(cfg, half) == pytest.approx(0.5 * 6 * i * o)
    attn = FlopProfile(attn={0: 0.25})
    assert dense - train_flops_per_token(cfg, attn) == pytest.approx(0.75 * 12 * cfg.block_size * cfg.n_embd)


def test_generate_greedy_is_deterministic():
    model = GPT(GPTConfig(preset="tiny", vocab_size=256, block_size=8))
    x = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(x, 20, temperature=0)
    b = model.generate(x, 20, temperature=0)
    assert a.shape == (1, 21) and torch.equal(a, b)  # also runs past block_size (cropping the context)
