"""Shared test utilities: a tiny prepared dataset and a tiny config, built in tmp folders."""

from __future__ import annotations

import random
from pathlib import Path

from core.config import Config, load_config
from data.prepare import prepare

WORDS = "the a of sparse dense model train token gradient mask weight layer attention neuron step loss".split()


def make_corpus(root: Path, n_docs: int = 60, seed: int = 0) -> Path:
    """A folder of small text documents with some structure to learn."""
    rng = random.Random(seed)
    src = root / "corpus"
    src.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(80, 200))]
        (src / f"doc{i:03d}.txt").write_text(" ".join(words) + ".\n")
    return src


def make_dataset(root: Path, tokenizer: str = "byte") -> Path:
    out = root / "data"
    if not (out / "meta.json").is_file():
        prepare(str(make_corpus(root)), out, tokenizer=tokenizer, val_fraction=0.1, seed=1)
    return out


def tiny_config(root: Path, method: str = "dense", overrides: list[str] | None = None) -> Config:
    data = make_dataset(root)
    base = [
        "model.preset=tiny", "model.block_size=32", "model.vocab_size=256",
        f"data.dir={data}", f"train.out_dir={root / 'run'}", "train.steps=6", "train.batch_size=4",
        "train.grad_accum=2", "train.lr=3e-3", "train.min_lr=3e-4", "train.warmup_steps=2", "train.eval_interval=3",
        "train.eval_steps=2", "train.log_interval=1", "train.device=cpu",
    ]
    return load_config(None, method, base + (overrides or []))


def config_args(cfg: Config) -> list[str]:
    """The same config as --set arguments for a subprocess."""
    args = ["--method", cfg.method]
    for section in ("model", "train", "data"):
        for key, value in cfg.to_dict()[section].items():
            if value in ("", None):
                continue
            args += ["--set", f"{section}.{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return args


def method_step(model, method, opt, step: int, micro_batches, clip: float = 1.0, check=None,
                autocast=None) -> tuple[list[float], bool]:
    """One optimizer step driving a method's hooks in train.train_step's order, on a bare model (method tests
    need no Run). micro_batches: [(x, y), ...]; check(where, step[, stepped]) is called after each hook group.
    Returns the micro-batch losses and whether the optimizer stepped."""
    import contextlib

    import torch

    method.on_step_start(step)
    method.flop_profile(step)
    if check:
        check("step_start", step)
    losses = []
    for x, y in micro_batches:
        with autocast or contextlib.nullcontext():
            _, loss = model(x, y)
        (loss / len(micro_batches)).backward()
        losses.append(loss.item())
    method.after_backward(step)
    if check:
        check("after_backward", step)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    stepped = method.before_optimizer_step(step, opt)
    if stepped:
        opt.step()
    method.after_optimizer_step(step, opt)
    if check:
        check("after_optimizer_step", step, stepped)
    opt.zero_grad(set_to_none=True)
    return losses, stepped


def check_pdl_against_plain(module, call, compare) -> None:
    """`call()` (it returns a list of tensors) with `module.USE_PDL` on, eagerly and as replays of one CUDA-graph
    capture, three times each, against one call with plain launches: `compare(got, want)` for every tensor."""
    from kernels.benchutil import capture

    old = module.USE_PDL
    try:
        module.USE_PDL = False
        want = call()
        module.USE_PDL = True
        graph, static = capture(call)
        for _ in range(3):
            eager = call()
            graph.replay()
            for got in (eager, static):
                for g, ref in zip(got, want, strict=True):
                    compare(g, ref)
    finally:
        module.USE_PDL = old


def attention_qkv(shape: tuple[int, int, int, int], model_layout: bool, **like):
    """(q, k, v) of shape (B, nh, T, hs): strided views of one (B, T, 3, nh, hs) tensor, as the model's c_attn split
    makes them, or contiguous copies. `like`: a generator, and the device and dtype to move to."""
    import torch

    B, H, T, D = shape
    gen = like.pop("generator", None)
    qkv = torch.randn(B, T, 3, H, D, generator=gen).to(**like)
    q, k, v = (qkv[:, :, n].transpose(1, 2) for n in range(3))
    return (q, k, v) if model_layout else tuple(x.contiguous() for x in (q, k, v))


def check_hsa_op_layouts(q, k, v, dout, stride: int, causal: int):
    """The HSA ops' real outputs against their fakes (what torch.compile plans with): the same shapes and strides.
    Returns the real (o, lse, (dq, dk, dv))."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kernels import hsa_attention as hsa

    q, k, v = (x.detach() for x in (q, k, v))
    o, lse = hsa._hsa_fwd_op(q, k, v, stride, causal)
    grads = hsa._hsa_bwd_op(q, k, v, o, lse, dout, stride, causal)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
        fo, flse = hsa._hsa_fwd_op(fq, fk, fv, stride, causal)
        fgrads = hsa._hsa_bwd_op(fq, fk, fv, fo, flse, mode.from_tensor(dout), stride, causal)
    assert (fo.shape, fo.stride(), flse.shape, flse.stride()) == (o.shape, o.stride(), lse.shape, lse.stride())
    assert [(g.shape, g.stride()) for g in fgrads] == [(g.shape, g.stride()) for g in grads]
    return o, lse, grads
