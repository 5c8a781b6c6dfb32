"""kernels/cslt_pack.py: our writer of cuSPARSELt's compressed 2:4 layout equals torch._cslt_compress (GPU), on a
hand-built case (CPU), and its Triton MVUE+pack equals MVUE then the reference pack (interpreter, GPU)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from kernels import cslt_pack as cp
from tests.interpreted import check_interpreted


def _random_24(m: int, k: int, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(m, k // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(m, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(m, k)
    return torch.where(mask, torch.randn(m, k, generator=g).abs() + 0.1, 0.0).to(dtype)


def test_hand_case_values_then_metadata_words():
    """One 64x32 tile: rows 0 and 8, groups 0 and 4 share word 0, in nibbles 0, 1, 2, 3."""
    a = torch.zeros(64, 32)
    a[:, [0, 1]] = 1.0  # every group keeps (0, 1): code 0b0100 = 4 ...
    a[:, 4:32] = 0.0
    for g in range(1, 8):
        a[:, 4 * g + 2] = a[:, 4 * g + 3] = 2.0  # ... except groups 1-7, which keep (2, 3): code 0b1110
    a[0, 0:4] = torch.tensor([0.0, 3.0, 0.0, 4.0])  # (0, 0) keeps (1, 3): code 0b1101
    a[8, 16:20] = torch.tensor([5.0, 0.0, 6.0, 0.0])  # (8, 4) keeps (0, 2): code 0b1000
    packed = cp.pack_ref(a.half())
    assert packed.shape == (64, 16 + 2)
    flat = packed.view(-1)
    assert flat[:4].tolist() == [3.0, 4.0, 2.0, 2.0]  # row 0's kept values in column order
    words = flat[64 * 16:].view(torch.int16).int() & 0xFFFF
    assert words.numel() == 128
    assert words[0].item() == 0xD | 0x4 << 4 | 0xE << 8 | 0x8 << 12  # (0,0) (8,0) (0,4) (8,4)
    assert words[1].item() == 0xE | 0xE << 4 | 0xE << 8 | 0xE << 12  # (0,1) (8,1) (0,5) (8,5)
    assert words[4].item() == 0x4 | 0x4 << 4 | 0xE << 8 | 0xE << 12  # (1,0) (9,0) (1,4) (9,4)


def _transposable_24(m: int, k: int, seed: int) -> torch.Tensor:
    """A mask that is 2:4 along rows and columns: in each 4x4 block, (r + c + shift) mod 4 < 2, random shifts."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.randint(0, 4, (m // 4, k // 4), generator=g).repeat_interleave(4, 0).repeat_interleave(4, 1)
    return (torch.arange(m)[:, None] + torch.arange(k)[None, :] + shift) % 4 < 2


def test_write_values_repacks_a_new_weight_under_the_same_mask():
    mask = _transposable_24(128, 192, seed=1)
    w1 = torch.where(mask, torch.randn(128, 192).abs() + 0.1, 0.0).bfloat16()
    w2 = torch.where(mask, -torch.randn(128, 192).abs() - 0.1, 0.0).bfloat16()  # same mask, new values
    packed = cp.pack_ref(w1)
    cp.write_values(packed, w2.float(), cp.kept_columns(mask))  # fp32 master weight, cast into the operand
    assert torch.equal(packed.view(torch.int16), cp.pack_ref(w2).view(torch.int16))
    packed_t = cp.pack_ref(w1.t().contiguous())  # Wᵀ from a strided view of W
    cp.write_values(packed_t, w2.float().t(), cp.kept_columns(mask.t()))
    assert torch.equal(packed_t.view(torch.int16), cp.pack_ref(w2.t().contiguous()).view(torch.int16))
    assert torch.equal(cp.unpack_ref(packed_t), w2.t())


def test_unsupported_shapes_and_dtypes_are_refused():
    assert not cp.supported(96, 64, torch.bfloat16) and not cp.supported(128, 48, torch.bfloat16)
    assert not cp.supported(128, 64, torch.float32) and cp.supported(128, 64, torch.float16)
    with pytest.raises(ValueError, match="rows % 64"):
        cp.pack_ref(torch.zeros(96, 64, dtype=torch.bfloat16))


_INTERP = textwrap.dedent(
    """
    import tests.triton_interp  # noqa: F401  (interpreter on, before triton is imported)
    import torch
    from kernels import cslt_pack as cp
    from kernels import semi24_triton as st
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(64, 128).to(dtype)  # dY: 64 tokens x 128 features
        got = cp.mvue24_pack(x, 1234)
        ref = cp.pack_ref(st.mvue24_t(x, 1234))
        assert torch.equal(got.view(torch.int16), ref.view(torch.int16)), dtype
        x[4:8, 3] = 0.0  # an all-zero group: its codes may name any two positions, its values are 0
        assert torch.equal(cp.unpack_ref(cp.mvue24_pack(x, 5)), st.mvue24_t(x, 5)), dtype
    print("ok")
    """
)


def test_mvue_pack_kernel_matches_reference_in_interpreter():
    pytest.importorskip("triton")
    check_interpreted(_INTERP)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3072, 768), (768, 3072), (4096, 1024), (1024, 4096), (5120, 1280), (6400, 1600),
                                   (1600, 6400)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_pack_equals_cslt_compress(shape, dtype):
    a = _random_24(*shape, dtype=dtype, seed=sum(shape)).cuda()
    assert torch.equal(cp.pack_ref(a).view(torch.int16), torch._cslt_compress(a).view(torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,features", [(16384, 3072), (16384, 768), (8192, 5120), (16384, 4096),
                                             (16384, 6400)])
def test_gpu_mvue_pack_equals_mvue_then_compress(tokens, features):
    from kernels import semi24_triton as st

    x = torch.randn(tokens, features, device="cuda", dtype=torch.bfloat16)
    got = cp.mvue24_pack(x, 77)
    dense = st.mvue24_t(x, 77)
    assert torch.equal(cp.unpack_ref(got), dense)  # the same draw ...
    n = features * tokens // 2
    want = torch._cslt_compress(dense)
    assert torch.equal(got.view(-1)[:n], want.view(-1)[:n])  # ... the same values ...
    assert torch.equal(got.view(torch.int16).view(-1)[n:], want.view(torch.int16).view(-1)[n:])  # ... and codes
