"""Zero-shot evaluation of GPT-2-family models as in the GPT-2 paper (protocol: ../shared/research/eval.md).

    python eval.py --ckpt out/run1 --tasks lambada,wikitext2,wikitext103,ptb,1bw --data-dir ../shared/data
    python eval.py --init-from gpt2 --out results/gpt2.json     # OpenAI's weights (hub cache or a local HF folder)
    python eval.py --random-init gpt2 --tasks wikitext103 --time # timing only: random weights of GPT-2 124M's shape
    python eval.py export --ckpt out/run1 --out hf/run1          # a GPT2LMHeadModel folder for lm-eval & co.

Data files are looked up in --data-dir, then $SPT_EVAL_DATA, then the Hugging Face hub (data/evalsets.py).
Writes <out_dir>/eval.json: {task: {metric: value}, "ckpt", "tokens_scored", "stride", "dtype", "seconds", ...}.
Scoring (model/score.py): LAMBADA strict acc / acc_last_token / ppl per word / ppl per token; the corpora as one
stream each, EOT first, sliding window of the model's block size with stride S, ppl per word (the paper's) and
per token. Bad input (unknown task, missing file, a checkpoint that doesn't load) -> one line on stderr, exit 2.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from data.evalsets import CORPORA, ENV_VAR, TASKS, DataNotFound, lambada_examples, load_corpus, load_lambada
from data.tokenizer import get_tokenizer
from model.gpt import GPT, PRESETS, GPTConfig
from model.hf import GPT2_VOCAB, CheckpointError, export_hf, load_model
from model.score import perplexities, score_lambada, score_stream

OPENAI = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# GPT-2 paper, Table 3 (eval.md §0): LAMBADA ppl and acc, and ppl per word of the corpora.
PAPER = {
    name: {
        "lambada": {"ppl": lp, "acc": acc / 100},
        "wikitext2": {"ppl_word": wt2},
        "ptb": {"ppl_word": ptb},
        "wikitext103": {"ppl_word": wt103},
        "1bw": {"ppl_word": lm1b},
    }
    for name, (lp, acc, wt2, ptb, wt103, lm1b) in zip(
        OPENAI,
        [
            (35.13, 45.99, 29.41, 65.85, 37.50, 75.20),
            (15.60, 55.48, 22.76, 47.33, 26.37, 55.72),
            (10.87, 60.12, 19.93, 40.31, 22.05, 44.575),
            (8.63, 63.24, 18.34, 35.76, 17.48, 42.16),
        ],
        strict=True,
    )
}
SHOWN = {"lambada": ("acc", "acc_last_token", "ppl", "ppl_token")}  # table rows; the corpora show ppl_word, ppl_token

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
console = Console()


def fail(message: str) -> typer.Exit:
    """Bad input: one line on stderr and exit code 2 (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here")
    if dtype == "auto":  # bf16 autocast where the GPU has it; fp32 on CPU (eval.md §5)
        bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        return dev, torch.bfloat16 if bf16 else torch.float32
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    return dev, getattr(torch, dtype)


def build_model(ckpt: str | None, init_from: str | None, random_init: str | None, device: torch.device):
    """(model, info) from exactly one source; info names the tokenizer and the real vocab size."""
    if sum(x is not None for x in (ckpt, init_from, random_init)) != 1:
        raise ValueError("give exactly one of --ckpt, --init-from, --random-init")
    if ckpt is not None or init_from is not None:
        return load_model(ckpt or init_from, device)
    if random_init not in PRESETS:
        raise ValueError(f"--random-init must be one of {', '.join(PRESETS)}, got {random_init!r}")
    model = GPT(GPTConfig(preset=random_init, vocab_size=GPT2_VOCAB, bias=True))
    info = {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB, "eot": GPT2_VOCAB - 1, "path": f"random:{random_init}"}
    return model.to(device).eval(), info


def use_shared_tiktoken(data_dir: str | None) -> None:
    """The shared data layout carries a tiktoken cache (<dir>/tiktoken): use it offline unless one is set."""
    for d in (data_dir, os.environ.get(ENV_VAR)):
        if d and "TIKTOKEN_CACHE_DIR" not in os.environ and (Path(d) / "tiktoken").is_dir():
            os.environ["TIKTOKEN_CACHE_DIR"] = str(Path(d) / "tiktoken")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    ckpt: str = typer.Option(None, help="Our run: <out_dir> (reads ckpt.pt) or a .pt file."),
    init_from: str = typer.Option(
        None, help="OpenAI GPT-2 via transformers: gpt2|gpt2-medium|gpt2-large|gpt2-xl, or a local Hugging Face folder."
    ),
    random_init: str = typer.Option(None, help="TIMING ONLY: random weights of a preset's shape (e.g. gpt2)."),
    tasks: str = typer.Option(",".join(t for t in TASKS if t != "wikitext2_raw"), help=f"Comma list of {TASKS}."),
    data_dir: str = typer.Option(None, help=f"Folder with the eval files (then ${ENV_VAR}, then the HF hub)."),
    stride: int = typer.Option(None, help="Sliding-window stride S in tokens (default: min(256, block size))."),
    batch_size: int = typer.Option(16, help="Windows per forward pass (LAMBADA: 4x as many, shorter, passages)."),
    limit: int = typer.Option(None, help="Score only the first N passages (LAMBADA) / lines (corpora)."),
    device: str = typer.Option("auto", help="auto (cuda if available) | cpu | cuda | cuda:1 ..."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 autocast on GPU, float32 on CPU) | float32 | bfloat16."),
    out: Path = typer.Option(None, help="eval.json path (default: <out_dir>/eval.json with --ckpt; none otherwise)."),
    time_it: bool = typer.Option(False, "--time", help="Warm up before the clock and print throughput."),
) -> None:
    """Score a model zero-shot on LAMBADA, WikiText-2/103, PTB and 1BW."""
    if ctx.invoked_subcommand is not None:
        return
    t_start = time.perf_counter()
    try:
        task_list = [t.strip() for t in tasks.split(",") if t.strip()]
        unknown = [t for t in task_list if t not in TASKS]
        if unknown or not task_list:
            raise ValueError(f"unknown task {', '.join(unknown) or '(none)'}; choose from {', '.join(TASKS)}")
        if batch_size < 1 or (limit is not None and limit < 1):
            raise ValueError(f"--batch-size and --limit must be >= 1, got {batch_size} and {limit}")
        dev, amp = resolve_device(device, dtype)
        # Every file first, so a missing one fails before minutes of model loading and scoring.
        load = lambda t: load_lambada(data_dir, limit) if t == "lambada" else load_corpus(t, data_dir, limit)
        data = {t: load(t) for t in task_list}
        model, info = build_model(ckpt, init_from, random_init, dev)
        use_shared_tiktoken(data_dir)
        tok = get_tokenizer(info["tokenizer"])
        block = model.config.block_size
        stride = min(256, block) if stride is None else stride
        if not 1 <= stride <= block:
            raise ValueError(f"--stride must be in [1, block size {block}], got {stride}")
        if model.config.vocab_size < tok.vocab_size:
            raise ValueError(f"model vocab {model.config.vocab_size} < {tok.name} tokenizer's {tok.vocab_size}")
    except (ValueError, DataNotFound, CheckpointError, RuntimeError) as e:
        raise fail(str(e).splitlines()[0]) from None

    if time_it:  # CUDA context, cuBLAS handles and allocator growth are not the eval's cost
        warm = torch.zeros(batch_size, block, dtype=torch.long, device=dev)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp == torch.bfloat16):
            model(warm, warm)
        sync(dev)
    kw = dict(block_size=block, vocab_size=tok.vocab_size, device=dev, dtype=amp)
    results: dict[str, dict] = {}
    sources: dict[str, str] = {}
    for task in task_list:
        t0 = time.perf_counter()
        if task == "lambada":
            passages, source = data[task]
            m = score_lambada(model, lambada_examples(passages, tok.encode_batch), batch_size=4 * batch_size, **kw)
        else:
            s = data[task]
            source = s.source
            r = score_stream(model, [tok.eot, *tok.encode(s.text)], stride=stride, batch_size=batch_size, **kw)
            m = {**perplexities(r.nll, r.tokens, s.units), "tokens": r.tokens, "windows": r.windows}
            m |= {"units": s.units, "words": s.words, "lines": s.lines}
            canonical = CORPORA[task].canonical_units
            if limit is None and canonical is not None and s.units != canonical:
                console.print(f"[yellow]warning: {source} has {s.units} units, eval.md's file has {canonical}")
        sync(dev)
        m["seconds"] = time.perf_counter() - t0
        results[task] = m
        sources[task] = source

    report = {
        **results,
        "ckpt": info["path"],
        "tokens_scored": sum(results[t]["tokens"] for t in task_list),
        "stride": stride,
        "block_size": block,
        "dtype": str(amp).removeprefix("torch."),
        "device": str(dev),
        "tokenizer": tok.name,
        "limit": limit,
        "data": sources,
        "seconds": time.perf_counter() - t_start,
    }
    paper = PAPER.get(Path(init_from).name, {}) if init_from else {}  # a hub id, or a local copy named like one
    print_table(report, task_list, paper, time_it)
    if out is None and ckpt is not None:
        out = (Path(ckpt) if Path(ckpt).is_dir() else Path(ckpt).parent) / "eval.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {out}")


def print_table(report: dict, task_list: list[str], paper: dict, time_it: bool) -> None:
    """One row per (task, metric); accuracies in %; the paper's number beside ours for OpenAI's models."""
    title = f"{report['ckpt']}  (stride {report['stride']}, {report['dtype']}, {report['device']})"
    table = Table("task", "metric", "value", *(["GPT-2 paper"] if paper else []), "seconds", title=title)
    for task in task_list:
        m = report[task]
        for i, key in enumerate(SHOWN.get(task, ("ppl_word", "ppl_token"))):
            pct = 100 if key.startswith("acc") else 1
            ref = paper.get(task, {}).get(key)
            row = [task if i == 0 else "", key, f"{m[key] * pct:.2f}"]
            row += [f"{ref * pct:.2f}" if ref is not None else ""] if paper else []
            table.add_row(*row, f"{m['seconds']:.1f}" if i == 0 else "")
    console.print(table)
    console.print(f"{report['tokens_scored']:,} tokens scored in {report['seconds']:.1f} s")
    if time_it:
        for task in task_list:
            m = report[task]
            console.print(f"  {task}: {m['tokens'] / m['seconds']:,.0f} scored tokens/s ({m['seconds']:.2f} s)")


@app.command()
def export(
    ckpt: str = typer.Option(..., help="Our run: <out_dir> (reads ckpt.pt) or a .pt file."),
    out: Path = typer.Option(..., help="Folder to write (config.json + model.safetensors)."),
    keep_padded_vocab: bool = typer.Option(False, help="Keep e.g. 50304 rows instead of the tokenizer's 50257."),
) -> None:
    """Write one of our checkpoints as a Hugging Face GPT2LMHeadModel folder."""
    try:
        model, info = load_model(ckpt)
    except CheckpointError as e:
        raise fail(str(e)) from None
    export_hf(model, out, vocab_size=None if keep_padded_vocab else info["vocab_size"], eot=info["eot"])
    console.print(
        f"wrote {out} (tokenizer: {info['tokenizer']}; e.g. lm_eval --model hf "
        f"--model_args pretrained={out},tokenizer={'gpt2' if info['tokenizer'] == 'gpt2' else '...'})"
    )


if __name__ == "__main__":
    app()
