"""Sample text from a trained model.

    python sample.py --ckpt out/demo --prompt "def main(" --num-samples 2 --max-new-tokens 200
"""

from __future__ import annotations

import sys

import torch
import typer
from rich.console import Console

from data.tokenizer import get_tokenizer

console = Console(stderr=True, highlight=False, soft_wrap=True)
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def main(
    ckpt: str = typer.Option(..., "--ckpt", help="a run folder (with ckpt.pt), a ckpt.pt file, or gpt2/gpt2-medium/.."),
    prompt: str = typer.Option("\n", help="text to continue ('\\n' by default)"),
    num_samples: int = typer.Option(1, "--num-samples", "-n", min=1, help="independent samples"),
    max_new_tokens: int = typer.Option(200, min=1, help="tokens generated per sample"),
    temperature: float = typer.Option(0.8, min=0.0, help="softmax temperature (0 = greedy)"),
    top_k: int | None = typer.Option(200, min=1, help="sample among the k most likely tokens"),
    seed: int = typer.Option(1337, help="sampling seed"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    """Generate num_samples continuations of prompt with a trained checkpoint."""
    from model.hf import load_model  # noqa: PLC0415

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto"
                       else device)
    try:
        model, info = load_model(ckpt, dev)
        tok = get_tokenizer(info.get("tokenizer", "gpt2"))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    model.eval()
    ids = tok.encode(prompt) or [tok.eot]
    x = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    with ctx:
        out = model.generate(x, max_new_tokens, temperature, top_k, vocab_limit=tok.vocab_size, generator=gen)
    for i, row in enumerate(out.tolist()):
        print(f"--- sample {i + 1}/{num_samples}")
        print(tok.decode(row))


if __name__ == "__main__":
    sys.exit(app())
