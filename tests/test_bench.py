"""bench.py on a tiny CPU config: the code path the GPU benchmark takes, with its output format (no speed claims)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(__file__))


def test_bench_cpu_writes_ratios_against_dense(tmp_path):
    cmd = [sys.executable, "bench.py", "--methods", "mst,sat", "--steps", "2", "--warmup", "1", "--out", str(tmp_path),
           "--tag", "t", "--set", "model.preset=tiny", "--set", "model.block_size=32", "--set", "model.vocab_size=256",
           "--set", "train.batch_size=2", "--set", "train.device=cpu", "--set", "train.steps=100",
           "--set", "mst.delta_t=5"]  # a method's own section reaches only that method
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(next(tmp_path.glob("bench-cpu-*-t.json")).read_text())
    rows = {r["method"]: r for r in payload["rows"]}
    assert list(rows) == ["dense", "mst", "sat"]
    for r in rows.values():
        assert {"method", "device", "config", "command", "torch", "tok_per_s", "mfu", "speedup", "ms_per_step",
                "peak_mem_gb", "flops_ratio"} <= set(r)
        assert r["tok_per_s"] > 0 and r["device"] == "cpu"
    assert rows["dense"]["speedup"] == 1.0 and rows["dense"]["flops_ratio"] == 1.0
    assert rows["mst"]["flops_ratio"] < 0.5  # the default MST schedule is ultra-sparse at 30% of the run
    assert "| mst |" in next(tmp_path.glob("bench-cpu-*-t.md")).read_text()


def test_bench_bad_method_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "bench.py", "--methods", "nope", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown method 'nope'" in result.stderr


def test_bench_variants_carry_their_own_overrides(tmp_path):
    cmd = [sys.executable, "bench.py", "--methods", "2of4,2of4:fp8=true+mvue=false", "--steps", "1", "--warmup",
           "1", "--out", str(tmp_path), "--tag", "v", "--set", "model.preset=tiny", "--set", "model.block_size=32",
           "--set", "model.vocab_size=256", "--set", "train.batch_size=2", "--set", "train.device=cpu",
           "--set", "train.steps=100", "--no-compile"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["method"]: r for r in json.loads(next(tmp_path.glob("bench-cpu-*-v.json")).read_text())["rows"]}
    assert list(rows) == ["dense", "2of4", "2of4:fp8=true+mvue=false"]
    assert rows["dense"]["kernel_report"] == {} and rows["2of4"]["kernel_report"] == {"gemm_plans": {}}  # CPU: ref
    # the FLOP count shows the variant's knobs: MVUE halves dW, fp8 (dense dW) does not
    assert rows["dense"]["flops_ratio"] > rows["2of4:fp8=true+mvue=false"]["flops_ratio"] > rows["2of4"]["flops_ratio"]
    bad = subprocess.run([sys.executable, "bench.py", "--methods", "2of4:fp8", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "method:key=value" in bad.stderr


def test_bench_whole_run_times_every_step_by_phase(tmp_path):
    cmd = [sys.executable, "bench.py", "--methods", "mst", "--whole-run", "--out", str(tmp_path), "--tag", "w",
           "--set", "model.preset=tiny", "--set", "model.block_size=32", "--set", "model.vocab_size=256",
           "--set", "train.batch_size=2", "--set", "train.device=cpu", "--set", "train.steps=30",
           "--set", "mst.delta_t=5", "--set", "mst.granularity=block", "--set", "mst.block_size=32"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["method"]: r for r in json.loads(next(tmp_path.glob("bench-cpu-*-w.json")).read_text())["rows"]}
    dense, mst = rows["dense"], rows["mst"]
    assert list(dense["per_phase"]) == ["all"] and dense["per_phase"]["all"]["steps"] == 30
    assert {p: d["steps"] for p, d in mst["per_phase"].items()} == {"warmup": 3, "sparse": 24, "restore": 3}
    for r in rows.values():
        assert len(r["step_ms"]) == 30 and r["graphs"] == 0 and r["warm_steps"] == []  # eager on the CPU
        assert r["autotune"] == {"timed": 0, "from_disk": 0}  # the reference kernels: nothing to tune
        assert r["gpu"] is None  # no GPU, nothing sampled (tools/gpu_monitor.py)
        assert r["steady_s"] == pytest.approx(r["wall_s"]) == pytest.approx(sum(r["step_ms"]) / 1e3, rel=1e-3)
        assert r["wall_speedup"] == pytest.approx(dense["wall_s"] / r["wall_s"])
    assert 0.1 < mst["flops_ratio"] < 0.5  # dense start and restoration end, ultra-sparse between
    md = next(tmp_path.glob("bench-cpu-*-w.md")).read_text()
    assert "| mst | 30 |" in md and md.count(" | – |") >= 2
    assert "| wall - steady s (step 0) |" in md
    assert f"| 0.0 ({dense['step_ms'][0] / 1e3:.1f}) |" in md  # eager on the CPU: nothing beyond the steady steps
