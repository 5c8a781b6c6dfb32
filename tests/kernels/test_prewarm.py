"""kernels/prewarm.py: specs, the child processes' command line, and one spec of each kind run in the interpreter."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels import prewarm
from tests.interpreted import ROOT, check_interpreted

BLOCK = {"kind": "block_sparse", "out": 96, "in": 64, "block": 32, "blocks": 3, "dw_density": 0.5, "tokens": 48}
HSA = {"kind": "hsa", "batch": 1, "heads": 2, "T": 40, "head_dim": 16, "stride": 8}


@pytest.mark.parametrize(
    "spec, match",
    [({"kind": "conv"}, "kind must be one of"), ({"kind": "hsa", "T": 4}, "lacks batch, heads, head_dim, stride"),
     ({k: v for k, v in BLOCK.items() if k != "dw_density"}, "block_sparse lacks dw_density")],
)
def test_check_names_what_is_wrong(spec, match):
    prewarm.check(BLOCK)
    prewarm.check(HSA)
    with pytest.raises(ValueError, match=match):
        prewarm.check(spec)


@pytest.mark.parametrize("arg", ["{not json", json.dumps({"kind": "conv"})])
def test_cli_rejects_a_bad_spec_in_one_line(arg):
    proc = subprocess.run([sys.executable, "-m", "kernels.prewarm", arg], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_spawn_starts_one_child_per_distinct_spec_on_the_runs_gpu(monkeypatch):
    started = []

    class FakePopen:
        def __init__(self, args, cwd, env, stdout, stderr):
            started.append((args, env.get("CUDA_VISIBLE_DEVICES")))

    monkeypatch.setattr(prewarm.subprocess, "Popen", FakePopen)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    children = prewarm.spawn([BLOCK, dict(reversed(BLOCK.items())), HSA], torch.device("cuda", 1))
    assert len(children) == 2 == len(started)
    assert [json.loads(a[-1]) for a, _ in started] == [BLOCK, HSA]
    assert all(a[:3] == [sys.executable, "-m", "kernels.prewarm"] and gpu == "5" for a, gpu in started)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    prewarm.spawn([HSA], torch.device("cuda", 1))
    assert started[-1][1] == "1"
    with pytest.raises(ValueError, match="kind"):
        prewarm.spawn([{"kind": "conv"}], torch.device("cuda"))


_INTERPRETED = textwrap.dedent(
    f"""
    import tests.triton_interp  # noqa: F401  (interpreter on, numpy shim)
    from kernels import prewarm

    prewarm.run({BLOCK!r}, "cpu")
    prewarm.run({HSA!r}, "cpu")
    print("ok")
    """
)


@pytest.mark.slow
def test_each_kind_runs_its_kernels_in_the_interpreter():
    pytest.importorskip("triton")
    check_interpreted(_INTERPRETED)


_TAKES_PICKS = textwrap.dedent(
    """
    import json, sys
    from triton.runtime.autotuner import Autotuner
    from kernels import block_sparse as bs, prewarm

    def no_timing(self, *args, **kwargs):
        raise AssertionError(f"{self.base_fn.__name__} timed configs another process had picked")

    Autotuner._bench = no_timing
    prewarm.run(json.loads(sys.argv[1]), "cuda")
    tuners = (bs._bsr_mm_kernel, bs._sddmm_kernel, bs._sddmm_tma_kernel)
    print(json.dumps({t.base_fn.__name__: len(t.cache) for t in tuners}))
    """
)


@pytest.mark.gpu
def test_a_later_process_takes_the_prewarm_childs_autotune_picks(tmp_path):
    """The run after a prewarm child times nothing: the child's picks come from the disk (kernels/autotune.py)."""
    spec = {"kind": "block_sparse", "out": 3072, "in": 768, "block": 64, "blocks": 58, "dw_density": 0.1,
            "tokens": 16384}  # fmt: skip
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "kernels.prewarm", json.dumps(spec)], cwd=ROOT, env=env, check=True)
    proc = subprocess.run([sys.executable, "-c", _TAKES_PICKS, json.dumps(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    tuned = json.loads(proc.stdout.strip().splitlines()[-1])
    assert tuned["_bsr_mm_kernel"] == 2  # forward and dX, each from the disk
    assert tuned["_sddmm_kernel"] + tuned["_sddmm_tma_kernel"] == 1
