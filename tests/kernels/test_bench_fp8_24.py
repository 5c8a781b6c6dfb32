"""kernels/bench_fp8_24.py: the e4m3 quantization against hand-checkable values on the CPU; on CUDA the one-pass
Triton cast against the reference and a shape row's errors."""

import pytest
import torch

from kernels import bench_fp8_24 as b

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_quant_ref_scales_the_largest_magnitude_to_448_and_transposes():
    t = torch.tensor([[1.0, -2.0, 0.5], [4.0, 0.25, -3.0]])
    q, qt, scale = b.quant_ref(t)
    assert scale.item() == pytest.approx(4.0 / 448.0)
    assert q.dtype == torch.float8_e4m3fn and q.float()[1, 0].item() == 448.0
    assert torch.equal(qt.float(), q.float().t())
    # e4m3 keeps 3 mantissa bits: every value comes back within 1/16 relative
    assert torch.allclose(q.float() * scale, t, rtol=1 / 16, atol=0)


def test_quant_falls_back_to_the_reference_on_cpu():
    t = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a.float(), c.float()) for a, c in zip(b.quant(t), b.quant_ref(t), strict=True))


def test_transposable_pattern_keeps_two_of_four_along_both_axes():
    m = b.transposable_pattern(8, 12, "cpu").view(2, 4, 3, 4)
    assert (m.sum(1) == 2).all() and (m.sum(3) == 2).all()


@pytest.mark.gpu
@cuda
def test_triton_cast_is_within_one_e4m3_step_of_the_reference():
    t = torch.randn(300, 1000, device="cuda").to(torch.bfloat16)
    (q, qt, s), (qr, _, sr) = b.quant_triton(t), b.quant_ref(t)
    assert torch.equal(s, sr)
    step = torch.where(qr.float().abs() >= 2 ** -6, 2.0 ** (qr.float().abs().log2().floor() - 3), 2.0 ** -9)
    assert ((q.float() - qr.float()).abs() <= step).all()
    assert torch.equal(qt.float(), q.float().t())
    assert torch.equal(b.scale_triton(t), sr)
    assert all(torch.equal(a.float(), c.float()) for a, c in zip(b.quant_fused(t), (q, qt, s), strict=True))


@pytest.mark.gpu
@cuda
def test_shape_row_errors_are_fp8_sized():
    row = b.shape_row(512, 256, 1024, warmup=1, reps=2)
    assert row["rel_err"]["fp8_fwd"] < 0.06 and row["rel_err"]["fp8_dw"] < 0.06
    if "fp8_24" not in row["errors"]:
        assert row["rel_err"]["fp8_24_fwd"] < 0.06 and row["rel_err"]["fp8_24_dx"] < 0.06
    assert row["ms"]["bf16_fwd"] > 0
