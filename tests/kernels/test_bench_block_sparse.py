"""kernels/bench_block_sparse.py on CUDA: its rows in every timing mode, checked against the fp32 reference."""

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
