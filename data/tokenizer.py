"""Tokenizers: GPT-2 BPE through tiktoken, and a 256-symbol byte tokenizer for runs without BPE files.

Offline, tiktoken reads the BPE files from `$TIKTOKEN_CACHE_DIR` (files named by the sha1 of their URL); when
they are missing there and there is no network, `get_tokenizer("gpt2")` fails with a message naming the fix.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

TOKENIZERS = ("gpt2", "byte")


@dataclass(frozen=True)
class Tokenizer:
    name: str
    vocab_size: int
    eot: int
    """The end-of-text id put between documents (GPT-2's <|endoftext|> = 50256; 0 = NUL for bytes)."""
    _encode: Callable[[str], list[int]]
    _decode: Callable[[list[int]], str]
    _encode_batch: Callable[[list[str]], list[list[int]]] | None = None

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._encode_batch(texts) if self._encode_batch else [self._encode(t) for t in texts]


def _gpt2() -> Tokenizer:
    import tiktoken

    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests/OSError/ValueError depending on what is missing
        where = os.environ.get("TIKTOKEN_CACHE_DIR", "(TIKTOKEN_CACHE_DIR not set)")
        raise RuntimeError(
            f"cannot load the GPT-2 BPE ({type(e).__name__}); offline, point TIKTOKEN_CACHE_DIR at a tiktoken "
            f"cache holding the gpt2 files (looked in {where}), or use the 'byte' tokenizer"
        ) from e
    return Tokenizer(
        name="gpt2",
        vocab_size=enc.n_vocab,
        eot=enc.eot_token,
        _encode=lambda s: enc.encode_ordinary(s),
        _decode=lambda ids: enc.decode(ids),
        _encode_batch=lambda texts: enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1),
    )


def _byte() -> Tokenizer:
    return Tokenizer(
        name="byte",
        vocab_size=256,
        eot=0,
        _encode=lambda s: list(s.replace("\x00", "").encode("utf-8")),
        _decode=lambda ids: bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace"),
    )


def get_tokenizer(name: str) -> Tokenizer:
    if name == "gpt2":
        return _gpt2()
    if name == "byte":
        return _byte()
    raise ValueError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZERS)}")
