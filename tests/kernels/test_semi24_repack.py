"""Linear24 on cuSPARSELt across optimizer steps: operands re-packed in place (values only, kernels/cslt_pack.py)
and the weight gradient's MVUE(dYᵀ) packed by our kernel give what the masked dense reference gives."""

from __future__ import annotations

import pytest
import torch

from kernels import semi24 as s


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
def test_gpu_values_only_repack_follows_the_weight_across_steps_and_a_refresh():
    if not s.cusparselt_available():
        pytest.skip("no cuSPARSELt-capable GPU")
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 4096, bias=False, device="cuda")
    fast = s.Linear24.from_dense(lin, backend="cusparselt", mvue=False)  # every GEMM sparse
    ref = s.Linear24.from_dense(lin, backend="ref", mvue=False)
    x = torch.randn(4096, 1024, device="cuda")
    for step in range(4):
        if step in (0, 2):  # a mask refresh: new codes
            idx = s.transposable_search(lin.weight)
            fast.set_mask(idx)
            ref.set_mask(idx)
        with torch.no_grad():
            lin.weight.add_(0.02 * torch.randn_like(lin.weight))  # an optimizer step: new values, same mask
            lin.weight[0, :4] = 0.0  # kept weights that are exactly 0 must not move the codes
        fast.invalidate()
        ref.invalidate()
        with torch.autocast("cuda", torch.bfloat16):
            y_fast, y_ref = fast(x), ref(x)
        assert _rel(y_fast, y_ref) < 1e-2, step
        assert fast._packs, "the packed operand is kept between steps"


@pytest.mark.gpu
def test_gpu_sparse_weight_gradient_uses_the_same_mvue_draw():
    if not s.cusparselt_available():
        pytest.skip("no cuSPARSELt-capable GPU")
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 4096, bias=False, device="cuda")
    fast = s.Linear24.from_dense(lin, backend="cusparselt", mvue=True, seed=5, layer_id=1)
    fast.set_mask(s.transposable_search(lin.weight))
    fast.begin_step(3)
    x = torch.randn(8192, 1024, device="cuda", requires_grad=True)
    dy = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", torch.bfloat16):
        y = fast(x)
    y.backward(dy)
    draw = s.mvue24_t(dy, s.derive_seed(5, 3, 1, 0), "triton")  # the seed of this layer's first micro-step
    assert _rel(lin.weight.grad, draw.float() @ x.detach().bfloat16().float()) < 1e-2
