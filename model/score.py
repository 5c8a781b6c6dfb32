"""Zero-shot scoring (spec: shared/research/eval.md §1 and §5): sliding-window NLL of a token stream, LAMBADA.

The model is called as GPT.forward, `logits, _ = model(idx, targets)`, on batches of right-padded rows; `targets`
holds exactly the labels being scored and -1 elsewhere (the model's own loss is ignored: it would include the padded
vocab). Logits are sliced to the tokenizer's real vocabulary (50257 of the padded 50304) before the log-softmax and
the argmax, which run in fp32; sums are float64. The forward pass runs under bf16 autocast when dtype=bfloat16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


def sliding_windows(n_tokens: int, block_size: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows over a stream x_0..x_{T-1} whose targets are x_1..x_{T-1} (eval.md §5).

    Returns (idx, scored), both (n_windows, L) with L = min(block_size, T-1): window k reads the inputs x[idx[k]]
    and predicts x[idx[k] + 1]; scored[k] marks the labels it counts. Window 0 counts all of its labels, window k>0
    only its last `stride` ones, so every target is counted once and, past the first window, after at least
    block_size - stride + 1 tokens of context. n_windows = 1 + ceil(max(T-1-W, 0) / S).
    """
    if n_tokens < 2:
        raise ValueError(f"a stream needs at least 2 tokens to score, got {n_tokens}")
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
    L = min(block_size, n_tokens - 1)
    n = 1 + math.ceil(max(n_tokens - 1 - block_size, 0) / stride)
    idx = torch.arange(n)[:, None] * stride + torch.arange(L)  # (n, L)
    scored = idx + 1 < n_tokens  # the last window runs past the end: its tail labels are padding
    scored[1:, : L - stride] = False
    return idx, scored


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def _logp_hit(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of logits (N, V_model) and labels (N,): (log p(label) in fp32, label == argmax), real vocab only."""
    logits = logits[:, :vocab_size].float()
    logp = logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
    return logp, logits.argmax(-1) == labels


@dataclass(frozen=True)
class StreamScore:
    nll: float
    """Summed negative log-likelihood in nats (float64)."""
    tokens: int
    """Targets scored: T - 1 (the first token, EOT, is only context)."""
    windows: int


@torch.no_grad()
def score_stream(
    model: nn.Module,
    ids: list[int] | torch.Tensor,
    *,
    block_size: int,
    stride: int,
    vocab_size: int,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> StreamScore:
    """Summed NLL of ids[1:] given everything before, through sliding windows batched with a score mask."""
    device = torch.device(device)
    x = torch.as_tensor(ids, dtype=torch.long)
    idx, scored = sliding_windows(len(x), block_size, stride)
    x = torch.cat([x, x.new_zeros(max(0, int(idx[-1, -1]) + 2 - len(x)))]).to(device)  # pad for the last labels
    idx, scored = idx.to(device), scored.to(device)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(idx), batch_size):
        inputs = x[idx[i : i + batch_size]]  # (B, L)
        labels = x[idx[i : i + batch_size] + 1].masked_fill(~scored[i : i + batch_size], -1)
        with _autocast(device, dtype):
            logits, _ = model(inputs, labels)  # (B, L, V)
        mask = labels >= 0
        logp, _ = _logp_hit(logits[mask], labels[mask], vocab_size)
        nll -= logp.double().sum()
    return StreamScore(nll=nll.item(), tokens=int(scored.sum()), windows=len(idx))


def perplexities(nll: float, tokens: int, units: int) -> dict[str, float]:
    """ppl_word: the GPT-2 paper's per-unit perplexity (eval.md §2); ppl_token: per scored token."""
    return {"ppl_word": math.exp(nll / units), "ppl_token": math.exp(nll / tokens), "nll": nll}


@torch.no_grad()
def score_lambada(
    model: nn.Module,
    examples: list[tuple[list[int], list[int]]],
    *,
    block_size: int,
    vocab_size: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """LAMBADA metrics of eval.md §1 from (context ids, target ids) pairs, teacher-forced.

    acc: every target token is the argmax (lm-eval `acc`, Megatron --strict-lambada); acc_last_token: only the
    final one; ppl: exp(-mean over passages of the target's summed log-prob), i.e. per word (lm-eval);
    ppl_token: per target token. Passages are sorted by length and right-padded; a passage longer than the context
    keeps its last block_size + 1 tokens.
    """
    device = torch.device(device)
    n = len(examples)
    logp_sum = torch.zeros(n, dtype=torch.float64, device=device)
    all_hit = torch.zeros(n, dtype=torch.bool, device=device)
    last_hit = torch.zeros(n, dtype=torch.bool, device=device)
    order = sorted(range(n), key=lambda i: len(examples[i][0]) + len(examples[i][1]))
    for i in range(0, n, batch_size):
        rows = order[i : i + batch_size]
        seqs = [(examples[r][0] + examples[r][1])[-(block_size + 1) :] for r in rows]
        n_target = [len(examples[r][1]) for r in rows]
        if max(n_target) > block_size:
            raise ValueError(f"a LAMBADA target of {max(n_target)} tokens does not fit block_size {block_size}")
        inputs = torch.zeros(len(rows), max(map(len, seqs)) - 1, dtype=torch.long)  # (B, L), right-padded
        labels = torch.full_like(inputs, -1)
        for b, (s, k) in enumerate(zip(seqs, n_target, strict=True)):
            inputs[b, : len(s) - 1] = torch.tensor(s[:-1])
            labels[b, len(s) - 1 - k : len(s) - 1] = torch.tensor(s[-k:])  # logits at len(ctx)-1 .. len-2
        inputs, labels = inputs.to(device), labels.to(device)
        with _autocast(device, dtype):
            logits, _ = model(inputs, labels)
        mask = labels >= 0
        logp, hit = _logp_hit(logits[mask], labels[mask], vocab_size)  # row-major: each row's targets in order
        row = mask.nonzero()[:, 0]
        rows_t = torch.tensor(rows, device=device)
        logp_sum[rows_t] = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row, logp.double())
        misses = torch.zeros(len(rows), device=device).index_add_(0, row, (~hit).float())
        all_hit[rows_t] = misses == 0
        last_hit[rows_t] = hit[mask.sum(1).cumsum(0) - 1]
    tokens = sum(len(t) for _, t in examples)
    return {
        "acc": all_hit.double().mean().item(),
        "acc_last_token": last_hit.double().mean().item(),
        "ppl": math.exp(-logp_sum.mean().item()),
        "ppl_token": math.exp(-logp_sum.sum().item() / tokens),
        "passages": n,
        "tokens": tokens,
    }
