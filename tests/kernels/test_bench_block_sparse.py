"""kernels/bench_block_sparse.py: its rows in every timing mode on CUDA, checked against the fp32 reference; its
host-cost measurement on the CPU."""

import pytest

from kernels import bench_block_sparse as bench


@pytest.mark.gpu
def test_rows_in_every_mode():
    rows = []
    for mode in bench.MODES:
        rows += bench.bench_shape(256, 512, 2048, [64], [0.0, 0.75], warmup=1, reps=3, mode=mode)
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]]
    fwd_bwd = [r for r in rows if "fwd+bwd" in r["variant"]]
    assert {r["mode"] for r in fwd_bwd} == set(bench.MODES)
    assert len(fwd_bwd) == len(bench.MODES) * (2 + 2 * 3)  # per mode: 2 dense, 3 block-sparse per sparsity
    assert all(r["mode"] == "eager" for r in rows if "fwd+bwd" not in r["variant"])
    for r in fwd_bwd:  # graph rows: the grads of the last replay; compiled rows: of the custom ops' backward
        assert r["ms"] > 0 and r["host_ms"] > 0 and r["max_rel_err"] < bench.TOL, r
        if r["variant"].startswith("bs"):
            base = "dense fwd+bwd amp" if "amp" in r["variant"] else "dense fwd+bwd"
            dense = next(d for d in fwd_bwd if d["mode"] == r["mode"] and d["variant"] == base)
            assert r["dense_ms"] == dense["ms"] and r["speedup"] > 0


def test_host_cost_runs_the_compiled_triton_host_path_on_cpu():
    """The measurement compiles one graph (mask updates included) and goes through the Triton backend's launches:
    pack, forward, dX and dW per layer (an fp32 dW takes the atomics directly, no cast pass)."""
    result = bench.host_cost(n_layers=2, reps=2)
    assert result["graphs"] == 1 and result["launches_per_layer"] == 4
    assert result["host_us_per_layer"] > 0 and result["python_calls_per_layer"] > 0
