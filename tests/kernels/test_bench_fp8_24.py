"""kernels/bench_fp8_24.py: its transposable test pattern on the CPU; on CUDA a shape row's errors."""

import pytest
import torch

from kernels import bench_fp8_24 as b

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_transposable_pattern_keeps_two_of_four_along_both_axes():
    m = b.transposable_pattern(8, 12, "cpu").view(2, 4, 3, 4)
    assert (m.sum(1) == 2).all() and (m.sum(3) == 2).all()


@pytest.mark.gpu
@cuda
def test_shape_row_errors_are_fp8_sized():
    row = b.shape_row(512, 256, 1024, warmup=1, reps=2)
    assert row["rel_err"]["fp8_fwd"] < 0.06 and row["rel_err"]["fp8_dw"] < 0.06
    if "fp8_24" not in row["errors"]:
        assert row["rel_err"]["fp8_24_fwd"] < 0.06 and row["rel_err"]["fp8_24_dx"] < 0.06
    assert row["ms"]["bf16_fwd"] > 0
