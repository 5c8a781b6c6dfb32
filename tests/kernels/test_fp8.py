"""kernels/fp8.py: e4m3 per-tensor quantization against hand-checkable values on the CPU; on CUDA the one-pass
Triton cast against the reference, in every layout."""

import pytest
import torch

from kernels import fp8

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_quant_ref_scales_the_largest_magnitude_to_448_and_transposes():
    t = torch.tensor([[1.0, -2.0, 0.5], [4.0, 0.25, -3.0]])
    q, qt, scale = fp8.quant_ref(t)
    assert scale.item() == pytest.approx(4.0 / 448.0)
    assert q.dtype == torch.float8_e4m3fn and q.float()[1, 0].item() == 448.0
    assert torch.equal(qt.float(), q.float().t())
    # e4m3 keeps 3 mantissa bits: every value comes back within 1/16 relative
    assert torch.allclose(q.float() * scale, t, rtol=1 / 16, atol=0)


def test_quant_ref_layouts_and_a_bad_layout():
    t = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    q, qt, _ = fp8.quant_ref(t, "row")
    assert qt is None and q.shape == (4, 8)
    q, qt, _ = fp8.quant_ref(t, "col")
    assert q is None and qt.shape == (8, 4)
    with pytest.raises(ValueError, match="layout"):
        fp8.quant_ref(t, "diag")


def test_fake_quant_rounds_to_e4m3_grid_and_keeps_zeros():
    t = torch.tensor([[448.0, 3.3, 0.0, -17.0]])  # scale 1: the values are e4m3's own
    assert torch.equal(fp8.fake_quant(t), torch.tensor([[448.0, 3.25, 0.0, -16.0]]))
    assert torch.equal(fp8.fake_quant(torch.zeros(2, 4)), torch.zeros(2, 4))


def test_quant_falls_back_to_the_reference_on_cpu():
    t = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a.float(), c.float()) for a, c in zip(fp8.quant(t), fp8.quant_ref(t), strict=True))


@pytest.mark.gpu
@cuda
def test_triton_cast_is_within_one_e4m3_step_of_the_reference():
    t = torch.randn(300, 1000, device="cuda").to(torch.bfloat16)
    (q, qt, s), (qr, _, sr) = fp8.quant_triton(t), fp8.quant_ref(t)
    assert torch.equal(s, sr)
    step = torch.where(qr.float().abs() >= 2 ** -6, 2.0 ** (qr.float().abs().log2().floor() - 3), 2.0 ** -9)
    assert ((q.float() - qr.float()).abs() <= step).all()
    assert torch.equal(qt.float(), q.float().t())
    assert torch.equal(fp8.scale_triton(t), sr)
    assert all(torch.equal(a.float(), c.float()) for a, c in zip(fp8.quant_fused(t), (q, qt, s), strict=True))
    qr_only, none, _ = fp8.quant_fused(t, "row")
    none2, qt_only, _ = fp8.quant_fused(t, "col")
    assert none is None and none2 is None
    assert torch.equal(qr_only.float(), q.float()) and torch.equal(qt_only.float(), qt.float())


def test_scale_bias_ref_hand_case():
    y = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    out = fp8.scale_bias_(y, torch.tensor(0.5), torch.tensor([10.0, 20.0]))
    assert out is y and torch.equal(y, torch.tensor([[10.5, 21.0], [11.5, 18.0]]))
    assert torch.equal(fp8.scale_bias_(torch.ones(1, 3), torch.tensor(2.0)), torch.full((1, 3), 2.0))


@pytest.mark.gpu
@cuda
def test_triton_scale_bias_equals_the_reference():
    y = torch.randn(1000, 384, device="cuda").bfloat16()
    s, b = torch.tensor(0.37, device="cuda"), torch.randn(384, device="cuda").bfloat16()
    for bias in (None, b):  # the kernel may fuse the multiply-add: one bf16 rounding step apart
        fast, ref = fp8.scale_bias_(y.clone(), s, bias), fp8.scale_bias_ref(y.clone(), s, bias)
        torch.testing.assert_close(fast, ref, rtol=2 ** -7, atol=1e-6)  # atol: y·s + b cancelling to ~0
        assert (fast != ref).float().mean() < 0.01
    with pytest.raises(ValueError, match="contiguous"):
        fp8.scale_bias_(y.t(), s)
