"""Zero-shot eval (eval.md): sliding windows, LAMBADA metrics, detokenizers, word counts, the eval.py CLI."""

from __future__ import annotations

import json
import math
import random
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from typer.testing import CliRunner

from data.evalsets import (
    ENV_VAR,
    DataNotFound,
    lambada_examples,
    lm1b_detokenize,
    load_corpus,
    load_lambada,
    ptb_detokenize,
    wikitext_detokenize,
)
from data.tokenizer import get_tokenizer
from model.gpt import GPT, GPTConfig
from model.score import perplexities, score_lambada, score_stream, sliding_windows

LM1B_FILE = "news.en.heldout-00000-of-00050"


def tiny_gpt(vocab: int = 64, block: int = 8) -> GPT:
    return GPT(GPTConfig(preset="tiny", block_size=block, vocab_size=vocab)).eval()


def full_context_nll(model: GPT, ids: list[int]) -> float:
    x = torch.tensor(ids)[None]
    with torch.no_grad():
        logits, _ = model(x[:, :-1], x[:, 1:])
    return F.cross_entropy(logits[0].double(), x[0, 1:], reduction="sum").item()


class Bigram(nn.Module):
    """logits = table[previous token]: its NLL can be computed by hand, independent of the window."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, idx, targets=None):
        return self.table[idx], None


class Oracle(nn.Module):
    """Reads the scored labels from `targets` (the scorer's contract) and puts a large logit on a chosen token."""

    def __init__(self, vocab: int, mode: str):
        super().__init__()
        self.vocab, self.mode = vocab, mode

    def forward(self, idx, targets):
        scored = targets >= 0
        t = targets.clamp(min=0)
        wrong = (t + 1) % self.vocab
        if self.mode == "right":
            want = t
        elif self.mode == "wrong":
            want = wrong
        else:  # "first_wrong": err only at the first token of multi-token targets
            first = scored & (scored.cumsum(1) == 1)
            want = torch.where(first & (scored.sum(1, keepdim=True) > 1), wrong, t)
        return 10.0 * F.one_hot(want, self.vocab).float(), None


class Uniform(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx, targets=None):
        return torch.zeros(*idx.shape, self.vocab), None


# ---- sliding window (eval.md §5, §6.3)


def test_window_example_T10_W4_S2():
    idx, scored = sliding_windows(10, 4, 2)
    assert idx.tolist() == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    targets = [(idx[k] + 1)[scored[k]].tolist() for k in range(len(idx))]
    assert targets == [[1, 2, 3, 4], [5, 6], [7, 8], [9]]


def test_window_properties_random():
    rng = random.Random(0)
    for _ in range(300):
        W = rng.randint(1, 12)
        S, T = rng.randint(1, W), rng.randint(2, 60)
        idx, scored = sliding_windows(T, W, S)
        assert len(idx) == 1 + math.ceil(max(T - 1 - W, 0) / S)
        targets = (idx + 1)[scored]
        assert sorted(targets.tolist()) == list(range(1, T))  # each target exactly once
        context = (torch.arange(idx.shape[1]) + 1).expand_as(idx)[scored]  # tokens the model sees, target excluded
        assert (context >= torch.clamp(targets, max=W - S + 1)).all()
        assert (idx[0] == torch.arange(idx.shape[1])).all() and (idx[1:, 0] - idx[:-1, 0] == S).all()


def test_window_rejects_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 5)


def test_stream_equals_full_context_when_it_fits():
    model = tiny_gpt(block=16)
    rng = random.Random(1)
    for _ in range(6):
        T, S = rng.randint(2, 17), rng.randint(1, 16)
        ids = [rng.randrange(64) for _ in range(T)]
        r = score_stream(model, ids, block_size=16, stride=S, vocab_size=64, batch_size=2)
        assert r.tokens == T - 1 and r.windows == 1
        assert r.nll == pytest.approx(full_context_nll(model, ids), rel=1e-5)


def test_ppl_hand_checkable_bigram():
    table = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    ids = [0, 1, 2, 2, 0, 2, 1, 0, 0, 1, 2]
    by_hand = [
        -math.log(math.exp(table[a][b].item()) / sum(math.exp(v) for v in table[a].tolist()))
        for a, b in zip(ids, ids[1:], strict=False)
    ]
    r = score_stream(Bigram(table), ids, block_size=4, stride=3, vocab_size=3, batch_size=2)
    assert r.tokens == len(by_hand)
    assert math.exp(r.nll / r.tokens) == pytest.approx(math.exp(sum(by_hand) / len(by_hand)), rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_stride_equal_block_is_non_overlapping_chunks(batch_size):
    model = tiny_gpt(block=8)
    ids = torch.randint(0, 64, (37,)).tolist()
    chunks = [ids[k : k + 9] for k in range(0, len(ids) - 1, 8)]  # inputs x[8k : 8k+8], labels shifted by one
    expected = sum(full_context_nll(model, c) for c in chunks)
    r = score_stream(model, ids, block_size=8, stride=8, vocab_size=64, batch_size=batch_size)
    assert r.windows == len(chunks) and r.tokens == len(ids) - 1
    assert r.nll == pytest.approx(expected, rel=1e-5)


def test_padded_vocab_is_sliced():
    ids = torch.randint(0, 50257, (40,)).tolist()
    r = score_stream(Uniform(50304), ids, block_size=16, stride=4, vocab_size=50257)
    assert math.exp(r.nll / r.tokens) == pytest.approx(50257, rel=1e-6)
    m = score_lambada(Uniform(50304), [([1, 2, 3], [4, 5]), ([7], [8])], block_size=16, vocab_size=50257)
    assert m["ppl_token"] == pytest.approx(50257, rel=1e-6)
    assert m["ppl"] == pytest.approx(math.exp(3 * math.log(50257) / 2), rel=1e-6)


def test_word_normalization_of_eval_md():  # §6.4
    p = perplexities(245_569 * math.log(30), tokens=278_365, units=245_569)
    assert round(p["ppl_word"], 2) == 30.00 and round(p["ppl_token"], 2) == 20.10


# ---- LAMBADA (eval.md §1, §6.5)


def toy_examples(n: int = 12, vocab: int = 64) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(2)
    return [
        ([rng.randrange(vocab) for _ in range(rng.randint(1, 9))], [rng.randrange(vocab) for _ in range(k)])
        for k in [1, 2, 3] * (n // 3)
    ]


@pytest.mark.parametrize("mode,acc,last", [("right", 1.0, 1.0), ("wrong", 0.0, 0.0), ("first_wrong", 1 / 3, 1.0)])
def test_lambada_oracles(mode, acc, last):
    m = score_lambada(Oracle(64, mode), toy_examples(), block_size=16, vocab_size=64, batch_size=5)
    assert m["acc"] == pytest.approx(acc) and m["acc_last_token"] == pytest.approx(last)
    assert m["passages"] == 12 and m["tokens"] == 24


def test_lambada_truncates_long_passages_to_the_block():
    model = tiny_gpt(block=8)
    ctx, tgt = torch.randint(0, 64, (20,)).tolist(), [5, 6]
    m = score_lambada(model, [(ctx, tgt)], block_size=8, vocab_size=64)
    seq = (ctx + tgt)[-9:]
    x = torch.tensor(seq)[None]
    with torch.no_grad():
        logp = model(x[:, :-1], x[:, 1:])[0][0, -2:].log_softmax(-1)
    assert m["ppl"] == pytest.approx(math.exp(-(logp[0, 5] + logp[1, 6]).item()), rel=1e-5)


def test_lambada_real_file(shared_data, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(Path(shared_data) / "tiktoken"))
    passages, _ = load_lambada(shared_data)
    examples = lambada_examples(passages, get_tokenizer("gpt2").encode_batch)
    lengths = Counter(len(t) for _, t in examples)
    assert len(examples) == 5153 and lengths == {1: 4010, 2: 913, 3: 205, 4: 17, 5: 4, 8: 3, 10: 1}
    # The oracle's verdict depends only on positions, so ids mod 2 keep the real file's structure at vocab 2.
    binary = [([c % 2 for c in ctx], [t % 2 for t in tgt]) for ctx, tgt in examples]
    m = score_lambada(Oracle(2, "first_wrong"), binary, block_size=1024, vocab_size=2, batch_size=512)
    assert m["acc"] == pytest.approx(4010 / 5153) and m["acc_last_token"] == 1.0
    m = score_lambada(Uniform(2), binary, block_size=1024, vocab_size=2, batch_size=512)
    assert m["tokens"] == 6573 and m["ppl_token"] == pytest.approx(2.0)
    assert m["ppl"] == pytest.approx(math.exp(6573 * math.log(2) / 5153))


# ---- detokenizers and word counts (eval.md §2-§4, §6.1, §6.2)


@pytest.mark.parametrize(
    "raw,detok",
    [
        (
            "The team scored 1 @,@ 000 points in 3 @.@ 5 games , and M @-@ 82 ( the road ) was closed .",
            "The team scored 1,000 points in 3.5 games, and M-82 (the road) was closed .",
        ),
        (
            'He said " hello world " to the players \' fans at 5 ° C .',
            'He said "hello world" to the players\' fans at 5°C .',
        ),
        (" = = = Early life = = = \n", " === Early life ===\n"),
        ("It 's the Beatles ' song ; what ? yes !", "It's the Beatles' song; what? yes !"),
    ],
)
def test_wikitext_detokenizer(raw, detok):
    assert wikitext_detokenize(raw) == detok


def test_ptb_detokenizer():
    raw = " no it was n't black monday \n the dow fell N points to $ N million \n"
    assert ptb_detokenize(raw) == " no it wasn't black monday\nthe dow fell 1 points to $1 million\n"


@pytest.mark.parametrize(
    "task,units,bpe", [("wikitext2", 245_569, 278_365), ("wikitext103", 245_569, None), ("ptb", 82_430, 100_650)]
)
def test_word_and_token_counts(shared_data, monkeypatch, task, units, bpe):
    stream = load_corpus(task, shared_data)
    assert stream.units == units
    if bpe is not None:
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(Path(shared_data) / "tiktoken"))
        assert len(get_tokenizer("gpt2").encode(stream.text)) == bpe


def write_lm1b(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "The company 's shares fell 3 % , to $ 12 , in early trading .",
        'He said : " We do n\'t know ( yet ) . "',
        "Markets closed higher on Friday .",
    ]
    (folder / LM1B_FILE).write_text("".join(line + "\n" for line in lines))
    return folder


def test_lm1b_file_and_detokenizer(tmp_path):
    stream = load_corpus("1bw", write_lm1b(tmp_path / "lm1b").parent)
    assert (stream.words, stream.lines, stream.units) == (35, 3, 38)
    assert stream.text == (
        "The company's shares fell 3 %, to $12, in early trading .\n"
        'He said: "We don\'t know (yet)."\n'
        "Markets closed higher on Friday .\n"
    )
    assert lm1b_detokenize("a ; b ? c \n") == "a; b? c\n"
    assert load_corpus("1bw", write_lm1b(tmp_path / "flat"), limit=2).units == 29 + 2  # the file directly in <dir>


def test_search_order_and_missing_file_message(tmp_path, monkeypatch):
    env_dir, arg_dir = write_lm1b(tmp_path / "env"), tmp_path / "arg"
    monkeypatch.setenv(ENV_VAR, str(env_dir))
    assert load_corpus("1bw").source == str(env_dir / LM1B_FILE)
    write_lm1b(arg_dir / "lm1b")
    assert load_corpus("1bw", arg_dir).source == str(arg_dir / "lm1b" / LM1B_FILE)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFound) as e:
        load_corpus("ptb", tmp_path / "empty")
    msg = str(e.value)
    assert "ptb.test.txt" in msg and "\n" not in msg
    for place in (tmp_path / "empty" / "ptb" / "ptb.test.txt", tmp_path / "nowhere" / "ptb.test.txt", "hf://"):
        assert str(place) in msg


def test_hub_fallback_rebuilds_the_files(tmp_path, monkeypatch):
    rows = {
        "EleutherAI/lambada_openai": ["He said\nhello there", "one two"],
        "Salesforce/wikitext": ["", " = A = \n", "", " b , c \n"],
        "ptb-text-only/ptb_text_only": ["a b", "c was n't"],
    }
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split: {"text": rows[name], "sentence": rows[name]})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.delenv(ENV_VAR, raising=False)
    passages, source = load_lambada(tmp_path)
    assert passages == rows["EleutherAI/lambada_openai"] and source.startswith("hf://")
    wt2 = load_corpus("wikitext2", tmp_path)
    assert (wt2.text, wt2.words, wt2.lines) == ("\n= A =\n\nb, c\n", 6, 4)
    ptb = load_corpus("ptb")
    assert (ptb.text, ptb.units) == (" a b\nc wasn't\n", 5 + 2)


# ---- the CLI on tiny checkpoints


def save_ckpt(folder: Path, tokenizer: str = "byte", vocab: int = 320, **model) -> Path:
    cfg = dict(preset="tiny", block_size=64, vocab_size=vocab, bias=False, dropout=0.0) | model
    gpt = GPT(GPTConfig(**cfg))
    real, eot = (256, 0) if tokenizer == "byte" else (50257, 50256)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": {"_orig_mod." + k: v for k, v in gpt.state_dict().items()},
            "config": {"model": cfg, "train": {"steps": 1}},
            "data_meta": {"tokenizer": tokenizer, "vocab_size": real, "eot": eot},
            "optimizer": {},
            "step": 1,
        },
        folder / "ckpt.pt",
    )
    return folder


def run_cli(*args: str):
    from eval import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_cli_writes_eval_json(shared_data, tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv(ENV_VAR, shared_data)  # LAMBADA/WT2/PTB from the shared dir, 1BW from --data-dir
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # recorded, so that the value eval.py sets is undone afterwards
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")  # eval.py finds <SPT_EVAL_DATA>/tiktoken itself
    run = save_ckpt(tmp_path / "run", tokenizer, vocab=320 if tokenizer == "byte" else 50304)
    data = write_lm1b(tmp_path / "data" / "lm1b").parent
    r = run_cli(
        "--ckpt",
        run,
        "--tasks",
        "lambada,wikitext2,ptb,1bw",
        "--data-dir",
        data,
        "--limit",
        "4",
        "--stride",
        "32",
        "--batch-size",
        "4",
    )
    assert r.exit_code == 0, r.output
    report = json.loads((run / "eval.json").read_text())
    assert {"lambada", "wikitext2", "ptb", "1bw", "ckpt", "tokens_scored", "stride", "dtype", "seconds"} <= set(report)
    assert {"acc", "acc_last_token", "ppl", "ppl_token"} <= set(report["lambada"])
    assert {"ppl_word", "ppl_token", "tokens", "units", "words"} <= set(report["ptb"])
    assert report["stride"] == 32 and report["dtype"] == "float32" and report["lambada"]["passages"] == 4
    assert report["tokens_scored"] == sum(report[t]["tokens"] for t in ("lambada", "wikitext2", "ptb", "1bw"))
    assert report["1bw"]["units"] == 38 and report["data"]["1bw"].startswith(str(data))
    vocab = 256 if tokenizer == "byte" else 50257  # a random model sits near uniform over the real vocab
    assert 0.5 * vocab < report["wikitext2"]["ppl_token"] < 2 * vocab


def bad_inputs(tmp_path: Path, shared: str) -> list[tuple[list, str]]:
    run = save_ckpt(tmp_path / "run")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    wrong = torch.load(save_ckpt(tmp_path / "wrong") / "ckpt.pt", weights_only=False)
    wrong["config"]["model"]["block_size"] = 128  # the weights have 64 positions
    torch.save(wrong, tmp_path / "wrong" / "ckpt.pt")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    return [
        (["--ckpt", run, "--tasks", "lambada,squad"], "unknown task squad"),
        (["--ckpt", run, "--tasks", "1bw", "--data-dir", tmp_path], LM1B_FILE),
        (["--ckpt", tmp_path / "junk.pt", "--tasks", "ptb", "--data-dir", shared], "cannot read"),
        (["--ckpt", tmp_path / "partial.pt", "--tasks", "ptb", "--data-dir", shared], "lacks"),
        (["--ckpt", tmp_path / "nothing", "--tasks", "ptb", "--data-dir", shared], "no checkpoint"),
        (["--ckpt", run, "--init-from", "gpt2", "--tasks", "ptb", "--data-dir", shared], "exactly one"),
        (["--ckpt", run, "--tasks", "ptb", "--data-dir", shared, "--stride", "65"], "--stride"),
        (["--ckpt", run, "--tasks", "ptb", "--data-dir", shared, "--limit", "0"], "--limit"),
        (["--ckpt", tmp_path / "wrong", "--tasks", "ptb", "--data-dir", shared], "does not load"),
        (["export", "--ckpt", tmp_path / "junk.pt", "--out", tmp_path / "hf"], "cannot read"),
    ]


def test_cli_bad_input_exits_2_with_one_line(shared_data, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(Path(shared_data) / "tiktoken"))  # eval.py would set it for good
    for args, expected in bad_inputs(tmp_path, shared_data):
        r = run_cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and expected in r.stderr, r.stderr
        assert "Traceback" not in r.output


@pytest.mark.gpu
def test_bf16_close_to_fp32_on_gpu():
    model = tiny_gpt(block=64).cuda()
    ids = torch.randint(0, 64, (500,)).tolist()
    kw = dict(block_size=64, stride=16, vocab_size=64, device="cuda")
    fp32 = score_stream(model, ids, dtype=torch.float32, **kw)
    bf16 = score_stream(model, ids, dtype=torch.bfloat16, **kw)
    assert bf16.nll == pytest.approx(fp32.nll, rel=5e-3)


@pytest.mark.gpu
def test_cli_on_gpu_uses_bf16(shared_data, tmp_path):
    run = save_ckpt(tmp_path / "run", "byte")
    r = run_cli("--ckpt", run, "--tasks", "lambada,ptb", "--data-dir", shared_data, "--limit", "20", "--stride", "16")
    assert r.exit_code == 0, r.output
    report = json.loads((run / "eval.json").read_text())
    assert report["dtype"] == "bfloat16" and report["device"].startswith("cuda")
    fp32 = run_cli(
        "--ckpt",
        run,
        "--tasks",
        "lambada,ptb",
        "--data-dir",
        shared_data,
        "--limit",
        "20",
        "--stride",
        "16",
        "--dtype",
        "float32",
        "--out",
        tmp_path / "fp32.json",
    )
    assert fp32.exit_code == 0, fp32.output
    ref = json.loads((tmp_path / "fp32.json").read_text())
    assert report["ptb"]["ppl_token"] == pytest.approx(ref["ptb"]["ppl_token"], rel=1e-2)
    assert report["lambada"]["ppl"] == pytest.approx(ref["lambada"]["ppl"], rel=1e-2)
