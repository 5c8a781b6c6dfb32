"""Tokenize a corpus into uint16 memmaps for training: <out>/train.bin, <out>/val.bin and <out>/meta.json.

    python -m data.prepare stdlib --out tokens/stdlib --tokenizer byte          # built-in, no download
    python -m data.prepare ../shared/data/pretrain/enwiki_pages --out tokens/enwiki --max-tokens 30000000
    python -m data.prepare openwebtext --out tokens/owt                          # a Hugging Face dataset id
    python -m data.prepare wikitext:wikitext-103-raw-v1 --out tokens/wt103       # id:config

Every source goes through one path: a stream of documents (strings), shuffled with a seed, the first
`val_fraction` of them held out for validation, each followed by the end-of-text token.
Local sources: a file or a folder of files (.txt, .md, .py, .jsonl, .json lines), plain or compressed
(.gz, .xz, .bz2). A .txt/.md/.py file is one document; a JSONL line is one document (its `text` field).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import typer
from rich.console import Console

from data.tokenizer import TOKENIZERS, get_tokenizer

console = Console(stderr=True, soft_wrap=True)
TEXT_SUFFIXES = {".txt", ".md", ".py", ".text"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}


def _split_suffix(path: Path) -> tuple[str, str]:
    """('.jsonl', '.xz') for shard00.jsonl.xz; ('.txt', '') for a.txt."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in OPENERS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), ""


def _is_corpus_file(path: Path) -> bool:
    kind, _ = _split_suffix(path)
    return path.is_file() and (kind in TEXT_SUFFIXES or kind in JSONL_SUFFIXES)


def read_local(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a local file or folder (sorted, so the order before shuffling is reproducible)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if _is_corpus_file(p))
    if not files:
        raise FileNotFoundError(f"no corpus files (.txt/.md/.py/.jsonl, optionally .gz/.xz/.bz2) under {path}")
    for f in files:
        kind, comp = _split_suffix(f)
        opener = OPENERS.get(comp, open)
        with opener(f, "rt", encoding="utf-8", errors="replace") as fh:
            if kind in JSONL_SUFFIXES:
                for line_no, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)[text_field]
                        except (json.JSONDecodeError, KeyError) as e:
                            raise ValueError(f"{f}:{line_no}: not a JSON object with a {text_field!r} field") from e
            else:
                yield fh.read()


def read_stdlib() -> Iterator[str]:
    """The built-in default corpus: the Python standard library's own source, shipped with every Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
    for f in sorted(root.rglob("*.py")):
        if not skip.intersection(f.relative_to(root).parts):
            yield f.read_text(encoding="utf-8", errors="replace")


def read_hf(spec: str, split: str, text_field: str, seed: int) -> Iterator[str]:
    """A Hugging Face dataset 'id' or 'id:config' (needs `datasets` and network or a local HF cache)."""
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError(f"{spec!r} is not a local path; reading it from the hub needs `pip install datasets`") from e
    name, _, config = spec.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split)
    for row in ds.shuffle(seed=seed):
        yield row[text_field]


def documents(source: str, split: str, text_field: str, seed: int) -> Iterator[str]:
    if source == "stdlib":
        return read_stdlib()
    if os.path.exists(source):
        return read_local(Path(source), text_field)
    return read_hf(source, split, text_field, seed)


def prepare(
    source: str,
    out: Path,
    tokenizer: str = "gpt2",
    val_fraction: float = 0.005,
    seed: int = 1337,
    max_tokens: int | None = None,
    text_field: str = "text",
    split: str = "train",
    batch_docs: int = 512,
) -> dict:
    """Tokenize `source` into `out`; returns the metadata written to meta.json."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    tok = get_tokenizer(tokenizer)
    if tok.vocab_size > 2**16:
        raise ValueError(f"vocab of {tok.vocab_size} does not fit uint16")
    docs = [d for d in documents(source, split, text_field, seed) if d.strip()]
    if len(docs) < 2:
        raise ValueError(f"{source}: need at least 2 non-empty documents, found {len(docs)}")
    random.Random(seed).shuffle(docs)
    n_val = max(1, round(len(docs) * val_fraction))
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, part in (("val", docs[:n_val]), ("train", docs[n_val:])):
        tmp = out / f"{name}.bin.tmp"
        n = 0
        with open(tmp, "wb") as fh:
            for i in range(0, len(part), batch_docs):
                ids = tok.encode_batch(part[i : i + batch_docs])
                arr = np.fromiter((t for doc in ids for t in (*doc, tok.eot)), dtype=np.uint16)
                if max_tokens and name == "train" and n + len(arr) > max_tokens:
                    arr = arr[: max_tokens - n]
                arr.tofile(fh)
                n += len(arr)
                console.print(f"[dim]{name}: {min(i + batch_docs, len(part))}/{len(part)} docs, {n:,} tokens[/dim]")
                if max_tokens and name == "train" and n >= max_tokens:
                    break
        os.replace(tmp, out / f"{name}.bin")
        counts[name] = n
    meta = {
        "source": source,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "eot": tok.eot,
        "dtype": "uint16",
        "seed": seed,
        "documents": len(docs),
        "val_documents": n_val,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def main(
    source: str = typer.Argument(..., help="'stdlib' (built-in), a local file/folder, or a HF dataset id[:config]"),
    out: Path = typer.Option(..., "--out", help="output folder for train.bin, val.bin, meta.json"),
    tokenizer: str = typer.Option("gpt2", help=f"one of {', '.join(TOKENIZERS)} ('byte' needs no BPE files)"),
    val_fraction: float = typer.Option(0.005, help="fraction of documents held out for validation"),
    seed: int = typer.Option(1337, help="seed of the document shuffle"),
    max_tokens: int | None = typer.Option(None, help="stop the train split after this many tokens"),
    text_field: str = typer.Option("text", help="JSON/HF field holding the document text"),
    split: str = typer.Option("train", help="HF split to read"),
) -> None:
    """Tokenize a corpus into uint16 memmaps (train.bin / val.bin) plus meta.json."""
    try:
        meta = prepare(source, out, tokenizer, val_fraction, seed, max_tokens, text_field, split)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    console.print(
        f"wrote {out}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
        f"({meta['documents']:,} documents, tokenizer {meta['tokenizer']})"
    )


if __name__ == "__main__":
    typer.run(main)
