"""kernels/bench_sat.py: its rows on a tiny CPU config (the code path of the H100 run, no speed claims), and its
three timing modes against the masked dense reference on CUDA."""

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from kernels import bench_sat
from kernels.sliced_mlp import SlicedMLP, mlp_ref
from model.gpt import MLP, GPTConfig


def test_rows_on_cpu(tmp_path):
    out = tmp_path / "sat.json"
    record = bench_sat.Recorder(out, {"device": "cpu"}, budget_s=0.0)  # compiled items: skipped at once
    small = dict(device="cpu", tokens=(2, 16))
    bench_sat.mlp_rows([64], "eager", record, 2, **small)
    bench_sat.attn_rows([64], "compiled", record, 2, **small)
    bench_sat.train_steps("tiny", "eager", record, iters=2, **small)
    rows = json.loads(out.read_text())["results"]
    assert [(r["op"], r["keep"], r["mode"]) for r in rows] == [
        ("mlp", 1.0, "eager"), ("mlp", 0.5, "eager"), ("mlp", 0.25, "eager"),
        ("attn", 1.0, "compiled"), ("attn", 0.5, "compiled"), ("step", 1.0, "eager"), ("step", 0.5, "eager")]
    mlp, attn, steps = rows[:3], rows[3:5], rows[5:]
    assert all(r["ms"] > 0 and "error" not in r for r in mlp + steps)
    assert mlp[0]["speedup"] is None and all(r["speedup"] > 0 and r["max_rel_err"] < 2e-2 for r in mlp[1:])
    assert all(r["error"] == "skipped: time budget" for r in attn)
    assert steps[0]["flops_ratio"] == 1.0 and steps[1]["flops_ratio"] < 1.0
    assert steps[1]["sat/omission_rate"] == 0.5 and steps[1]["speedup"] > 0


def test_profile_rows_print_a_kernel_table_and_compile_mode_is_recorded(tmp_path, capsys):
    record = bench_sat.Recorder(tmp_path / "sat.json", {"device": "cpu"}, budget_s=0.0)
    record.profile_rows, record.compile_mode = 4, "max-autotune-no-cudagraphs"
    bench_sat.mlp_rows([64], "eager", record, 2, device="cpu", tokens=(2, 16))
    bench_sat.mlp_rows([64], "compiled", record, 2, device="cpu", tokens=(2, 16))
    out = capsys.readouterr().out
    assert out.count("CPU ops over 10 calls:") == 3 and "aten::" in out  # one table per timed eager row
    rows = record.rows
    assert [r.get("compile_mode") for r in rows] == [None] * 3 + ["max-autotune-no-cudagraphs"] * 3
    assert "[max-autotune-no-cudagraphs]" in out


def test_cli_rejects_unknown_presets():
    app = typer.Typer()
    app.command()(bench_sat.main)
    result = CliRunner().invoke(app, ["--steps-presets", "gpt2,nope"])
    assert result.exit_code == 2 and "steps-presets" in result.output



@pytest.mark.parametrize("args,what", [(["--ops", "mlp,ffn"], "--ops"), (["--widths", "768,abc"], "--widths")])
def test_cli_rejects_bad_module_options(args, what):
    app = typer.Typer()
    app.command()(bench_sat.main)
    result = CliRunner().invoke(app, ["--modules", "eager", *args])
    assert result.exit_code == 2 and what in result.output


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eager", "graph", "compiled"])
def test_modes_match_the_masked_dense_reference_cuda(mode):
    torch.manual_seed(0)
    d = 256
    mlp = MLP(GPTConfig(n_layer=1, n_head=4, n_embd=d, block_size=128, bias=True)).cuda()
    sliced = SlicedMLP(mlp)
    sliced.set_kept(torch.randperm(4 * d)[: 2 * d].sort().values)
    w = [mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias]
    x = torch.randn(4, 128, d, device="cuda", requires_grad=True)
    dy = torch.randn(4, 128, d, device="cuda", dtype=torch.bfloat16)
    call, results = bench_sat.fwd_bwd(sliced, x, dy, mode)
    for _ in range(2):
        with torch.no_grad():
            x.copy_(torch.randn_like(x))  # a replay reads the new input and rewrites every gradient
        call()
        got = results()
        assert bench_sat.rel_err(got, bench_sat.reference(mlp_ref, x, dy, w, sliced.kept)) < 2e-2
    dense_call, dense_results = bench_sat.fwd_bwd(mlp, x, dy, mode)
    dense_call()
    eager = bench_sat.reference(mlp_ref, x, dy, w, torch.arange(4 * d, device="cuda"))  # every channel kept
    assert bench_sat.rel_err(dense_results(), eager) < 2e-2


def test_whole_run_adds_up_the_rates_of_the_default_ladder(tmp_path):
    out = tmp_path / "sat.json"
    record = bench_sat.Recorder(out, {"device": "cpu"}, budget_s=1e9)
    bench_sat.whole_run_steps("tiny", "eager", record, device="cpu", tokens=(2, 16), iters=2, total=40)
    rows = json.loads(out.read_text())["results"]
    steps = [r for r in rows if r["op"] == "step"]
    runs = {r["schedule"]: r for r in rows if r["op"] == "whole_run"}
    # LORS at r0 = 0.5 in 4 rungs: 0.5, 0.375, 0.25, 0.125, then the dense last rung (and the dense warm-up)
    assert [r["method"] for r in steps] == ["dense"] + ["sat"] * 5
    assert [r["keep"] for r in steps] == [1.0, 0.5, 0.625, 0.75, 0.875, 1.0]
    assert all(r["ms"] > 0 and "error" not in r for r in steps)
    assert set(runs) == {"continual", "scratch"}
    ms = {1 - r["keep"]: r["ms"] for r in steps[1:]}
    for run in runs.values():
        n = {float(k): v for k, v in run["steps_at_rate"].items()}
        assert sum(n.values()) == 40
        assert run["speedup"] == pytest.approx(40 * steps[0]["ms"] / sum(c * ms[r] for r, c in n.items()))
    # by hand: r0 for half the span, then 4 rungs over the other half; scratch's span is 36 after 4 dense steps
    assert runs["continual"]["steps_at_rate"] == {"0.0": 5, "0.125": 5, "0.25": 5, "0.375": 5, "0.5": 20}
    assert runs["scratch"]["steps_at_rate"] == {"0.0": 4 + 4, "0.125": 5, "0.25": 4, "0.375": 5, "0.5": 18}
