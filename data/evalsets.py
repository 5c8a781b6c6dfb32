"""Zero-shot evaluation sets of the GPT-2 paper: files, detokenizers and word counts (spec: shared/research/eval.md).

    LAMBADA      lambada/lambada_test.jsonl                 5153 passages; target = last ' '-separated word
    WikiText-2   wikitext/wikitext-2/wiki.test.tokens       <unk> kept; 245,569 units
    WikiText-103 wikitext/wikitext-103/wiki.test.tokens     same articles, fewer <unk>; 245,569 units
    WT2 raw      wikitext/wikitext-2-raw/wiki.test.raw      secondary (what lm-eval scores)
    PTB          ptb/ptb.test.txt                           Mikolov's version; 82,430 units
    1BW          lm1b/news.en.heldout-00000-of-00050        Transformer-XL's test shard; words + 1 per line

A file is looked up in `--data-dir`, then `$SPT_EVAL_DATA` (each as <dir>/<relpath> or <dir>/<filename>), then on
the Hugging Face hub through `datasets` (when installed and not offline). A "unit" is the GPT-2 paper's word:
whitespace tokens + 1 end-of-line per line, counted on the original (not detokenized) text (eval.md §2-§4).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "SPT_EVAL_DATA"


class DataNotFound(FileNotFoundError):
    """An evaluation file is in none of the places we look; the message names the file and every place."""


def wikitext_detokenize(s: str) -> str:
    """Megatron's / lm-eval's WikiText detokenizer, rules 1-9 of eval.md §2 in order (all occurrences)."""
    s = s.replace("s '", "s'")
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in ":;.!?,":
        s = s.replace(f" {p} ", f"{p} ")
    s = _unpad_brackets(s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}")
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ")
    return s.replace(" 's", "'s")


def _unpad_brackets(s: str) -> str:
    """Rule 4: drop the spaces just inside (), [], {}, "", '' pairs; non-greedy, so the nearest closing char."""
    for left, right in ("()", "[]", "{}", '""', "''"):
        lo, hi = re.escape(left), re.escape(right)
        s = re.sub(rf"{lo}\s*([^{hi}]*?)\s*{hi}", rf"{left}\1{right}", s)
    return s


def ptb_detokenize(s: str) -> str:
    """eval.md §3. ' N ' -> ' 1 ' keeps the leading space (Megatron's '1 ' glues the number to the word before)."""
    for old, new in ((" '", "'"), (" \n", "\n"), ("\n ", "\n"), (" n't", "n't"), (" N ", " 1 "), ("$ 1", "$1")):
        s = s.replace(old, new)
    return s.replace("# 1", "#1")


def lm1b_detokenize(s: str) -> str:
    """eval.md §4: the paper gives none; PTB rules, then WikiText rules 3 (punctuation), 4 (brackets), 9 (" 's")."""
    s = ptb_detokenize(s)
    for p in ":;.!?,":
        s = s.replace(f" {p} ", f"{p} ")
    return _unpad_brackets(s).replace(" 's", "'s")


def count_units(text: str) -> tuple[int, int]:
    """(whitespace words, lines) of the original text; the paper's unit count is their sum (<eos> per line)."""
    return len(text.split()), text.count("\n") + (0 if not text or text.endswith("\n") else 1)


@dataclass(frozen=True)
class Source:
    relpath: str
    """Path under a data directory; the bare file name is accepted too."""
    hf: tuple[str, str | None, str] | None
    """(dataset id, config, text field) of the test split on the Hugging Face hub; None = no faithful copy there."""
    rows_to_text: Callable[[list[str]], str]
    """Rebuilds the original file from the hub's rows (lines for text files, passages for LAMBADA)."""


@dataclass(frozen=True)
class Corpus:
    """A perplexity set: one stream, detokenized, scored with the sliding window (eval.md §5)."""

    source: Source
    detokenize: Callable[[str], str]
    canonical_units: int | None
    """eval.md's unit count of the full file; a different count means a different file (the eval warns)."""


def _wikitext_rows(rows: list[str]) -> str:
    return "".join(r or " \n" for r in rows)  # the hub keeps lines with their '\n' but blank lines as ''


LAMBADA = Source(
    "lambada/lambada_test.jsonl",
    ("EleutherAI/lambada_openai", "en", "text"),
    lambda rows: "".join(json.dumps({"text": r}) + "\n" for r in rows),
)
CORPORA: dict[str, Corpus] = {
    "wikitext2": Corpus(
        Source(
            "wikitext/wikitext-2/wiki.test.tokens", ("Salesforce/wikitext", "wikitext-2-v1", "text"), _wikitext_rows
        ),
        wikitext_detokenize,
        245_569,
    ),
    "wikitext103": Corpus(
        Source(
            "wikitext/wikitext-103/wiki.test.tokens",
            ("Salesforce/wikitext", "wikitext-103-v1", "text"),
            _wikitext_rows,
        ),
        wikitext_detokenize,
        245_569,
    ),
    "wikitext2_raw": Corpus(
        Source(
            "wikitext/wikitext-2-raw/wiki.test.raw",
            ("Salesforce/wikitext", "wikitext-2-raw-v1", "text"),
            _wikitext_rows,
        ),
        wikitext_detokenize,
        245_569,
    ),
    "ptb": Corpus(
        Source(
            "ptb/ptb.test.txt",
            ("ptb-text-only/ptb_text_only", "penn_treebank", "sentence"),
            lambda rows: "".join(f" {r} \n" for r in rows),
        ),
        ptb_detokenize,
        82_430,
    ),
    # The hub's `lm1b` test split is all 50 held-out shards, not this one (eval.md §4): local file only.
    "1bw": Corpus(Source("lm1b/news.en.heldout-00000-of-00050", None, "".join), lm1b_detokenize, None),
}
TASKS = ("lambada", *CORPORA)


def read_source(source: Source, data_dir: str | Path | None = None) -> tuple[str, str]:
    """(text, where it came from). Raises DataNotFound listing every place it looked."""
    looked = []
    for d in (data_dir, os.environ.get(ENV_VAR)):
        if not d:
            continue
        for path in (Path(d) / source.relpath, Path(d) / Path(source.relpath).name):
            if path.is_file():
                return path.read_text(encoding="utf-8"), str(path)
            looked.append(str(path))
    if not (data_dir or os.environ.get(ENV_VAR)):
        looked.append(f"(no --data-dir and ${ENV_VAR} unset)")
    if source.hf is None:
        looked.append("hub: no faithful copy on the Hugging Face hub")
    else:
        name, config, field = source.hf
        try:
            import datasets

            if not hasattr(datasets, "load_dataset"):  # a local folder named datasets/ shadows the package
                raise ImportError("the Hugging Face `datasets` package is not installed")
            rows = datasets.load_dataset(name, config, split="test")[field]
            return source.rows_to_text(rows), f"hf://{name}/{config}"
        except Exception as e:  # no `datasets`, offline, or the hub moved: all mean "not found here"
            why = (str(e).strip().splitlines() or [""])[0][:120]
            looked.append(f"hf://{name}/{config} ({type(e).__name__}: {why})")
    raise DataNotFound(f"{Path(source.relpath).name} not found; looked in: {'; '.join(looked)}")


def load_lambada(data_dir: str | Path | None = None, limit: int | None = None) -> tuple[list[str], str]:
    """(passages, source). Each passage is OpenAI's detokenized text; its last ' '-separated word is the target."""
    text, where = read_source(LAMBADA, data_dir)
    passages = [json.loads(line)["text"] for line in text.split("\n") if line.strip()]
    return passages[:limit], where


def lambada_examples(passages: list[str], encode_batch: Callable[[list[str]], list[list[int]]]):
    """[(context ids, target ids)]: split on the last ' ' (not any whitespace, eval.md §1), target keeps its space."""
    ctxs, words = zip(*(p.rsplit(" ", 1) for p in passages), strict=True)
    return list(zip(encode_batch(list(ctxs)), encode_batch([" " + w for w in words]), strict=True))


@dataclass(frozen=True)
class Stream:
    text: str
    """Detokenized text, scored as one stream."""
    words: int
    lines: int
    source: str

    @property
    def units(self) -> int:
        return self.words + self.lines


def load_corpus(task: str, data_dir: str | Path | None = None, limit: int | None = None) -> Stream:
    """A perplexity set, detokenized; `limit` keeps its first lines (units are counted on the same lines)."""
    corpus = CORPORA[task]
    text, where = read_source(corpus.source, data_dir)
    if limit is not None:
        text = "".join(re.findall(r".*\n|.+", text)[:limit])  # not splitlines(): it also splits at U+2028 etc.
    words, lines = count_units(text)
    return Stream(corpus.detokenize(text), words, lines, where)
