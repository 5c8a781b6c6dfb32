import gzip
import json
import lzma

import numpy as np
import pytest
import torch

from data.loader import TokenData
from data.prepare import prepare, read_local, read_stdlib
from data.tokenizer import get_tokenizer


def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("byte")
    ids = tok.encode("héllo\x00 world")
    assert tok.eot == 0 and 0 not in ids and tok.decode(ids) == "héllo world"


def test_gpt2_tokenizer_offline(shared_data, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", f"{shared_data}/tiktoken")
    tok = get_tokenizer("gpt2")
    assert tok.encode("hello world") == [31373, 995] and tok.eot == 50256 and tok.vocab_size == 50257


def test_compressed_jsonl_and_text_sources_share_one_path(tmp_path):
    docs = [f"document number {i} " * 5 for i in range(10)]
    (tmp_path / "src").mkdir()
    with lzma.open(tmp_path / "src" / "a.jsonl.xz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:5])
    with gzip.open(tmp_path / "src" / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[5:8])
    (tmp_path / "src" / "c.txt").write_text(docs[8])
    (tmp_path / "src" / "d.txt.gz").write_bytes(gzip.compress(docs[9].encode()))
    assert sorted(read_local(tmp_path / "src")) == sorted(docs)


def test_prepare_writes_memmaps_with_eot_between_documents(tmp_path):
    src = tmp_path / "docs.jsonl"
    docs = [f"doc{i} " + "x" * i for i in range(1, 21)]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare(str(src), tmp_path / "out", tokenizer="byte", val_fraction=0.1, seed=3)
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    assert meta["val_documents"] == 2 and meta["documents"] == 20
    assert (train == 0).sum() == 18 and (val == 0).sum() == 2 and train[-1] == 0
    text = bytes(np.concatenate([train, val]).astype(np.uint8)).decode()
    assert sorted(text.split("\x00")[:-1]) == sorted(docs)
    again = prepare(str(src), tmp_path / "out2", tokenizer="byte", val_fraction=0.1, seed=3)
    assert again == {**meta} and np.array_equal(train, np.fromfile(tmp_path / "out2" / "train.bin", dtype=np.uint16))


def test_max_tokens_and_bad_inputs(tmp_path):
    src = tmp_path / "docs.txt"
    src.write_text("abc " * 100)
    with pytest.raises(ValueError, match="at least 2"):
        prepare(str(src), tmp_path / "o", tokenizer="byte")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no corpus files"):
        prepare(str(tmp_path / "empty"), tmp_path / "o2", tokenizer="byte")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        list(read_local(bad))


def test_stdlib_corpus_is_there():
    first = next(read_stdlib())
    assert len(first) > 0


def test_batches_are_a_function_of_position(tmp_path):
    from tests.helpers import make_dataset

    path = make_dataset(tmp_path)
    a = TokenData(path, block_size=16, batch_size=4, seed=7)
    b = TokenData(path, block_size=16, batch_size=4, seed=7)
    x1, y1 = a.batch("train", 5, 1)
    x2, y2 = b.batch("train", 5, 1)
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(x1, a.batch("train", 6, 1)[0])
    assert not torch.equal(x1, TokenData(path, 16, 4, seed=7, rank=1).batch("train", 5, 1)[0])
    with pytest.raises(FileNotFoundError, match="data.prepare"):
        TokenData(tmp_path / "nowhere", 16, 4, 0)
