"""The transposable 2:4 search kernel (kernels/semi24_triton.py) returns exactly transposable_search_ref's indices:
near-ties and exact ties included (spec 2of4.md §11, item 1)."""

import textwrap

import pytest
import torch

from kernels import semi24 as s
from tests.interpreted import check_interpreted


def _blocks(w: torch.Tensor) -> torch.Tensor:
    R, C = w.shape
    return w.abs().float().reshape(R // 4, 4, C // 4, 4).permute(0, 2, 1, 3).reshape(-1, 16)


def _scores_row_major(w: torch.Tensor) -> torch.Tensor:
    """(blocks, 90) kept |w| of every pattern, added one entry at a time in row-major order (the kernel's order)."""
    b, P = _blocks(w), s.PATTERNS.float().to(w.device)
    scores = torch.zeros(b.shape[0], 90, device=w.device)
    for e in range(16):
        scores = scores + b[:, e : e + 1] * P[:, e]  # x * 0 = 0 and x * 1 = x are exact: only the adds round
    return scores


def _search_row_major(w: torch.Tensor) -> torch.Tensor:
    R, C = w.shape
    return _scores_row_major(w).argmax(1).to(torch.uint8).reshape(R // 4, C // 4)


def _near_ties(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    # Values from a few decimals: many patterns keep the same multiset, and 0.1 + 0.2 + ... rounds differently in
    # different orders, so any summation order other than the reference's flips some of the winners.
    vals = torch.tensor([0.1, 0.2, 0.3, 0.7])[torch.randint(0, 4, shape, generator=gen)]
    return vals * torch.randn(shape, generator=gen).sign()


def test_reference_scores_are_row_major_sums():
    # The kernel's exactness argument: the reference's `blocks @ patterns.T` rounds like row-major sequential adds.
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(256, 128, generator=gen) * 10 ** (6 * torch.rand(256, 128, generator=gen) - 3)
    for w in (wide, _near_ties((256, 128), gen)):
        P = s.PATTERNS.float()
        assert torch.equal(_scores_row_major(w), _blocks(w) @ P.t())
        assert torch.equal(_search_row_major(w), s.transposable_search_ref(w))


_INTERPRETER_CHECK = textwrap.dedent(
    """
    import tests.triton_interp  # noqa: F401  (first: the interpreter on before triton is imported, numpy shim)
    import torch
    from kernels import semi24 as s
    from kernels import semi24_triton as st

    gen = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(shape, generator=gen)
    vals = torch.tensor([0.1, 0.2, 0.3, 0.7])
    cases = {  # name: (weight, tile); tiles larger than the default keep the interpreter's program count small
        "36x52, partial tiles": (randn(36, 52), st.SEARCH_TILE),
        "bf16 36x136": (randn(36, 136).bfloat16(), (8, 16, 4)),
        "wide range": (randn(64, 128) * 10 ** (6 * torch.rand(64, 128, generator=gen) - 3), (16, 32, 4)),
        "near ties": (vals[torch.randint(0, 4, (200, 136), generator=gen)] * randn(200, 136).sign(), (64, 64, 4)),
        "zeros": (torch.zeros(8, 8), st.SEARCH_TILE),
        "transposed view": (randn(52, 36).t(), (16, 16, 4)),
        "stacked 2 x c_fc 3072x768": (randn(6144, 768), (512, 256, 4)),
        "c_proj 768x3072": (randn(768, 3072), (256, 1024, 4)),
    }
    for name, (w, tile) in cases.items():
        assert torch.equal(st.transposable_search(w, tile=tile), s.transposable_search_ref(w)), name
    assert (st.transposable_search(torch.ones(36, 52)) == 0).all(), "ties take pattern 0"
    # Block p holds pattern p's mask: the kernel walks the patterns in the table's order.
    masks = s.PATTERNS.float().reshape(90, 4, 4).permute(1, 0, 2).reshape(4, 360)
    assert torch.equal(st.transposable_search(masks)[0], torch.arange(90, dtype=torch.uint8)), "pattern order"
    print("ok")
    """
)


@pytest.mark.slow
def test_search_kernel_matches_reference_in_interpreter():
    pytest.importorskip("triton")
    check_interpreted(_INTERPRETER_CHECK, timeout=240)


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(12 * 3072, 768), (12 * 768, 3072)])  # GPT-2 124M's stacked c_fc, c_proj
@pytest.mark.parametrize("kind", ["randn", "bf16", "near ties"])
def test_gpu_search_is_exact_at_training_shapes(shape, kind):
    # cuBLAS may sum the reference's scores in another order, so compare with the row-major sums, which the CPU
    # test above shows are the reference's.
    gen = torch.Generator().manual_seed(1)
    w = _near_ties(shape, gen) if kind == "near ties" else torch.randn(shape, generator=gen)
    w = (w.bfloat16() if kind == "bf16" else w).cuda()
    assert torch.equal(s.transposable_search(w, "triton"), _search_row_major(w))
