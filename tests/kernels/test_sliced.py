"""Sliced MLP / attention (SAT's fast paths) against their masked dense references (sat.md §8.1-8.2)."""

import textwrap

import pytest
import torch

from kernels.sliced_attention import SlicedAttention, attention_ref, head_slices, sliced_attention
from kernels.sliced_mlp import (
    SlicedMLP,
    expand,
    gelu_backward_colsum_ref,
    gelu_backward_colsum_triton,
    mlp_ref,
    positions,
    scatter,
    sliced_mlp,
)
from model.gpt import MLP, CausalSelfAttention, GPTConfig
from tests.interpreted import check_interpreted


def _params(d: int, hidden: int, bias: bool, device="cpu"):
    g = torch.Generator().manual_seed(1)
    make = lambda *s: (torch.randn(*s, generator=g) * 0.2).to(device).requires_grad_()
    return make(hidden, d), make(hidden) if bias else None, make(d, hidden), make(d) if bias else None


def _grads(fn, x, params, n_micro=1):
    """Output and grads of x and every parameter after n_micro forward/backward passes (grad accumulation)."""
    x = x.detach().clone().requires_grad_()
    ps = [p.detach().clone().requires_grad_() if p is not None else None for p in params]
    g = torch.Generator(device=x.device).manual_seed(2)
    for _ in range(n_micro):
        y = fn(x, *ps)
        y.backward(torch.randn(y.shape, generator=g, device=x.device, dtype=y.dtype))
    return [y, x.grad] + [p.grad for p in ps if p is not None]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_micro", [1, 2])
def test_sliced_mlp_matches_masked_dense(bias, n_micro):
    d, hidden = 16, 64
    params = _params(d, hidden, bias)
    idx = torch.tensor([0, 3, 4, 9, 17, 40, 41, 63])
    x = torch.randn(2, 5, d)
    got = _grads(lambda x, *p: sliced_mlp(x, *p, idx), x, params, n_micro)
    ref = _grads(lambda x, *p: mlp_ref(x, *p, idx), x, params, n_micro)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    omitted = torch.ones(hidden, dtype=torch.bool)
    omitted[idx] = False
    w1_grad, w2_grad = got[2], got[4 if bias else 3]
    assert (w1_grad[omitted] == 0).all() and (w2_grad[:, omitted] == 0).all()
    if bias:
        assert (got[3][omitted] == 0).all()


@pytest.mark.parametrize("bias", [True, False])
def test_sliced_attention_matches_zeroed_heads(bias):
    n_head, hd = 4, 8
    d = n_head * hd
    g = torch.Generator().manual_seed(3)
    make = lambda *s: (torch.randn(*s, generator=g) * 0.2).requires_grad_()
    params = [make(3 * d, d), make(3 * d) if bias else None, make(d, d), make(d) if bias else None]
    rows, cols = head_slices(torch.tensor([1, 3]), n_head, hd)
    x = torch.randn(2, 6, d)
    got = _grads(lambda x, *p: sliced_attention(x, *p, rows, cols, hd), x, params, 2)
    ref = _grads(lambda x, *p: attention_ref(x, *p, rows, cols, hd), x, params, 2)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    omitted_rows = torch.ones(3 * d, dtype=torch.bool)
    omitted_rows[rows] = False
    assert (got[2][omitted_rows] == 0).all() and omitted_rows.sum() == 3 * d // 2


def test_head_slices_layout():
    rows, cols = head_slices(torch.tensor([2]), n_head=3, head_dim=2)
    assert cols.tolist() == [4, 5] and rows.tolist() == [4, 5, 10, 11, 16, 17]


def test_modules_dense_path_is_the_original_code():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, bias=True)
    mlp, attn = MLP(cfg), CausalSelfAttention(cfg)
    x = torch.randn(2, 8, 16)
    ref_mlp, ref_attn = mlp(x), attn(x)
    s_mlp, s_attn = SlicedMLP(mlp), SlicedAttention(attn)
    assert torch.equal(s_mlp(x), ref_mlp) and torch.equal(s_attn(x), ref_attn)
    assert s_mlp.state_dict().keys() == mlp.state_dict().keys()
    assert s_attn.state_dict().keys() == attn.state_dict().keys()
    s_mlp.set_kept(torch.arange(64))  # every channel kept through the sliced path: same function
    s_attn.set_kept(torch.arange(2))
    torch.testing.assert_close(s_mlp(x), ref_mlp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_attn(x), ref_attn, rtol=1e-5, atol=1e-6)
    s_mlp.eval()
    s_mlp.set_kept(torch.arange(8))
    assert torch.equal(s_mlp(x), ref_mlp)  # evaluation is dense


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_fast_paths_bf16_autocast_cuda(compiled):
    d, n_head = 256, 4
    hd = d // n_head
    params = _params(d, 4 * d, True, "cuda")
    idx = torch.randperm(4 * d, device="cuda")[: 2 * d].sort().values
    x = torch.randn(4, 128, d, device="cuda")
    mlp = torch.compile(sliced_mlp) if compiled else sliced_mlp

    def run(fn, *extra):
        def f(x, *p):
            with torch.autocast("cuda", torch.bfloat16):
                return fn(x, *p, *extra)
        return _grads(f, x, params, 2)

    for a, b in zip(run(mlp, idx), run(mlp_ref, idx), strict=True):
        assert a.dtype == b.dtype
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2
    g = torch.Generator().manual_seed(0)
    shapes = [(3 * d, d), (3 * d,), (d, d), (d,)]
    attn_params = [(torch.randn(*s, generator=g) * 0.05).cuda().requires_grad_() for s in shapes]
    rows, cols = head_slices(torch.tensor([0, 2], device="cuda"), n_head, hd)
    att = torch.compile(sliced_attention) if compiled else sliced_attention

    def run_attn(fn):
        def f(x, *p):
            with torch.autocast("cuda", torch.bfloat16):
                return fn(x, *p, rows, cols, hd)
        return _grads(f, x, attn_params, 1)

    for a, b in zip(run_attn(att), run_attn(attention_ref), strict=True):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2


def test_head_slices_batched_rows_match_single():
    heads = torch.tensor([[0, 2], [1, 3]])
    rows, cols = head_slices(heads, n_head=4, head_dim=3)
    for i in range(2):
        r, c = head_slices(heads[i], n_head=4, head_dim=3)
        assert torch.equal(rows[i], r) and torch.equal(cols[i], c)


def test_gelu_backward_colsum_ref_hand_case():
    # gelu'(0) = 1/2; so dh = da/2 at h = 0, and the column sums add the rows
    da = torch.tensor([[2.0, -4.0], [6.0, 8.0]])
    dh, part = gelu_backward_colsum_ref(da, torch.zeros(2, 2))
    assert torch.equal(dh, da / 2) and torch.equal(part, torch.tensor([[4.0, 2.0]]))


def test_positions_invert_kept_sets_and_expand_gathers_through_them():
    idx = torch.tensor([[1, 3], [0, 2]])
    pos = positions(idx, 4)
    assert torch.equal(pos, torch.tensor([[-1, 0, -1, 1], [0, -1, 1, -1]]))
    assert torch.equal(positions(idx[1], 4), pos[1])
    compact = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # (3, k=2): columns are the kept channels 1 and 3
    assert torch.equal(expand(compact, pos[0], 1, torch.float64),
                       torch.tensor([[0, 1, 0, 2], [0, 3, 0, 4], [0, 5, 0, 6]], dtype=torch.float64))
    rows = expand(compact.t(), pos[0], 0, torch.float32)  # rows along dim 0
    assert torch.equal(rows, expand(compact, pos[0], 1, torch.float32).t())
    assert torch.equal(expand(compact.t(), pos[0], 0, torch.float32), scatter(((4, 3), torch.float32), idx[0], 0,
                                                                              compact.t()))


# The fused GELU-backward + bias-gradient kernel under Triton's CPU interpreter (a subprocess, so TRITON_INTERPRET
# never reaches other tests): rows and columns ragged against the tiles, a row loop of several steps, the default.
_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import tests.triton_interp  # noqa: F401  (interpreter on, numpy shim)
    import torch

    from kernels.sliced_mlp import COLSUM_TILE, gelu_backward_colsum_ref, gelu_backward_colsum_triton
    torch.manual_seed(0)
    for (n, k), tile in [((300, 200), (64, 16, 64, 4)), ((200, 100), COLSUM_TILE), ((5, 3), (16, 8, 16, 1))]:
        da, h = torch.randn(n, k), 3 * torch.randn(n, k)
        (dh, part), (want_dh, want_db) = gelu_backward_colsum_triton(da, h, tile), gelu_backward_colsum_ref(da, h)
        assert part.shape == (-(-n // tile[0]), k)  # one row of partial sums per ROWS rows
        torch.testing.assert_close(dh, want_dh, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(part.sum(0, keepdim=True), want_db, atol=1e-5, rtol=1e-5)
    print("ok")
    """
)


@pytest.mark.slow
def test_gelu_colsum_kernel_matches_ref_in_interpreter():
    pytest.importorskip("triton")
    check_interpreted(_INTERPRETER_SCRIPT)


@pytest.mark.gpu
def test_gelu_colsum_kernel_bf16_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    da = torch.randn(16384, 768, device="cuda", generator=g).bfloat16()
    h = (3 * torch.randn(16384, 768, device="cuda", generator=g)).bfloat16()
    dh, part = gelu_backward_colsum_triton(da, h)
    (want_dh, want_db), db = gelu_backward_colsum_ref(da, h), part.sum(0, keepdim=True)
    assert dh.dtype == torch.bfloat16 and db.dtype == torch.float32
    # dh: one bf16 rounding apart at most (the fp32 math differs in its last bits, which flips a few roundings);
    # db sums those, so its bound scales with each column's sum of |dh|
    torch.testing.assert_close(dh.float(), want_dh.float(), atol=1e-2, rtol=1e-2)
    assert ((db - want_db).abs() <= 1e-4 * want_dh.float().abs().sum(0)).all()
