"""Checkpoints in and out: OpenAI's GPT-2 from Hugging Face, our own ckpt.pt, and export as a GPT2LMHeadModel.

    model = from_pretrained("gpt2")                  # hub id (or its local cache), or a local HF folder
    model, info = load_model("out/run1")             # our <out_dir>/ckpt.pt or a .pt path, or any of the above
    export_hf(model, "hf/run1", vocab_size=50257)    # for lm-evaluation-harness: `pretrained=hf/run1,tokenizer=gpt2`

Our GPT keeps GPT-2's parameter names, so the mapping is by name; HF stores the four projection matrices as
Conv1D (in, out) where we use nn.Linear (out, in), hence the transposes (as nanoGPT's from_pretrained).
`transformers` is imported only inside these functions.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from model.gpt import GPT, GPTConfig

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_VOCAB = 50257
EMBEDDING = "transformer.wte.weight"  # tied to lm_head.weight in both our GPT and HF's GPT2LMHeadModel


class CheckpointError(RuntimeError):
    """A checkpoint or pretrained model that cannot be loaded or represented; the message says why in one line."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def from_pretrained(name_or_path: str, vocab_size: int | None = None, dropout: float = 0.0) -> GPT:
    """OpenAI GPT-2 ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', any hub id or local folder) as our GPT.

    The config keeps GPT-2's own shape (bias=True, block_size = n_positions, vocab 50257). vocab_size > that pads
    the tied embedding with zero rows, e.g. 50304 for continual pretraining at our padded size: the logits of the
    real tokens stay identical and the padded ones are 0 (never targets; the eval slices them away).
    Offline, a hub id works when the Hugging Face cache holds it; otherwise pass a local folder.
    """
    try:
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(name_or_path)
    except Exception as e:  # OSError offline / not found, ValueError for a non-GPT-2 folder, ImportError
        raise CheckpointError(f"cannot load Hugging Face GPT-2 {name_or_path!r} ({_one_line(e)})") from e
    c = hf.config
    differs = {
        "activation_function": c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"),
        "layer_norm_epsilon": c.layer_norm_epsilon != 1e-5,
        "scale_attn_weights": not c.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": c.scale_attn_by_inverse_layer_idx,
        "n_inner": c.n_inner not in (None, 4 * c.n_embd),
    }
    if any(differs.values()):
        bad = ", ".join(f"{k}={getattr(c, k)!r}" for k, v in differs.items() if v)
        raise CheckpointError(f"{name_or_path!r} is not a GPT-2 our model can represent ({bad})")
    vocab_size = vocab_size or c.vocab_size
    if vocab_size < c.vocab_size:
        raise CheckpointError(f"vocab_size {vocab_size} is smaller than {name_or_path!r}'s {c.vocab_size}")
    cfg = GPTConfig(
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        block_size=c.n_positions,
        vocab_size=vocab_size,
        bias=True,
        dropout=dropout,
    )
    model = GPT(cfg)
    # Buffers (the causal mask of older transformers) are not weights; named_parameters lists a tied lm_head once.
    theirs = {k: p.detach().float() for k, p in hf.named_parameters()}
    if "lm_head.weight" in theirs and not torch.equal(theirs.pop("lm_head.weight"), theirs[EMBEDDING]):
        raise CheckpointError(f"{name_or_path!r} has an lm_head untied from its embedding; our GPT ties them")
    ours = dict(model.named_parameters())  # lm_head.weight is the same tensor as the embedding: listed once
    if set(theirs) != set(ours):
        raise CheckpointError(f"{name_or_path!r}: parameter names differ: {sorted(set(theirs) ^ set(ours))[:6]}")
    with torch.no_grad():
        for k, v in theirs.items():
            v = v.t() if k.endswith(CONV1D) else v
            if k == EMBEDDING:
                ours[k].zero_()
                ours[k][: v.shape[0]].copy_(v)
            else:
                ours[k].copy_(v)
    return model


def export_hf(model: GPT, out_dir: str | Path, vocab_size: int | None = None, eot: int = GPT2_VOCAB - 1) -> Path:
    """Write `model` as a Hugging Face GPT2LMHeadModel folder (config.json + model.safetensors), fp32.

    vocab_size slices the tied embedding to the tokenizer's real size (50257 of our padded 50304): exact for every
    real token, since a logit depends only on its own row, and it is what lm-eval expects with the GPT-2
    tokenizer (padded ids would take probability mass in its softmax). None keeps the model's size.
    HF's GPT-2 always has biases; a bias=False model exports zeros there, which computes the same function.
    No tokenizer files are written: pair the folder with `gpt2` (or bytes, for a byte-tokenizer model).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    vocab_size = vocab_size or c.vocab_size
    if not 0 < vocab_size <= c.vocab_size:
        raise ValueError(f"vocab_size must be in (0, {c.vocab_size}], got {vocab_size}")
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=eot,
        eos_token_id=eot,
        tie_word_embeddings=True,
    )
    hf = GPT2LMHeadModel(config)
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    ours = {k.removeprefix("_orig_mod."): v for k, v in ours.items()}
    theirs = dict(hf.named_parameters())
    if extra := set(ours) - set(theirs):
        raise ValueError(f"no GPT2LMHeadModel parameter for {sorted(extra)[:6]}")
    with torch.no_grad():
        for k, p in theirs.items():
            if k in ours:
                v = ours[k].t() if k.endswith(CONV1D) else ours[k]
                p.copy_(v[:vocab_size] if k == EMBEDDING else v)
            elif k.endswith(".bias"):
                p.zero_()
            else:
                raise ValueError(f"our model has no weight for GPT2LMHeadModel's {k}")
    out_dir = Path(out_dir)
    hf.save_pretrained(out_dir)
    return out_dir


def load_model(source: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Any model we can score or train from -> (GPT in eval mode on device, info).

    source: our run, `<out_dir>` (reads ckpt.pt) or a .pt path; or Hugging Face GPT-2 weights: a folder with
    config.json, or a hub id such as 'gpt2' (through from_pretrained, at the checkpoint's own vocab size).
    info: path, tokenizer ('gpt2' | 'byte'), vocab_size (the tokenizer's: logits beyond it are padding), eot, step,
    config. A Hugging Face model's tokenizer is taken to be GPT-2's, or bytes when its vocab is 256 (our export).
    """
    path = Path(source)
    file = path / "ckpt.pt" if path.is_dir() else path
    if file.is_file():
        return _load_ours(file, device)
    if path.is_dir() and not (path / "config.json").is_file():
        raise CheckpointError(f"no checkpoint at {file} (nor a Hugging Face config.json in {path})")
    try:
        model = from_pretrained(str(source))
    except CheckpointError as e:
        raise CheckpointError(f"{e}" if path.is_dir() else f"no checkpoint at {file}, and {e}") from e
    byte = model.config.vocab_size == 256
    info = {
        "path": f"hf:{source}",
        "tokenizer": "byte" if byte else "gpt2",
        "vocab_size": 256 if byte else GPT2_VOCAB,
        "eot": 0 if byte else GPT2_VOCAB - 1,
        "step": None,
        "config": {"model": asdict(model.config)},
    }
    return model.to(device).eval(), info


def _load_ours(file: Path, device: str | torch.device) -> tuple[GPT, dict]:
    """The trainer's file: torch.save({"model": GPT state_dict, "config": {"model": GPTConfig kwargs, ...},
    "data_meta": {"tokenizer", "vocab_size", "eot", ...}, ...optimizer/method state (ignored)}).

    The GPT is rebuilt as the trainer built it, GPTConfig(**config["model"]), and the weights load strictly after
    stripping torch.compile's "_orig_mod." and DDP's "module." prefixes.
    Unpickles arbitrary objects (our checkpoints carry RNG states): load only files you trust.
    """
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated file, not a torch file, missing pickled class
        raise CheckpointError(f"cannot read {file} ({_one_line(e)})") from e
    if not isinstance(ckpt, dict) or (missing := {"model", "config", "data_meta"} - set(ckpt)):
        what = f"keys {sorted(missing)}" if isinstance(ckpt, dict) else "a dict"
        raise CheckpointError(f"{file} is not one of our checkpoints (it lacks {what})")
    try:
        model = GPT(GPTConfig(**ckpt["config"]["model"]))
        state = {}
        for k, v in ckpt["model"].items():
            for prefix in ("_orig_mod.", "module."):
                k = k.removeprefix(prefix)
            state[k] = v
        model.load_state_dict(state)
        meta = ckpt["data_meta"]
        info = {
            "path": str(file),
            "tokenizer": str(meta["tokenizer"]),
            "vocab_size": int(meta["vocab_size"]),
            "eot": int(meta["eot"]),
            "step": ckpt.get("step"),
            "config": ckpt["config"],
        }
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # config/weights of another shape or version
        raise CheckpointError(f"{file} does not load into GPT ({_one_line(e)})") from e
    return model.to(device).eval(), info
