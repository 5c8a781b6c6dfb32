"""Analytic training FLOPs of a GPT step, for dense and sparse models.

A linear layer y = x Wᵀ with W of shape (out, in) costs 2·in·out FLOPs per token in each of its three GEMMs:
forward (Y = X Wᵀ), input gradient (dX = dY W) and weight gradient (dW = dYᵀ X), so 6·in·out for a training
step ("forward 1x, backward 2x"). A sparse method says, per linear, which fraction of each GEMM it really does
(`LinearCost`): MST's unstructured density d gives (d, d, d) and (d, d, 1) on topology-update steps (the dense
gradient, mst.md §7); 2:4 halves all three (2of4.md §1); SAT keeps a fraction of the neurons.

Attention (QKᵀ and AV) is counted as nanoGPT's `estimate_mfu` and torch's FlopCounterMode count it: 2·2·T·d
per token per layer forward, i.e. every query against all T keys, although causal kernels skip the upper half.
A sparse attention mask scales that by (kept pairs / causal pairs), so ratios against dense are real work
ratios. Embedding lookups, LayerNorm, softmax, GELU and mask bookkeeping are left out (under 1% at GPT-2 sizes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.gpt import GPTConfig


@dataclass(frozen=True)
class LinearCost:
    """Fraction of the dense work done in each GEMM of one linear layer (1.0 = dense)."""

    fwd: float = 1.0
    dgrad: float = 1.0
    wgrad: float = 1.0

    @property
    def total(self) -> float:
        return self.fwd + self.dgrad + self.wgrad


DENSE = LinearCost()


@dataclass
class FlopProfile:
    """What a method does in one training step. Linears missing from `linear` are dense.

    `attn` is the attention density per layer, as a fraction of the causal pairs (1.0 = dense causal), either one
    number for all layers or a dict {layer index: density}.
    """

    linear: dict[str, LinearCost] = field(default_factory=dict)
    attn: float | dict[int, float] = 1.0

    def attn_density(self, layer: int) -> float:
        return self.attn if isinstance(self.attn, float | int) else self.attn.get(layer, 1.0)


def linear_shapes(cfg: GPTConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every Linear, by module name. lm_head is tied to wte, so the embedding is here once."""
    d = cfg.n_embd
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        shapes[f"{p}.attn.c_attn"] = (d, 3 * d)
        shapes[f"{p}.attn.c_proj"] = (d, d)
        shapes[f"{p}.mlp.c_fc"] = (d, 4 * d)
        shapes[f"{p}.mlp.c_proj"] = (4 * d, d)
    shapes["lm_head"] = (d, cfg.vocab_size)
    return shapes


def train_flops_per_token(cfg: GPTConfig, profile: FlopProfile | None = None, seq_len: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token at sequence length seq_len (default block_size)."""
    profile = profile or FlopProfile()
    T = seq_len or cfg.block_size
    linear = sum(2 * i * o * profile.linear.get(name, DENSE).total for name, (i, o) in linear_shapes(cfg).items())
    attn = sum(3 * 2 * 2 * T * cfg.n_embd * profile.attn_density(layer) for layer in range(cfg.n_layer))
    return float(linear + attn)


def dense_flops_per_token(cfg: GPTConfig, seq_len: int | None = None) -> float:
    """nanoGPT's 6N + 12·L·d·T. GPT-2 124M at T=1024: 854.8M FLOPs per token (mst.md §7)."""
    return train_flops_per_token(cfg, None, seq_len)


# Dense bf16 tensor-core peaks (FLOP/s) by substring of the CUDA device name, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "A10": 125e12}


def peak_flops(device_name: str) -> float | None:
    """bf16 dense peak of a device, or None if unknown (CPU): MFU is then not reported."""
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None
