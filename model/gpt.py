"""GPT-2 as in nanoGPT: learned positions, pre-LayerNorm blocks, GELU MLP, tied embeddings.

The model is dense and knows nothing of sparsity. Sparse methods attach from the outside (sparsity/), by
swapping modules or by replacing a block's attention kernel (`CausalSelfAttention.attend`), so every weight
keeps its GPT-2 name (`c_attn`, `c_fc`, `c_proj`) and checkpoints of all methods share one layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# (n_layer, n_head, n_embd) of the four OpenAI sizes and of the small ones we use for tests and demos.
PRESETS: dict[str, tuple[int, int, int]] = {
    "gpt2": (12, 12, 768),  # 124M
    "gpt2-medium": (24, 16, 1024),  # 350M
    "gpt2-large": (36, 20, 1280),  # 774M
    "gpt2-xl": (48, 25, 1600),  # 1558M
    "small": (6, 6, 384),  # ~30M with the GPT-2 vocab
    "mini": (4, 4, 128),  # the CPU demo
    "tiny": (2, 2, 64),  # unit tests
}


@dataclass
class GPTConfig:
    """Shape of the network. n_layer/n_head/n_embd left at 0 come from `preset` (GPT-2 124M without one)."""

    preset: str = ""
    """A PRESETS name ('gpt2', 'gpt2-medium', ..., 'tiny'); fields given explicitly win over it."""
    n_layer: int = 0
    n_head: int = 0
    n_embd: int = 0
    block_size: int = 1024
    """Context length T in tokens."""
    vocab_size: int = 50304
    """GPT-2's 50257 padded up to a multiple of 64 for faster matmuls; the extra logits are never targets."""
    bias: bool = False
    """Biases in Linear and LayerNorm layers (OpenAI's GPT-2 has them; MST and 2:4 train without)."""
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        n_layer, n_head, n_embd = PRESETS[self.preset or "gpt2"]
        self.n_layer, self.n_head, self.n_embd = self.n_layer or n_layer, self.n_head or n_head, self.n_embd or n_embd
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} is not a multiple of model.n_head={self.n_head}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Dense causal attention through SDPA (flash kernel on GPU). q, k, v: (B, nh, T, hs)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


AttentionFn = Callable[..., torch.Tensor]


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token loss over the targets that are not -1, in fp32. logits (N, V), targets (N,)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=-1)


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # The attention kernel is a plain attribute so a method (MST's strided mask, say) can swap it per block.
        self.attend: AttentionFn = causal_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = self.attend(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied: one (vocab, d) matrix
        # A plain attribute like CausalSelfAttention.attend: the trainer swaps in a fused kernel (train.loss_kernel).
        self.loss_fn: LossFn = cross_entropy_loss
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2L) so the residual stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position table is left out by default (the tied wte/lm_head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx: (B, T) token ids. Returns (logits (B, T, V), loss) or, without targets, last-position logits."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        return self.head(x, targets)

    def head(self, x: torch.Tensor, targets: torch.Tensor | None):
        """What follows the blocks: final LayerNorm, lm_head and the loss (a region of its own for
        train.compile_scope=blocks)."""
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # inference: only the last position is needed
        logits = self.lm_head(x)
        loss = self.loss_fn(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        # Detached: a returned output that requires grad gets a gradient of its own in backward, zeros the size of
        # the logits (1.6 GB at 16k tokens) that a compiled step fills, copies into its CUDA graph and adds in:
        # 1.3 ms of a 33 ms GPT-2 124M step on an H200 (results/raw/h200-profile-s33.txt).
        return logits.detach(), loss

    def configure_optimizer(
        self, weight_decay: float, lr: float, betas: tuple[float, float], device_type: str, make=torch.optim.AdamW
    ) -> torch.optim.AdamW:
        """AdamW (or `make`, an AdamW subclass) with nanoGPT's groups: matrices (Linear weights, the tied embedding)
        decay; biases, norms don't."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type == "cuda"  # the fused CUDA kernel is one launch for all parameters
        return make(groups, lr=lr, betas=betas, fused=fused)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        vocab_limit: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample max_new_tokens after idx (B, T). vocab_limit masks the padded logits (50257..50303)."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size :]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float()
            if vocab_limit is not None:
                logits[:, vocab_limit:] = -float("inf")
            if temperature <= 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
