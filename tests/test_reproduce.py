"""tools/reproduce.py: the configs/small suite agrees with itself, runs resume and skip, the report's verdicts follow
the numbers, and the whole pipeline (train -> eval -> report) runs end to end at micro scale on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import make_dataset
from tools import reproduce as rp
from tools.flop_match import load_config as flop_config
from tools.flop_match import run_total_flops

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "small"


def test_small_configs_share_one_budget():
    plans = rp.plan_runs(rp.discover(CONFIGS, None), Path("out/x"), 1.0, [], "cpu", None)
    assert [p.name for p in plans] == list(rp.ORDER)
    tokens = {p.cfg.train.steps * p.cfg.train.batch_size * p.cfg.train.grad_accum * p.cfg.model.block_size
              for p in plans}
    assert len(tokens) == 1 and tokens.pop() <= 30_000_000
    flops = {name: run_total_flops(flop_config(CONFIGS / f"{name}.toml")) for name in ("dense", "tiny", "static",
                                                                                       "rigl", "mst")}
    assert flops["mst"] / flops["dense"] <= rp.MST_FLOPS
    # The equal-FLOPs baselines really are: matched within 1% before MST's restoration-staircase fix added 4.3% to
    # MST's FLOPs; left as they ran for results/reproduce-small, inside the report's 10% equal-FLOPs threshold.
    for name in ("tiny", "static", "rigl"):
        assert abs(flops[name] / flops["mst"] - 1) < 0.05, name


def test_configs_that_disagree_are_refused(tmp_path):
    for name, lr in (("dense", 1e-3), ("mst", 2e-3)):
        (tmp_path / f"{name}.toml").write_text(f'method = "{name}"\n[train]\nlr = {lr}\n')
    with pytest.raises(rp.ReproduceError, match="disagree on train"):
        rp.plan_runs(rp.discover(tmp_path, None), tmp_path, 1.0, [], "cpu", None)


def test_scale_shrinks_steps_and_method_intervals():
    (plan,) = rp.plan_runs(rp.discover(CONFIGS, "mst"), Path("out/x"), 0.01, ["2of4.mask_interval=3"], "cpu", None)
    assert plan.cfg.train.steps == 18 and plan.cfg.train.warmup_steps == 1
    assert plan.cfg.method_cfg.delta_t == 2  # floor 2: an update step skips the optimizer, so never every step
    assert not any(s.startswith("2of4.") for s in plan.sets)  # another method's section is not passed to MST


def _fake_ckpt(folder: Path, step: int, steps: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "config": {"train": {"steps": steps}}, "env": {}}, folder / "ckpt.pt")


def test_run_state(tmp_path):
    run = tmp_path / "run"
    assert rp.run_state(run, 10) == "fresh"
    _fake_ckpt(run, 4, 10)
    assert rp.run_state(run, 10) == "resume"
    _fake_ckpt(run, 9, 10)
    assert rp.run_state(run, 10) == "eval"
    (run / "eval.json").write_text("{}")
    assert rp.run_state(run, 10) == "eval"  # eval.json not written by `run` (no record of it in run.json)
    (run / "run.json").write_text(json.dumps({"commands": {"eval": "python eval.py"}}))
    assert rp.run_state(run, 10) == "done"
    with pytest.raises(rp.ReproduceError, match="another --scale"):
        rp.run_state(run, 20)


def _result(name: str, method: str, loss: float, flops: float, seconds: float) -> rp.Result:
    config = {"method": method, "train": {"steps": 10}, "model": {"n_layer": 1, "n_embd": 64, "block_size": 8}}
    first = {"step": 0, "tokens": 10, "val_loss": 10.0, "flops": flops / 10, "elapsed_s": 5.0}  # warm-up: not counted
    record = {"step": 9, "tokens": 100, "val_loss": loss, "flops": flops, "elapsed_s": 5.0 + seconds}
    return rp.Result(name, Path(name), config, [first, record])


def test_verdicts_follow_the_numbers():
    runs = {r.name: r for r in [
        _result("dense", "dense", 3.000, 100.0, 10.0),
        _result("mst", "mst", 3.020, 20.0, 12.0),      # 0.20 of dense FLOPs, +0.67% loss
        _result("static", "static", 3.100, 21.0, 9.0),  # worse than MST at equal FLOPs
        _result("rigl", "rigl", 3.010, 40.0, 9.0),      # better than MST, and not at equal FLOPs
        _result("2of4", "2of4", 3.050, 80.0, 8.0),      # +1.67%: over the 1% threshold, but faster
    ]}
    text = "\n".join(rp.claims(runs))
    line = lambda start: next(c for c in text.splitlines() if c.startswith(start))
    assert line("MST trains on").endswith("0.200 of dense → **held**")
    assert line("MST reaches dense quality").endswith("(+0.67%) → **held**")
    assert line("2:4 reaches dense quality").endswith("(+1.67%) → **not held**")
    assert line("static sparse is worse").endswith("**held**")
    assert "not an equal-FLOPs test" in line("RigL is worse") and line("RigL is worse").endswith("**not held**")
    assert line("2:4 trains faster").endswith("0.80x dense's time → **held**")
    assert "not tested: run sat missing" in line("SAT reaches")


def test_host_bound_caveat_reads_dense_mfu():
    def runs(mfu: float) -> dict[str, rp.Result]:
        dense = _result("dense", "dense", 3.0, 100.0, 10.0)
        dense.meta = {"env": {"device_name": "NVIDIA H100 80GB HBM3"}}
        for r in dense.records:
            r["mfu"] = mfu
        return {"dense": dense}

    assert any("host and kernel-launch overhead" in c and "12.0% MFU" in c for c in rp.caveats(runs(0.12)))
    assert not any("MFU" in c for c in rp.caveats(runs(0.40)))


def _write_eval_data(root: Path) -> Path:
    text = " = Sparse training = \n The dense model learns the token mask . \n The weight @-@ layer . \n"
    for rel in ("wikitext/wikitext-2/wiki.test.tokens", "ptb/ptb.test.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text * 4)
    (root / "lambada").mkdir()
    passages = ["the model trains on the sparse mask of the attention layer", "a dense gradient reaches the weight"]
    (root / "lambada" / "lambada_test.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    return root


@pytest.mark.slow
def test_micro_pipeline_end_to_end(tmp_path):
    data, evals = make_dataset(tmp_path), _write_eval_data(tmp_path / "eval")
    runs, dest = tmp_path / "runs", tmp_path / "report"
    args = ["run", "--micro", "--only", "dense,mst,2of4", "--scale", "0.005", "--device", "cpu", "--data-dir", data,
            "--out-root", runs, "--eval-data", evals, "--tasks", "wikitext2,ptb,lambada", "--eval-limit", "4",
            "--set", "model.block_size=32"]
    cli = CliRunner()
    r = cli.invoke(rp.app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    for name in ("dense", "mst", "2of4"):
        assert {"wikitext2", "ptb", "lambada"} <= json.loads((runs / name / "eval.json").read_text()).keys()
        assert torch.load(runs / name / "ckpt.pt", weights_only=False, mmap=True)["step"] == 8  # 0.005 x 1800 - 1
    mtime = (runs / "mst" / "ckpt.pt").stat().st_mtime
    r = cli.invoke(rp.app, [str(a) for a in args])
    assert r.exit_code == 0 and r.output.count("skipped (finished)") == 3, r.output
    assert (runs / "mst" / "ckpt.pt").stat().st_mtime == mtime

    r = cli.invoke(rp.app, ["report", "--out-root", str(runs), "--dest", str(dest)])
    assert r.exit_code == 0, r.output
    report = (dest / "REPORT.md").read_text()
    rows = [line.strip("| ").split(" | ") for line in report.splitlines() if line.startswith("| ")][1:]
    assert [row[:2] for row in rows] == [["dense", "dense"], ["mst", "mst"], ["2of4", "2of4"]]
    assert all(len(row) == 15 and "–" not in row[5:9] and row[14] == "cpu" for row in rows)  # WT2, PTB, LAMBADA
    assert rows[0][11] == "1.000" and float(rows[1][11]) < 1.0  # training FLOPs relative to dense
    assert "2:4 reaches dense quality" in report and "not tested: run sat missing" in report
    assert "Scaled runs (--scale 0.005)" in report and "python train.py --config configs/small/mst.toml" in report
    for png in ("loss.png", "mst.png", "2of4.png", "sparsity-mst.png", "flip-rate-2of4.png"):
        assert (dest / png).stat().st_size > 5000 and f"({png})" in report


def test_summary_records_follow_results_convention():
    dense, mst = _result("dense", "dense", 3.0, 100.0, 10.0), _result("mst", "mst", 3.1, 20.0, 12.5)
    mst.evals = {"wikitext2": {"ppl_word": 50.0}, "device": "cuda"}
    rows = {r["run"]: r for r in rp.summary({"dense": dense, "mst": mst})}
    assert {"method", "device", "config", "command", "torch", "tok_per_s", "mfu", "speedup"} <= set(rows["mst"])
    assert rows["mst"]["speedup"] == pytest.approx(10.0 / 12.5) and rows["mst"]["flops_ratio"] == pytest.approx(0.2)
    assert rows["mst"]["eval"] == {"wikitext2": {"ppl_word": 50.0}} and rows["dense"]["speedup"] == 1.0
