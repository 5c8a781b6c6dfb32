"""train.compile_mode: CUDA-graph replays (reduce-overhead) train exactly what the default compiled step trains.

A replayed graph re-runs the kernels it recorded with the addresses it recorded: method state that reaches a graph
other than as a tensor input (a Python int, a tensor swapped for a new one behind the graph's back) would be replayed
stale. These runs would diverge if any method's per-step state (MST's masks and mask updates, SAT's kept sets and
rung changes, the HSA switch) did.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_config
from train import TrainError, setup, train_step

MST = ["mst.warmup_frac=0", "mst.delta_t=3", "mst.hsa_stride=16", "mst.hsa_end=0.6"]
CASES = {  # name: (method, overrides)
    "dense": ("dense", []),
    "mst": ("mst", MST),
    "mst-block": ("mst", [*MST, "mst.granularity=block", "mst.block_size=32"]),  # mask updates change the lists
    # the warm-up's updates move layers from the dense path (F.linear) to the block kernels: other graphs
    # (to 0.6 sparsity: mixed states, and a loss that still falls over 10 steps)
    "mst-block-ramp": ("mst", ["mst.warmup_frac=0.4", "mst.delta_t=2", "mst.hsa_stride=16", "mst.hsa_end=0.6",
                               "mst.granularity=block", "mst.block_size=32", "mst.sparsity=0.6"]),
    "sat": ("sat", ["sat.warmup_frac=0", "sat.lors_frac=0.6", "sat.lors_rungs=2"]),
}


def _losses(root, method: str, mode: str, extra: list[str]) -> tuple[list[float], torch.Tensor]:
    torch._dynamo.reset()
    cfg = tiny_config(root, method, ["train.device=cuda", "train.compile=true", f"train.compile_mode={mode}",
                                     "train.steps=10", "model.block_size=64", *extra])
    run = setup(cfg)
    losses = [train_step(run, step)[0].item() for step in range(cfg.train.steps)]
    return losses, run.model.lm_head.weight.detach().float().cpu()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case,grad_accum",
    [("dense", 1), ("dense", 2), ("mst", 2), ("mst-block", 1), ("mst-block-ramp", 1), ("sat", 2)],
)
def test_reduce_overhead_trains_what_default_trains(tmp_path, case, grad_accum):
    method, overrides = CASES[case]
    extra = [*overrides, f"train.grad_accum={grad_accum}"]
    ref, w_ref = _losses(tmp_path, method, "default", extra)
    got, w_got = _losses(tmp_path, method, "reduce-overhead", extra)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(w_got, w_ref, rtol=1e-2, atol=1e-3)
    assert ref[-1] < ref[0]  # it trained


def test_reduce_overhead_refused_for_a_method_that_cannot_be_replayed(tmp_path):
    cfg = tiny_config(tmp_path, "2of4", ["train.compile=true", "train.compile_mode=reduce-overhead"])
    with pytest.raises(TrainError, match="2of4.*reduce-overhead"):
        setup(cfg)
