"""kernels/block_adamw.py: AdamW over the nonzero blocks only, against torch's AdamW on the whole tensor."""

import textwrap

import pytest
import torch

from kernels.block_adamw import BlockAdamW, adamw_blocks_ref
from kernels.block_sparse import BlockSparseLinear, expand_block_mask
from tests.interpreted import check_interpreted

HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _layer(mask: torch.Tensor, block: int = 32, seed: int = 0) -> BlockSparseLinear:
    torch.manual_seed(seed)
    layer = BlockSparseLinear(mask.shape[1] * block, mask.shape[0] * block, bias=False, block=block, backend="ref")
    layer.set_block_mask(mask)
    with torch.no_grad():
        layer.weight.mul_(expand_block_mask(mask, block))
    return layer


def test_ref_is_adamw_on_the_kept_blocks_and_leaves_the_rest():
    mask = torch.tensor([[True, False, False], [False, True, True]])
    keep = expand_block_mask(mask, 32)
    torch.manual_seed(0)
    p, g = torch.randn(64, 96), torch.randn(64, 96)
    m, v = torch.randn(64, 96) * 0.1, torch.rand(64, 96) * 0.01
    want = p.clone().requires_grad_()
    want.grad = g.clone()
    opt = torch.optim.AdamW([want], **HP, foreach=False)
    opt.state[want] = {"step": torch.tensor(4.0), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    opt.step()  # step 5
    got_p, got_m, got_v = p.clone(), m.clone(), v.clone()
    adamw_blocks_ref(got_p, g, got_m, got_v, mask, 32, HP["lr"], *HP["betas"], HP["eps"], HP["weight_decay"],
                     torch.tensor(5.0))  # fmt: skip
    state = opt.state[want]
    for got, ref, before in ((got_p, want.detach(), p), (got_m, state["exp_avg"], m), (got_v, state["exp_avg_sq"], v)):
        torch.testing.assert_close(got[keep], ref[keep], rtol=1e-6, atol=1e-7)
        assert torch.equal(got[~keep], before[~keep])


def _masks():
    """Block masks of a 3x4 grid for 12 steps: updates at steps 4 and 8 prune some blocks and regrow others."""
    a = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [1, 0, 1, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1], [1, 0, 1, 0]], dtype=torch.bool)
    c = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    return [a] * 4 + [b] * 4 + [c] * 4


def _run(block_adamw: bool, steps: int = 12, decay: bool = True):
    """A sparse layer and a dense bias trained the way block MST trains them: gradients zero off the mask, and at
    each mask change exp_avg zeroed on pruned blocks and new blocks starting from weight 0."""
    masks = _masks()
    layer = _layer(masks[0])
    bias = torch.nn.Parameter(torch.zeros(3))
    groups = [{"params": [layer.weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), foreach=False)
    opt = BlockAdamW(groups, blocks={layer.weight: layer}, **kw) if block_adamw else torch.optim.AdamW(groups, **kw)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        mask = masks[step]
        if step and not torch.equal(mask, masks[step - 1]):
            old = masks[step - 1]
            if block_adamw and decay:
                opt.decay_skipped_(layer.weight, ~old)
            layer.set_block_mask(mask)
            keep = expand_block_mask(mask, 32)
            with torch.no_grad():
                layer.weight.mul_(keep & expand_block_mask(old, 32))
            opt.state[layer.weight]["exp_avg"].mul_(keep)
            continue  # an update step: no optimizer step
        keep = expand_block_mask(mask, 32)
        layer.weight.grad = torch.randn(layer.weight.shape, generator=gen) * keep
        bias.grad = torch.randn(3, generator=gen)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return layer, bias, opt


def test_block_adamw_trains_as_adamw_through_mask_changes():
    """Pruned blocks regrown later start from exp_avg_sq decayed by β2 per skipped step, so every entry matches
    plain AdamW over the whole tensor; the dense parameter goes through torch's own step."""
    (layer, bias, opt), (ref_layer, ref_bias, ref_opt) = _run(True), _run(False)
    torch.testing.assert_close(layer.weight, ref_layer.weight, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(bias, ref_bias, rtol=0, atol=0)
    state, ref = opt.state[layer.weight], ref_opt.state[ref_layer.weight]
    # exp_avg_sq agrees wherever it has been brought up to date: every block kept since step 8
    current = expand_block_mask(_masks()[-1], 32)
    torch.testing.assert_close(state["exp_avg_sq"][current], ref["exp_avg_sq"][current], rtol=1e-5, atol=0)
    torch.testing.assert_close(state["exp_avg"], ref["exp_avg"], rtol=1e-5, atol=1e-7)  # lerp vs mul-add
    assert state["step"].item() == ref["step"].item() == 10 and state["synced"].item() == 7
    assert [g.get("block_sparse", False) for g in opt.param_groups] == [True, False]  # empty halves dropped
    stale = _run(True, decay=False)[0]  # regrown blocks with the exp_avg_sq of when they were pruned
    assert not torch.allclose(stale.weight, ref_layer.weight, rtol=1e-4, atol=1e-6)


def test_block_adamw_skipping_matters_and_state_round_trips(tmp_path):
    """decay_skipped_ multiplies the skipped blocks' exp_avg_sq by β2^(steps since the last call); the state saves
    and loads with AdamW's own state_dict, `synced` as an integer."""
    layer, _, opt = _run(True, steps=4)  # steps 0-3, before the first mask change
    v_before = opt.state[layer.weight]["exp_avg_sq"].clone()
    skipped = _masks()[0]  # the blocks with a nonzero exp_avg_sq (the others were never stepped)
    opt.decay_skipped_(layer.weight, skipped)  # 4 steps taken, 0 synced before: times 0.95^4 (skipped blocks)
    v = opt.state[layer.weight]["exp_avg_sq"]
    off = expand_block_mask(skipped, 32)
    torch.testing.assert_close(v[off], v_before[off] * 0.95**4, rtol=1e-6, atol=0)
    assert torch.equal(v[~off], v_before[~off]) and (v_before[off] > 0).all()
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    layer2, _, opt2 = _run(True, steps=1)
    opt2.load_state_dict(torch.load(path))
    assert opt2.state[layer2.weight]["synced"].dtype == torch.int64
    assert opt2.state[layer2.weight]["synced"].item() == 4
    with pytest.raises(ValueError, match="amsgrad"):
        BlockAdamW([{"params": [layer.weight]}], blocks={}, amsgrad=True)


_INTERPRETER_CHECK = textwrap.dedent(
    """
    import tests.triton_interp  # noqa: F401  (interpreter on, numpy shim)
    import torch

    from kernels import block_adamw as ba
    from kernels.block_sparse import build_block_mask_info

    torch.manual_seed(0)
    for rows, cols, block, dtype in [(3, 2, 32, torch.float32), (2, 3, 64, torch.float32),
                                     (2, 2, 128, torch.float32), (2, 2, 32, torch.bfloat16)]:
        mask = torch.rand(rows, cols) < 0.5
        mask[0, 0] = True
        info = build_block_mask_info(mask, block)
        p = torch.randn(rows * block, cols * block).to(dtype)
        g, m = torch.randn_like(p), torch.randn_like(p) * 0.1
        v = torch.rand_like(p) * 0.01
        step = torch.tensor(7.0)
        want = [t.clone() for t in (p, m, v)]
        ba.adamw_blocks_ref(*want[:1], g, *want[1:], mask, block, 1e-2, 0.9, 0.95, 1e-8, 0.1, step)
        got = [t.clone() for t in (p, m, v)]
        ba.adamw_blocks_triton(got[0], g, got[1], got[2], info, 1e-2, 0.9, 0.95, 1e-8, 0.1, step)
        gt = g.t().contiguous().t()  # a column-major gradient: the same update
        got_t = [t.clone() for t in (p, m, v)]
        ba.adamw_blocks_triton(got_t[0], gt, got_t[1], got_t[2], info, 1e-2, 0.9, 0.95, 1e-8, 0.1, step)
        assert all(torch.equal(a, b) for a, b in zip(got, got_t))
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * 1e-2)
    print("ok")
    """
)


def test_triton_kernel_matches_reference_in_interpreter():
    check_interpreted(_INTERPRETER_CHECK)


@pytest.mark.gpu
@pytest.mark.parametrize("grad_layout", ["rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [32, 64, 128])
def test_triton_kernel_matches_reference_on_gpu(block, dtype, grad_layout):
    """Also with a column-major gradient, as a dense GEMM's dW under inductor may be: the kernel reads it with its
    own strides rather than falling back to the (slow) reference."""
    from kernels import block_adamw as ba
    from kernels.block_sparse import build_block_mask_info

    torch.manual_seed(0)
    mask = torch.rand(768 // block, 1024 // block) < 0.3
    info = build_block_mask_info(mask, block, "cuda")
    p = torch.randn(768, 1024, device="cuda").to(dtype)
    g, m, v = torch.randn_like(p), torch.randn_like(p) * 0.1, torch.rand_like(p) * 0.01
    if grad_layout == "cols":
        g = g.t().contiguous().t()
        assert g.stride() == (1, 768) and ba._triton_ok(p, g, m, v)
    step = torch.tensor(7.0, device="cuda")
    want = [t.clone() for t in (p, m, v)]
    ba.adamw_blocks_ref(want[0], g, want[1], want[2], mask, block, 1e-2, 0.9, 0.95, 1e-8, 0.1, step)
    got = [t.clone() for t in (p, m, v)]
    ba.adamw_blocks_triton(got[0], g, got[1], got[2], info, 1e-2, 0.9, 0.95, 1e-8, 0.1, step)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 1e-2)
