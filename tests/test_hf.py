"""Hugging Face interop (model/hf.py): GPT-2 weights in, our checkpoints out, our ckpt.pt loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.hf import CheckpointError, export_hf, from_pretrained, load_model
from tests.test_eval import run_cli, save_ckpt

transformers = pytest.importorskip("transformers")


def tiny_hf(folder: Path, vocab: int = 300) -> Path:
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # HF inits biases and LayerNorms to 0/1; random values check that they are mapped
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0, 0.1 if name.endswith("bias") else 1.0)
    model.save_pretrained(folder)
    return folder


def hf_logits(folder: Path, x: torch.Tensor) -> torch.Tensor:
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(x).logits


def our_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x, x)[0]


def test_from_pretrained_local_folder_matches_hf(tmp_path):
    folder = tiny_hf(tmp_path / "hf")
    x = torch.randint(0, 300, (2, 32))
    theirs = hf_logits(folder, x)
    ours = from_pretrained(str(folder))
    assert ours.config.vocab_size == 300 and ours.config.bias and ours.config.block_size == 32
    torch.testing.assert_close(our_logits(ours, x), theirs, atol=1e-4, rtol=0)
    padded = our_logits(from_pretrained(str(folder), vocab_size=320), x)
    torch.testing.assert_close(padded[..., :300], theirs, atol=1e-4, rtol=0)
    assert (padded[..., 300:] == 0).all()


def test_from_pretrained_missing_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot load"):
        from_pretrained(str(tmp_path / "no-such-folder"))


@pytest.mark.parametrize("bias", [False, True])
def test_export_of_our_checkpoint_loads_in_hf(tmp_path, bias):
    model, info = load_model(save_ckpt(tmp_path / "run", "byte", vocab=320, bias=bias))
    assert info["tokenizer"] == "byte" and info["vocab_size"] == 256 and info["eot"] == 0 and info["step"] == 1
    x = torch.randint(0, 256, (2, 64))
    ours = our_logits(model, x)
    export_hf(model, tmp_path / "hf", vocab_size=info["vocab_size"], eot=info["eot"])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == 256 and config["n_positions"] == 64 and config["eos_token_id"] == 0
    torch.testing.assert_close(hf_logits(tmp_path / "hf", x), ours[..., :256], atol=1e-4, rtol=0)
    back = from_pretrained(str(tmp_path / "hf"), vocab_size=320)  # round trip, padded again
    torch.testing.assert_close(our_logits(back, x)[..., :256], ours[..., :256], atol=1e-4, rtol=0)
    _, hf_info = load_model(tmp_path / "hf")  # an exported byte model comes back with its tokenizer
    assert (hf_info["tokenizer"], hf_info["vocab_size"], hf_info["eot"]) == ("byte", 256, 0)


def test_cli_export(tmp_path):
    run = save_ckpt(tmp_path / "run", "byte", vocab=320)
    r = run_cli("export", "--ckpt", run, "--out", tmp_path / "hf")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 256
    r = run_cli("export", "--ckpt", run / "ckpt.pt", "--out", tmp_path / "hf-padded", "--keep-padded-vocab")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "hf-padded" / "config.json").read_text())["vocab_size"] == 320


def test_cli_init_from_local_folder(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(Path(shared_data) / "tiktoken"))
    folder = tiny_hf(tmp_path / "gpt2", vocab=50257)  # named like OpenAI's: the paper's numbers are shown beside
    out = tmp_path / "gpt2-eval.json"
    r = run_cli("--init-from", folder, "--tasks", "lambada", "--limit", "3", "--data-dir", shared_data, "--out", out)
    assert r.exit_code == 0, r.output
    assert "45.99" in r.output and "35.13" in r.output
    report = json.loads(out.read_text())
    assert report["ckpt"] == f"hf:{folder}" and report["lambada"]["passages"] == 3 and report["stride"] == 32


def test_load_model_of_a_hf_folder_and_of_nothing(tmp_path):
    model, info = load_model(tiny_hf(tmp_path / "hf", vocab=50257))
    assert info["tokenizer"] == "gpt2" and info["vocab_size"] == 50257 and info["eot"] == 50256
    assert info["config"]["model"]["n_layer"] == model.config.n_layer == 2
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_model(tmp_path / "missing" / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "empty")


def test_load_model_rejects_mismatched_weights(tmp_path):
    run = save_ckpt(tmp_path / "run")
    ckpt = torch.load(run / "ckpt.pt", weights_only=False)
    ckpt["model"].pop(next(iter(ckpt["model"])))
    torch.save(ckpt, run / "ckpt.pt")
    with pytest.raises(CheckpointError, match="does not load"):
        load_model(run)
