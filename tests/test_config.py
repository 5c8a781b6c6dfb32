import glob
import os

import pytest

from core.config import ConfigError, config_from_dict, load_config

ROOT = os.path.dirname(os.path.dirname(__file__))


def test_defaults_and_overrides():
    cfg = load_config(None, None, ["train.lr=3e-4", "model.preset=tiny", "train.compile=true", "log.wandb=false"])
    assert cfg.method == "dense" and cfg.train.lr == 3e-4 and cfg.model.n_layer == 2
    assert cfg.train.compile is True and cfg.log.wandb is False


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], "unknown key train.lrr; valid keys: out_dir"),
        (["train.lr=fast"], "train.lr: cannot read 'fast' as float"),
        (["train.steps=-3"], "train.steps must be positive"),
        (["bogus.x=1"], "unknown config section 'bogus'"),
        (["train.lr"], "--set expects section.key=value"),
        (["model.n_head=5"], "not a multiple"),
        (["train.dtype=fp8"], "train.dtype must be"),
        (["train.compile_scope=layers"], "train.compile_scope must be model or blocks"),
    ],
)
def test_bad_overrides_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_method():
    with pytest.raises(ConfigError, match="unknown method 'sparse'; choose one of: dense"):
        load_config(None, "sparse", [])


def test_toml_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlr = 'x'\n")
    with pytest.raises(ConfigError, match="train.lr: expected float"):
        load_config(bad)
    bad.write_text("[trian]\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"unknown config section \[trian\]"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.toml"))))
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    again = config_from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
