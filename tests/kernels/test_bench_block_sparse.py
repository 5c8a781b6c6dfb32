"""kernels/bench_block_sparse.py: its rows in every timing mode on CUDA, checked against the fp32 reference; its
host-cost measurement on the CPU."""

import pytest
import torch

from kernels import bench_block_sparse as bench


@pytest.mark.gpu
def test_rows_in_every_mode():
    rows = []
    for mode in bench.MODES:
        rows += bench.bench_shape(256, 512, 2048, [64], [0.0, 0.75], warmup=1, reps=3, mode=mode, copy_speed=3e3)
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
            if "dense_wgrad" not in r["variant"]:  # its dense dW has no block floor
                assert r["of_floor"] > 0 and r["speedup_at_floor"] == pytest.approx(r["dense_ms"] / r["floor_ms"])


def test_floor_bytes_by_hand():
    """W has 2x3 blocks of 2x2, one on (row 0, col 0); 4 tokens. Only X's column block 0 and dY's row block 0 are
    read; Y, dX and the full-size dW are written whole."""
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[0, 0] = True
    bf16 = bench.floor_bytes(mask, block=2, tokens=4, amp=False)
    # x_used = dy_used = 4 tokens * 2 cols * 2 B = 16; packed = 4 elements * 2 B = 8
    assert bf16 == {"pack": 16, "fwd": 16 + 8 + 4 * 4 * 2, "dx": 16 + 8 + 4 * 6 * 2, "dw": 32 + 24 * 2,
                    "total": 16 + 56 + 72 + 80}  # fmt: skip
    amp = bench.floor_bytes(mask, block=2, tokens=4, amp=True)  # fp32 masters: read as fp32, dW written in fp32
    assert amp["pack"] == 16 + 8 and amp["dw"] == 32 + 24 * 4 and amp["total"] == 24 + 56 + 72 + 128
    assert bench.floor_bytes(torch.ones(2, 3, dtype=torch.bool), 2, 4, False)["fwd"] == 4 * 6 * 2 + 6 * 8 + 4 * 4 * 2


def test_host_cost_runs_the_compiled_triton_host_path_on_cpu():
    """The measurement compiles one graph (mask updates included) and goes through the Triton backend's launches:
    pack, forward, dX and dW per layer (an fp32 dW takes the atomics directly, no cast pass)."""
    result = bench.host_cost(n_layers=2, reps=2)
    assert result["graphs"] == 1 and result["launches_per_layer"] == 4
    assert result["host_us_per_layer"] > 0 and result["python_calls_per_layer"] > 0
