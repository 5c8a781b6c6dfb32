"""DDP with 2 gloo processes on the CPU: ranks train on different batches yet end every step with identical
weights and identical method state (masks, kept sets)."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import make_dataset

ROOT = os.path.dirname(os.path.dirname(__file__))


def run_ddp(tmp_path, method: str, steps: int, *overrides: str) -> list[list[dict]]:
    make_dataset(tmp_path)  # once, before the ranks start (they would race to write it)
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "tests/ddp_worker.py", str(tmp_path), method, str(steps), str(out), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, overrides",
    [
        ("dense", []),
        ("mst", ["mst.delta_t=2", "mst.stair_interval=2"]),
        ("2of4", ["2of4.mask_interval=2"]),
        ("sat", ["sat.warmup_frac=0.2", "sat.channel_multiple=16"]),
    ],
)
def test_ranks_agree_every_step(tmp_path, method, overrides):
    rank0, rank1 = run_ddp(tmp_path, method, 5, *overrides)
    assert len(rank0) == len(rank1) == 5
    for a, b in zip(rank0, rank1):
        assert a["weights"] == b["weights"]
        assert a["method"] == b["method"]
    assert rank0[0]["loss"] != rank1[0]["loss"]  # the ranks really saw different data
    assert len({s["weights"] for s in rank0}) == 5  # and the weights really moved
