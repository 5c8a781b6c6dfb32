"""sample.py, the plot tool, continual pretraining (--init-from) and wandb's offline mode."""

import os
import subprocess
import sys

import pytest

from core import checkpoint
from core.log import read_metrics
from tests.helpers import tiny_config
from tools.plot import plot_runs
from train import train

ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.fixture
def trained(tmp_path):
    cfg = tiny_config(tmp_path, overrides=["train.steps=20", "train.eval_interval=10"])
    train(cfg)
    return cfg


def test_sample_cli(trained):
    cmd = [
        sys.executable,
        "sample.py",
        "--ckpt",
        trained.train.out_dir,
        "--prompt",
        "the",
        "-n",
        "2",
        "--max-new-tokens",
        "30",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- sample") == 2 and result.stdout.count("the") >= 2
    bad = subprocess.run(
        [sys.executable, "sample.py", "--ckpt", "/nonexistent"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_plot_writes_loss_and_method_figures(trained, tmp_path):
    mst = tiny_config(tmp_path / "m", "mst", ["train.steps=12", "mst.delta_t=3", "mst.stair_interval=3"])
    train(mst)
    written = plot_runs([tmp_path / "run", tmp_path / "m" / "run"], tmp_path / "plots")
    names = {p.name for p in written}
    assert {"loss.png", "mst.png"} <= names and all(p.stat().st_size > 10_000 for p in written)
    with pytest.raises(FileNotFoundError, match="no metrics"):
        plot_runs([tmp_path / "nothing"], tmp_path / "plots2")


def test_init_from_our_checkpoint_continues_with_fresh_optimizer(trained, tmp_path):
    first = read_metrics(trained.train.out_dir)
    cfg = tiny_config(
        tmp_path / "b",
        "sat",
        ["train.steps=4", f"train.init_from={trained.train.out_dir}", "sat.warmup_frac=0.5", "sat.channel_multiple=16"],
    )
    train(cfg)
    again = read_metrics(cfg.train.out_dir)
    assert again[0]["train_loss"] < first[0]["train_loss"] - 0.3  # starts from the trained weights
    assert checkpoint.load(cfg.train.out_dir)["step"] == 3  # its own schedule, from step 0


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config(tmp_path, overrides=["train.steps=3", "log.wandb=true", "log.wandb_run_name=offline-test"])
    train(cfg)
    run_dir = tmp_path / "run"
    assert (run_dir / "wandb_id").is_file()
    assert any((run_dir / "wandb").glob("offline-run-*"))


def test_mst_update_counts_reach_the_log_between_log_steps(tmp_path):
    cfg = tiny_config(
        tmp_path,
        "mst",
        ["train.steps=12", "train.log_interval=2", "train.eval_interval=12", "mst.delta_t=3", "mst.stair_interval=3"],
    )
    train(cfg)
    updates = [r for r in read_metrics(cfg.train.out_dir) if "mst/flip_rate" in r]
    assert [r["mst/update_step"] for r in updates] == [3.0, 6.0, 9.0]  # steps 3 and 9 are not log steps
    assert [r["step"] for r in updates] == [4, 6, 10]
    assert all(r["mst/pruned"] >= 0 and 0 <= r["mst/flip_rate"] <= 1 for r in updates)
