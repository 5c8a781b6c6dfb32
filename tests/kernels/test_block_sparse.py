import re
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import triton

from kernels import block_sparse as bs
from kernels.benchutil import capture
from kernels.block_sparse import (
    BlockSparseLinear,
    block_scores,
    block_sparse_linear,
    build_block_mask_info,
    expand_block_mask,
)
from tests.helpers import check_pdl_against_plain
from tests.interpreted import check_interpreted


def _random_mask(rows: int, cols: int, density: float) -> torch.Tensor:
    mask = torch.rand(rows, cols) < density
    mask[0] = False  # an empty row block: its outputs must be zero (plus bias)
    mask[1, 0] = True
    return mask


def _masked_dense_grads(x, w, b, emask, dy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = F.linear(x, w * emask, b)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("block", [32, 64])
def test_reference_is_masked_dense_matmul(block):
    out_f, in_f = 3 * block, 2 * block
    mask = _random_mask(3, 2, 0.5)
    emask = expand_block_mask(mask, block).float()
    x = torch.randn(2, 5, in_f)
    w, b, dy = torch.randn(out_f, in_f), torch.randn(out_f), torch.randn(2, 5, out_f)
    want_y, want_dx, want_dw, want_db = _masked_dense_grads(x, w, b, emask, dy)
    info = build_block_mask_info(mask, block)
    for dense_wgrad in (False, True):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = block_sparse_linear(xs, ws, bs, info, backend="ref", mode=int(dense_wgrad))
        y.backward(dy)
        torch.testing.assert_close(y, want_y)
        torch.testing.assert_close(xs.grad, want_dx)
        torch.testing.assert_close(bs.grad, want_db)
        if dense_wgrad:
            torch.testing.assert_close(ws.grad, dy.reshape(-1, out_f).t() @ x.reshape(-1, in_f))
        else:
            torch.testing.assert_close(ws.grad, want_dw)
            assert (ws.grad[emask == 0] == 0).all()
            assert (ws.grad[emask == 1] != 0).all()


def test_index_lists_hand_case_grouped_by_row():
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    info = build_block_mask_info(mask, 128)  # G = 256 // 128 = 2
    # lists have room for all 6 blocks (the tail names block (0, 0)); tasks for the most any 2x3 mask makes (2 rows
    # x 2 tasks of G = 2), the unused ones padding (ids -1)
    assert info.row_ptr.tolist() == [0, 2, 2] and info.row_cols.tolist() == [0, 2, 0, 0, 0, 0]
    assert info.col_ptr.tolist() == [0, 1, 1, 2] and info.col_rows.tolist()[:2] == [0, 0]
    assert info.row_order.tolist() == [0, 1] and info.col_order.tolist() == [0, 2, 1]
    assert info.blk_rows.tolist()[:2] == [0, 0] and info.blk_cols.tolist()[:2] == [0, 2]
    assert info.block_id.tolist() == [[0, -1, 1], [-1, -1, -1]]
    assert info.by_row and info.group == 2 and info.shape == (256, 384)
    assert info.n_blocks == 2 and info.nnz == 6 and info.density() == 2 / 6
    assert info.task_fixed.tolist() == [0, 0, 0, 0]
    assert info.task_other.tolist()[0] == [0, 2] and info.task_ids.tolist() == [[0, 1]] + [[-1, -1]] * 3
    assert all(t.dtype == torch.int32 for t in (info.row_ptr, info.row_cols, info.col_rows, info.task_ids))


def test_index_lists_hand_case_grouped_by_column():
    mask = torch.tensor([[1, 1], [0, 1], [1, 1]], dtype=torch.bool)
    info = build_block_mask_info(mask, 128)
    # row-major compact ids: (0,0)=0 (0,1)=1 (1,1)=2 (2,0)=3 (2,1)=4; columns are the longer lists (3 rows > 2 cols)
    assert not info.by_row
    assert info.col_ptr.tolist() == [0, 2, 5] and info.col_rows.tolist() == [0, 2, 0, 1, 2, 0]
    assert info.task_fixed.tolist() == [0, 1, 1, 0]  # room for 2 columns x 2 tasks
    assert info.task_other.tolist()[:3] == [[0, 2], [0, 1], [2, 2]]  # padding repeats slot 0 and is never stored
    assert info.task_ids.tolist() == [[0, 3], [1, 2], [4, -1], [-1, -1]]


H100_SMEM = 232448  # shared_memory_per_block_optin of sm90
A100_SMEM = 166912


def _full_configs(names, tiles):
    """The autotune space as on a GPU (bs._MM_CONFIGS is a single config when the interpreter is on)."""
    return [triton.Config(dict(zip(names, t[:-2])), num_warps=t[-2], num_stages=t[-1]) for t in tiles]


def _tiles(configs):
    return [(*c.kwargs.values(), c.num_warps, c.num_stages) for c in configs]


def test_config_pruning_respects_the_shared_memory_limit(monkeypatch):
    mm, dw = _full_configs(("BM", "BK"), bs.MM_TILES), _full_configs(("BK",), bs.DW_TILES)
    # The estimates by hand (Triton's own count for sm90 adds only barriers: 98324, 147496 and 196608 bytes).
    cfg = {t: c for t, c in zip(bs.MM_TILES, mm)}
    assert bs.mm_smem(cfg[256, 64, 8, 3], 128, 2) == 2 * (256 + 128) * 64 * 2  # stages 3: 2 chunks in flight
    assert bs.mm_smem(cfg[256, 64, 8, 5], 128, 2) == 3 * (256 + 128) * 64 * 2  # stages 5: 3 chunks
    assert bs.dw_smem(dw[1], 128, 2, 2) == 4 * 64 * (128 + 256) * 2
    # H100, bf16, b=128: every config with 64-wide chunks fits; the 4-warp dW config is out (its 128×256 fp32 tile).
    assert _tiles(bs.mm_configs_for(mm, 128, 2, H100_SMEM)) == [
        (256, 64, 8, 3), (256, 64, 8, 5), (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 4, 5)
    ]  # fmt: skip
    assert _tiles(bs.dw_configs_for(dw, 128, 2, 2, H100_SMEM)) == [(64, 8, 3), (64, 8, 4), (32, 8, 3)]
    # fp32 operands: the 256-row forward tile's 2 chunks (192 KB) and its output tile (128 KB, not in the pipeline's
    # buffers) do not fit, nor do 3 of dW's 64-wide chunks (288 KB); 16-bit output tiles reuse the pipeline's.
    assert bs.mm_smem(cfg[128, 64, 4, 3], 128, 2) == 2 * (128 + 128) * 64 * 2
    assert bs.mm_smem(cfg[128, 64, 4, 3], 128, 4) == 2 * (128 + 128) * 64 * 4 + 128 * 128 * 4
    assert _tiles(bs.mm_configs_for(mm, 128, 4, H100_SMEM)) == [
        (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (128, 32, 4, 5), (64, 32, 4, 3)
    ]  # fmt: skip
    assert _tiles(bs.dw_configs_for(dw, 128, 2, 4, H100_SMEM)) == [(32, 8, 3)]
    # A smaller device drops what no longer fits: 4 dW stages (192 KB) on the A100.
    assert _tiles(bs.dw_configs_for(dw, 128, 2, 2, A100_SMEM)) == [(64, 8, 3), (32, 8, 3)]
    # On either device every block size and operand size has configs, and all of them fit.
    for limit in (H100_SMEM, A100_SMEM):
        for block in bs.BLOCK_SIZES:
            for size in (2, 4):
                kept = bs.mm_configs_for(mm, block, size, limit)
                assert kept and all(bs.mm_smem(c, block, size) + bs._SMEM_RESERVE <= limit for c in kept)
                kept = bs.dw_configs_for(dw, block, 256 // block, size, limit)
                assert kept and all(bs.dw_smem(c, block, 256 // block, size) + bs._SMEM_RESERVE <= limit for c in kept)
    # Nothing fits: the config that needs least, alone (its launch then reports the device's limit).
    (least,) = bs.mm_configs_for(mm, 128, 2, 48 * 1024)
    assert bs.mm_smem(least, 128, 2) == min(bs.mm_smem(c, 128, 2) for c in bs.mm_configs_for(mm, 128, 2, 10**9))
    # The autotuner's hooks read the limit of the operands' device.
    monkeypatch.setattr(bs, "_smem_limit", lambda device: A100_SMEM)
    p = torch.empty(0, dtype=torch.bfloat16)
    assert _tiles(bs._prune_dw(dw, {"dy_ptr": p}, B=128, G=2)) == [(64, 8, 3), (32, 8, 3)]
    a_desc = SimpleNamespace(base=p.float())  # the kernel's A operand is a TMA descriptor
    assert _tiles(bs._prune_mm(mm, {"a_desc": a_desc}, B=128)) == [(128, 32, 4, 3), (128, 32, 4, 5), (64, 32, 4, 3)]


def test_expected_dw_tasks_count_the_padded_last_task_of_each_list():
    """The dW split-K is sized for the tasks a mask of that density makes. Hand cases: a full 4×8 grid at b=128
    (G=2, grouped by row) is 4 rows of 4 tasks, no spread; an empty one a single (padding) task. A random mask's
    mean is n_lists · E[ceil(c / G)], above n_slots · density (34 against 32 at 25% of 32×8), and matches the
    masks `build_block_mask_info` actually groups; the high estimate covers what they make."""
    assert bs.expected_tasks((4, 8), 128, 1.0) == (16, 16)
    assert bs.expected_tasks((4, 8), 128, 0.0) == (1, 1)
    # One row of 2 blocks at density 1/2: c ~ Bin(2, 1/2) gives ceil(c/2) = 0, 1, 1 with weights 1/4, 1/2, 1/4.
    assert bs.expected_tasks((1, 2), 128, 0.5)[0] == round(0.75)
    gen = torch.Generator().manual_seed(0)
    for grid, density in [((32, 8), 0.25), ((8, 32), 0.1), ((12, 48), 0.3)]:
        mean, high = bs.expected_tasks(grid, 128, density)
        counts = [
            int((build_block_mask_info(torch.rand(grid, generator=gen) < density, 128).task_ids[:, 0] >= 0).sum())
            for _ in range(300)
        ]
        assert abs(sum(counts) / len(counts) - mean) <= 1.0, (grid, density, mean)
        assert sum(c <= high for c in counts) >= 0.95 * len(counts)
    assert bs.expected_tasks((32, 8), 128, 0.25)[0] == 34


def test_dw_splits_leave_room_for_more_tasks_than_expected(monkeypatch):
    """On 132 SMs: 32 tasks take 4 splits (128 programs, one wave). 34 expected, up to 42, take 3: 4 splits fill
    one wave at 33 tasks and run two at 34 (measured 0.092 against 0.133 ms on an H200), 3 stay in one wave."""
    monkeypatch.setattr(bs, "_num_sms", lambda device: 132)
    splits = bs.dw_splits.__wrapped__  # uncached: the patched SM count
    assert splits(16384, 32, None) == 4
    assert splits(16384, 34, None, 42) == 3
    assert splits(16384, 128, None, 128) == 1  # a dense grid's count is exact: one full wave
    assert splits(2048, 34, None, 42) == 2  # chunks of at least 1024 tokens


def test_block_scores_and_expand_hand_case():
    t = torch.tensor([[1.0, -2.0, 0.0, 0.0], [3.0, 4.0, 0.0, -1.0], [0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(block_scores(t, 2), torch.tensor([[10.0, 1.0], [0.0, 5.0]]))
    torch.testing.assert_close(block_scores(t, 2, "mean"), torch.tensor([[2.5, 0.25], [0.0, 1.25]]))
    torch.testing.assert_close(block_scores(t, 2, "l2"), torch.tensor([[30.0**0.5, 1.0], [0.0, 5.0]]))
    with pytest.raises(ValueError, match="reduce"):
        block_scores(t, 2, "max")
    em = expand_block_mask(torch.tensor([[True, False], [False, True]]), 2)
    assert em.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_module_keeps_linear_names_and_matches_reference():
    lin = nn.Linear(64, 96)
    mod = BlockSparseLinear.from_dense(lin, block=32)
    assert mod.weight is lin.weight and mod.bias is lin.bias
    assert list(mod.state_dict()) == list(lin.state_dict()) and not list(mod.buffers())
    x = torch.randn(4, 7, 64)
    torch.testing.assert_close(mod(x), lin(x))  # all-ones mask by default
    mask = _random_mask(3, 2, 0.5)
    mod.set_block_mask(mask)
    want = F.linear(x, lin.weight * expand_block_mask(mask, 32), lin.bias)
    torch.testing.assert_close(mod(x), want)
    assert list(mod.state_dict()) == ["weight", "bias"]
    with pytest.raises(ValueError, match="shape"):
        mod.set_block_mask(torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        BlockSparseLinear(64, 100, block=32)
    with pytest.raises(ValueError, match="block size"):
        build_block_mask_info(mask, 16)


def test_set_block_mask_rewrites_the_same_index_tensors():
    """A mask update writes the new lists into the tensors the module already holds (a CUDA-graph replay reads them
    at their recorded addresses), and they equal a fresh build: the forward is the new mask's."""
    mod = BlockSparseLinear(64, 96, block=32)
    mod.set_block_mask(_random_mask(3, 2, 0.5))
    ptrs = [t.data_ptr() for t in mod.block_mask_info().tensors()]
    mask = ~mod.block_mask
    mod.set_block_mask(mask)
    info, fresh = mod.block_mask_info(), build_block_mask_info(mask, 32)
    assert [t.data_ptr() for t in info.tensors()] == ptrs
    assert all(torch.equal(a, b) for a, b in zip(info.tensors(), fresh.tensors(), strict=True))
    assert info.n_blocks == fresh.n_blocks and torch.equal(info.mask, mask)
    x = torch.randn(4, 64)
    torch.testing.assert_close(mod(x), F.linear(x, mod.weight * expand_block_mask(mask, 32), mod.bias))


def test_dense_path_is_the_block_path_on_a_weight_zero_off_the_mask():
    """dense_path runs F.linear on the weight: with the weight zero off the mask (as MST keeps it) the output and dX
    are the block path's, and dW is the dense gradient, the block path's dense_wgrad one."""
    mask = _random_mask(3, 2, 0.5)
    mods = []
    for dense in (False, True):
        torch.manual_seed(0)
        mod = BlockSparseLinear(64, 96, block=32)
        mod.set_block_mask(mask)
        with torch.no_grad():
            mod.weight.mul_(expand_block_mask(mask, 32))
        mod.dense_path, mod.dense_wgrad = dense, True
        mods.append(mod)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(5, 96, generator=torch.Generator().manual_seed(2))
    grads = []
    for mod in mods:
        xi = x.clone().requires_grad_()
        y = mod(xi)
        y.backward(dy)
        grads.append((y, xi.grad, mod.weight.grad, mod.bias.grad))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(mods[1].weight.grad, dy.t() @ x)
    assert "dense_path" in repr(mods[1]) and "dense_path" not in repr(mods[0])


def test_autocast_keeps_fp32_masters_and_grads_in_their_dtype():
    """Under autocast the op sees F.linear's bf16 operands, returns bf16, and the fp32 weight/bias get fp32 grads
    (the Triton path writes dW in the weight's dtype; the reference goes through the same autograd function)."""
    torch.manual_seed(0)
    mod = BlockSparseLinear(64, 96, block=32, backend="ref")
    mask = _random_mask(3, 2, 0.5)
    mod.set_block_mask(mask)
    x = torch.randn(2, 5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mod(x)
        want = F.linear(x, mod.weight * expand_block_mask(mask, 32), mod.bias)
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y, want)
    y.float().sum().backward()
    assert mod.weight.grad.dtype == torch.float32 and mod.bias.grad.dtype == torch.float32
    assert (mod.weight.grad[expand_block_mask(mask, 32) == 0] == 0).all()
    x16 = x.reshape(-1, 64).to(torch.bfloat16).float()
    want_dw = expand_block_mask(mask, 32) * x16.sum(0).expand(96, 64)
    torch.testing.assert_close(mod.weight.grad, want_dw, rtol=1e-2, atol=1e-2)  # bf16 GEMM output


def test_named_triton_backend_raises_when_it_cannot_run():
    if torch.cuda.is_available():
        pytest.skip("triton can run here")
    info = build_block_mask_info(torch.ones(1, 1, dtype=torch.bool), 32)
    for _ in range(2):  # every call: the backend choice is cached, its refusal is not
        with pytest.raises(RuntimeError, match="cannot run"):
            block_sparse_linear(torch.randn(3, 32), torch.randn(32, 32), None, info, backend="triton")


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wrapper", ["eager", "custom_op"])
def test_fwd_bwd_launches(monkeypatch, w_dtype, wrapper):
    """The host work of one fwd+bwd is these launches, nothing per block or per layer: W packed once (the forward
    and dX share it), one kernel per GEMM, and for a 16-bit dW reduced over split token chunks its cast pass. The
    custom ops that compiled models call launch the same kernels as the eager autograd function."""
    launches = []

    class Stub:
        def __init__(self, name: str):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(self.name)

    for name in ("_pack_kernel", "_bsr_mm_kernel", "_sddmm_kernel", "_scatter_kernel"):
        monkeypatch.setattr(bs, name, Stub(name))
    info = build_block_mask_info(torch.ones(1, 2, dtype=torch.bool), 32)
    x = torch.randn(4096, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(32, 64, dtype=w_dtype, requires_grad=True)
    assert bs.dw_splits(4096, info.task_fixed.numel(), x.device) > 1  # the split-K path (4 "SMs" on a CPU)
    if wrapper == "eager":
        y = bs._BlockSparseLinearFn.apply(x, w, None, info, "triton", False, 1.0)
    else:
        y = bs._BlockSparseLinearOps.apply(x, w, None, info.grid, info.block, "triton", False, 1.0, *info.tensors())
    y.backward(torch.randn_like(y))
    scatter = ["_scatter_kernel"] if w_dtype != torch.float32 else []
    assert launches == ["_pack_kernel", "_bsr_mm_kernel", "_bsr_mm_kernel", "_sddmm_kernel", *scatter]
    assert w.grad.dtype == w_dtype


def test_custom_ops_pass_opcheck():
    """torch.library's own checks of the forward and backward ops (reference impl; dX and dW, and dW alone; each
    mode): schema
    and fakes against real outputs (shapes, dtypes, strides). The ops have no autograd of their own (an
    autograd.Function ties them together, see `_BlockSparseLinearOps`): the compile tests check its grads against
    eager ones."""
    torch.manual_seed(0)
    info = build_block_mask_info(_random_mask(3, 2, 0.5), 32)
    x, w, b = (torch.randn(*shape, requires_grad=True) for shape in [(10, 64), (96, 64), (96,)])
    dy = torch.randn(10, 96)
    checks = ("test_schema", "test_faketensor")
    mask_args = (info.tensors(), info.grid, 32, "ref")
    for mode in (0, bs.DENSE_WGRAD, bs.DENSE_PATH):
        for op, args in [
            (bs._fwd_op, (x, w, b, *mask_args, mode)),
            (bs._bwd_op, (dy, x.detach(), w.detach(), *mask_args, torch.float64, mode, 1.0, True, True)),
            (bs._bwd_op, (dy, x.detach(), w.detach(), *mask_args, torch.float64, mode, 0.5, False, True)),
        ]:
            torch.library.opcheck(op, args, test_utils=checks)


def _counted_compile(module: nn.Module, backend: str = "aot_eager"):
    """module compiled with fullgraph=True (any graph break raises) and a counter of the graphs dynamo compiled."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    return torch.compile(module, backend=counter, fullgraph=True), counter


def _fwd_bwd(fn, x, leaves, dy) -> list[torch.Tensor]:
    for t in leaves:
        t.grad = None
    y = fn(x)
    y.backward(dy)
    return [y.detach(), *(t.grad for t in leaves)]


def test_compiled_module_is_one_graph_that_mask_updates_and_modes_do_not_recompile():
    """fullgraph compile of the module (reference backend, fp32): output and x/W/bias grads equal eager's, and new
    masks (other block counts, other dW task counts, a single block) run the same graph; so do dense_wgrad and
    dense_path, bits of the runtime mode the ops read when they run."""
    torch.manual_seed(0)
    mod = BlockSparseLinear(64, 192, block=32, backend="ref")
    x = torch.randn(2, 5, 64, requires_grad=True)
    dy = torch.randn(2, 5, 192)
    leaves = [x, mod.weight, mod.bias]
    compiled, counter = _counted_compile(mod)
    single = torch.zeros(6, 2, dtype=torch.bool)
    single[3, 1] = True
    masks = [_random_mask(6, 2, 0.5), torch.ones(6, 2, dtype=torch.bool), _random_mask(6, 2, 0.2), single]
    for mask in masks:
        mod.set_block_mask(mask)
        for got, want in zip(_fwd_bwd(compiled, x, leaves, dy), _fwd_bwd(mod, x, leaves, dy), strict=True):
            torch.testing.assert_close(got, want)
        assert (mod.weight.grad[expand_block_mask(mask, 32) == 0] == 0).all()
    assert counter.frame_count == 1
    dense_dw = dy.reshape(-1, 192).t() @ x.detach().reshape(-1, 64)
    for wgrad, dense in [(True, False), (False, True), (True, True), (False, False)]:
        mod.dense_wgrad, mod.dense_path = wgrad, dense
        for got, want in zip(_fwd_bwd(compiled, x, leaves, dy), _fwd_bwd(mod, x, leaves, dy), strict=True):
            torch.testing.assert_close(got, want)
        if wgrad or dense:
            torch.testing.assert_close(mod.weight.grad, dense_dw)
        else:
            assert (mod.weight.grad[expand_block_mask(masks[-1], 32) == 0] == 0).all()
    assert counter.frame_count == 1


# The Triton kernels in the interpreter. It must be switched on before triton is imported, so this runs in a child
# process. The interpreter's tl.dot is wrong for bf16 (it multiplies the raw bits), so this checks fp32 math; bf16 is
# checked on the GPU below. Its fp32 -> bf16 cast truncates where compiled Triton rounds to nearest even, so the
# packed bf16 blocks are checked to one bf16 ulp. Triton 3.6's
# interpreter calls int() on 1-element arrays for runtime loop bounds, which numpy >= 2.3 rejects: the shim reads
# the element instead. Cases: M not a multiple of the 16-row interpreter tile (wrapped rows), dW split-K into the
# full fp32 dW (atomics), into the compact buffer + cast pass (fp64/bf16 results; tasks by column and by row),
# and unsplit (direct stores), by both dW kernels (TMA at b = 128 and 64, pointer loads at b = 32); then the
# kernels inside a compiled GPT.
_INTERPRETER_CHECK = textwrap.dedent(
    """
    import tests.triton_interp  # noqa: F401  (interpreter on, numpy shim)
    import torch

    from kernels import block_sparse as bs

    torch.manual_seed(0)
    for m, out_f, in_f, block, splits in [(40, 64, 96, 32, None), (80, 96, 64, 32, 3), (50, 128, 64, 64, 2),
                                          (64, 64, 128, 32, 1), (128, 64, 128, 32, 2), (130, 256, 512, 128, 3),
                                          (64, 512, 256, 128, None), (100, 192, 320, 64, None)]:
        mask = torch.rand(out_f // block, in_f // block) < 0.6
        mask[0] = False
        mask[1, 0] = True
        info = bs.build_block_mask_info(mask, block)
        x, w, b = torch.randn(m, in_f), torch.randn(out_f, in_f), torch.randn(out_f)
        dy = torch.randn(m, out_f)
        packed = bs.pack_blocks(w, info, torch.bfloat16)
        blocks = w.to(torch.bfloat16).view(out_f // block, block, in_f // block, block).transpose(1, 2)[mask]
        assert packed.shape[0] == mask.numel() and info.n_blocks == int(mask.sum())  # room for every block
        torch.testing.assert_close(packed[: info.n_blocks], blocks, rtol=2**-7, atol=0)
        want_dw = bs.dw_ref(dy, x, info)
        pairs = [
            (bs.fwd_triton(x, w, b, info), bs.fwd_ref(x, w, b, info)),
            (bs.dx_triton(dy, w, info), bs.dx_ref(dy, w, info)),
            (bs.dw_triton(dy, x, info, splits=splits), want_dw),
            (bs.dw_triton(dy, x, info, torch.float64, splits=splits), want_dw),
        ]
        xs, ws, bb = (t.clone().requires_grad_() for t in (x, w, b))
        y = bs.block_sparse_linear(xs, ws, bb, info, backend="triton")
        y.backward(dy)
        pairs += [(y, pairs[0][1]), (xs.grad, pairs[1][1]), (ws.grad, want_dw), (bb.grad, dy.sum(0))]
        for got, want in pairs:
            torch.testing.assert_close(got.to(want.dtype), want, rtol=1e-4, atol=1e-4)
        dw16 = bs.dw_triton(dy, x, info, torch.bfloat16, splits=splits)
        assert dw16.dtype == torch.bfloat16
        torch.testing.assert_close(dw16, want_dw.to(torch.bfloat16))

    # The forward/dX launch order at every tail length: none (token tile by token tile throughout), part of the
    # grid (the loop above: 2 programs a "multiprocessor", 4 in the interpreter), and all of it.
    info = bs.build_block_mask_info(torch.rand(5, 3) < 0.6, 32)
    x, w, dy = torch.randn(70, 96), torch.randn(160, 96), torch.randn(70, 160)
    default = bs.MM_TAIL_WAVES
    for waves in (0, 1, 100):
        bs.MM_TAIL_WAVES = waves
        torch.testing.assert_close(bs.fwd_triton(x, w, None, info), bs.fwd_ref(x, w, None, info), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(bs.dx_triton(dy, w, info), bs.dx_ref(dy, w, info), rtol=1e-4, atol=1e-4)
    bs.MM_TAIL_WAVES = default

    # An empty mask: lists of padding only; y is the bias, dX and dW are zero.
    info = bs.build_block_mask_info(torch.zeros(2, 3, dtype=torch.bool), 32)
    x, w, b, dy = torch.randn(8, 96), torch.randn(64, 96), torch.randn(64), torch.randn(8, 64)
    torch.testing.assert_close(bs.fwd_triton(x, w, b, info), b.expand(8, 64))
    assert not bs.dx_triton(dy, w, info).any() and not bs.dw_triton(dy, x, info, splits=2).any()

    # No rows (an empty batch): empty outputs, no launch (a TMA descriptor cannot describe an empty tensor).
    info = bs.build_block_mask_info(torch.ones(2, 3, dtype=torch.bool), 32)
    assert bs.fwd_triton(torch.randn(0, 96), w, b, info).shape == (0, 64)
    assert bs.dx_triton(torch.randn(0, 64), w, info).shape == (0, 96)

    # A GPT whose linears are block-sparse (MST's swap; `auto` picks Triton here) compiled with fullgraph=True:
    # one graph, the same loss and grads as eager, and new masks run it without a recompile.
    from torch._dynamo.testing import CompileCounterWithBackend

    from model.gpt import GPT, GPTConfig
    from sparsity.mst import MST, MSTConfig

    mc = GPTConfig(n_layer=1, n_head=2, n_embd=64, vocab_size=64, block_size=16)
    mst = MSTConfig(granularity="block", block_size=32, sparsity=0.5, warmup_frac=0, restore_frac=0, hsa_end=0)
    model = MST(mst, mc, 1000).attach(GPT(mc))
    assert bs._impl_name("auto", "cpu", "cpu") == "triton"
    idx = torch.randint(0, 64, (2, 16))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for update in range(2):
        if update:
            for m in model.modules():
                if isinstance(m, bs.BlockSparseLinear):
                    m.set_block_mask(torch.rand(m.block_mask.shape) < 0.7)
        results = []
        for fn in (model, compiled):
            model.zero_grad(set_to_none=True)
            loss = fn(idx, idx)[1]
            loss.backward()
            results.append([loss.detach(), *(p.grad.clone() for p in model.parameters())])
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want)
    assert counter.frame_count == 1
    print("ok")
    """
)


@pytest.mark.slow  # ~15 s on 2 CPU cores
def test_triton_kernels_match_reference_in_interpreter():
    check_interpreted(_INTERPRETER_CHECK)


# ---------------------------------------------------------------------------------------------------------------
# The kernels compiled for the H100 on the CPU (Triton ships ptxas): Triton's own shared-memory count


def _sm90_compile(kernel, args: tuple, kwargs: dict):
    """One launch of the @triton.jit `kernel` compiled for sm90 (its `.metadata.shared`, `.asm["ptx"]`), its
    arguments specialized as a CUDA launch specializes them (integers equal to 1 folded in, 16-byte divisibility)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 128)
    backend = make_backend(target)
    kwargs = {**kwargs, "debug": False, "instrumentation_mode": knobs.compilation.instrumentation_mode}
    bound, spec, options = create_function_from_signature(kernel.signature, kernel.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


class _Launches:
    """Stands in for a Triton kernel: records each launch's arguments instead of running it."""

    def __init__(self) -> None:
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@pytest.mark.slow  # ~15 s on 2 CPU cores the first time (Triton caches the compiled kernels)
@pytest.mark.parametrize("block", [32, 64, 128])
def test_kernels_compiled_for_h100_fit_its_shared_memory(monkeypatch, block):
    """Every launch of a 4096×1024 / 1024×4096 linear at b=128, 64 and 32 (GPT-2 350M's c_proj and c_fc; dW grouped
    by row and by column, G = 2 and 4 blocks a TMA task, 8 a pointer-load one; its three dW epilogues; bf16 and
    fp32 operands), compiled
    for sm90 with the kept config that needs the most shared memory: Triton's count stays within the estimate the
    pruning used and the H100's limit. Until its in-block offsets were fixed, the by-row dW into the compact buffer
    needed 256 KB whatever the config. Launched programmatically dependent (as on an H100): each kernel waits for
    the one before it once, the forward/dX before its first data load, dW after its last dot."""
    m, group = 1024, bs.DW_TILE // block
    tma = group in bs.TMA_DW_GROUPS
    dw_name = "_sddmm_tma_kernel" if tma else "_sddmm_kernel"
    kernels = {"mm": (bs._bsr_mm_kernel, _Launches()), "dw": (getattr(bs, dw_name), _Launches())}
    monkeypatch.setattr(bs, "_bsr_mm_kernel", kernels["mm"][1])
    monkeypatch.setattr(bs, dw_name, kernels["dw"][1])
    monkeypatch.setattr(bs, "_scatter_kernel", _Launches())
    monkeypatch.setattr(bs, "_pdl", lambda device: True)
    for dtype in (torch.bfloat16, torch.float32):
        for rows, cols in [(1024 // block, 4096 // block), (4096 // block, 1024 // block)]:  # dW by row, by column
            info = build_block_mask_info(torch.rand(rows, cols) < 0.25, block)
            assert info.group == group and info.by_row == (rows < cols)
            x, dy = torch.empty(m, cols * block, dtype=dtype), torch.empty(m, rows * block, dtype=dtype)
            if rows < cols:
                packed = torch.empty(info.nnz, block, block, dtype=dtype)
                bs.fwd_triton(x, None, None, info, packed)
                bs.dx_triton(dy, None, info, packed)
            outs = [torch.float32] if dtype == torch.float32 else [torch.float32, torch.bfloat16]
            for out, splits in [(dtype, 1)] + [(o, 2) for o in outs]:  # stores; atomics into full / compact dW
                bs.dw_triton(dy, x, info, out, splits, after_dx=True)
    mm, dw = _full_configs(("BM", "BK"), bs.MM_TILES), _full_configs(("BK",), bs.DW_TILES)
    n_compiled = 0
    for name, (kernel, launches) in kernels.items():
        for args, kwargs in launches.calls:
            named = dict(zip(kernel.arg_names, args))
            if name == "mm":
                need = lambda c, size=named["a_desc"].base.element_size(): bs.mm_smem(c, block, size)
                kept = bs.mm_configs_for(mm, block, named["a_desc"].base.element_size(), H100_SMEM)
            else:
                size = (named["dy_desc"].base if tma else named["dy_ptr"]).element_size()
                need = lambda c, size=size: bs.dw_smem(c, block, group, size)
                kept = bs.dw_configs_for(dw, block, group, size, H100_SMEM)
            config = max(kept, key=need)
            # the TMA boxes of that config, as the autotuner's pre-hook sets them
            if name == "mm" or tma:
                (bs._set_mm_boxes if name == "mm" else bs._set_dw_boxes)({**named, **kwargs, **config.all_kwargs()})
            assert kwargs["launch_pdl"]
            compiled = _sm90_compile(kernel.fn, args, {**kwargs, **config.all_kwargs()})
            shared = compiled.metadata.shared
            assert shared <= need(config) + bs._SMEM_RESERVE <= H100_SMEM, (name, kwargs, str(config), shared)
            ptx = compiled.asm["ptx"]
            assert ptx.count("griddepcontrol.wait") == 1
            wait = ptx.index("griddepcontrol.wait")
            last_dot = max(ptx.rfind("wgmma"), ptx.rfind("mma.sync"))
            if name == "mm":  # before the first TMA load, and it lets the next launch start only after it
                assert wait < ptx.index("cp.async.bulk.tensor") < last_dot
                assert wait < ptx.index("griddepcontrol.launch_dependents")
            else:  # after the last dot, before the outputs
                assert 0 < last_dot < wait < max(m.start() for m in re.finditer(r"\s(st|atom)\.global", ptx))
            n_compiled += 1
    assert n_compiled == 2 * 2 + 2 * (3 + 2)


# ---------------------------------------------------------------------------------------------------------------
# GPU: the Triton path against the reference (fp32 math on the same bf16 inputs)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("m", [1000, 4096])
def test_triton_matches_reference_bf16(block, density, m):
    out_f, in_f = 6 * block, 4 * block
    mask = torch.rand(6, 4) < density
    info = build_block_mask_info(mask, block, "cuda")
    x = torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) / in_f**0.5
    b = torch.randn(out_f, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, out_f, device="cuda", dtype=torch.bfloat16)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    y = block_sparse_linear(xs, ws, bs, info, backend="triton")
    y.backward(dy)
    xr, wr, br = (t.float().requires_grad_() for t in (x, w, b))
    yr = block_sparse_linear(xr, wr, br, info, backend="ref")
    yr.backward(dy.float())
    for got, want in [(y, yr), (xs.grad, xr.grad), (ws.grad, wr.grad), (bs.grad, br.grad)]:
        if want.abs().max() == 0:
            assert (got == 0).all()
        else:
            assert _rel_err(got, want) < 2e-2
    assert (ws.grad[expand_block_mask(mask.cuda(), block) == 0] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("block", [64, 128])
def test_triton_fp32_masters_under_autocast_match_reference(block):
    """The trainer's case: fp32 params, bf16 autocast. Same math as the reference on the bf16-rounded operands;
    the grads come back fp32 (dW straight from the split-K atomics into the full fp32 buffer)."""
    torch.manual_seed(2)
    out_f, in_f, m = 8 * block, 4 * block, 4096
    mask = torch.rand(8, 4) < 0.3
    mask[0, 0] = True
    info = build_block_mask_info(mask, block, "cuda")
    x = torch.randn(m, in_f, device="cuda")
    w = (torch.randn(out_f, in_f, device="cuda") / in_f**0.5).requires_grad_()
    b = torch.randn(out_f, device="cuda").requires_grad_()
    dy = torch.randn(m, out_f, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = block_sparse_linear(x, w, b, info, backend="triton")
    assert y.dtype == torch.bfloat16
    y.backward(dy)
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    xr, wr, br = (t.detach().to(torch.bfloat16).float().requires_grad_() for t in (x, w, b))
    yr = block_sparse_linear(xr, wr, br, info, backend="ref")
    yr.backward(dy.float())
    for got, want in [(y, yr), (w.grad, wr.grad), (b.grad, br.grad)]:
        assert _rel_err(got, want) < 2e-2
    assert (w.grad[expand_block_mask(mask.cuda(), block) == 0] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_dw_paths_bf16(block, splits, dtype):
    """dW with and without split-K, into fp32 (direct) and bf16 (compact + cast pass), both grouping axes, by both
    dW kernels (TMA: G = 2, 4 at b = 128, 64; pointer loads: G = 8 at b = 32)."""
    torch.manual_seed(3)
    for rows, cols in [(6, 2), (2, 6)]:
        mask = torch.rand(rows, cols) < 0.5
        mask[0, 0] = True
        info = build_block_mask_info(mask, block, "cuda")
        x = torch.randn(3000, cols * block, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(3000, rows * block, device="cuda", dtype=torch.bfloat16)
        got = bs.dw_triton(dy, x, info, dtype, splits=splits)
        assert got.dtype == dtype
        assert _rel_err(got, bs.dw_ref(dy.float(), x.float(), info)) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", [0.75, 0.9])
@pytest.mark.parametrize(("in_f", "out_f"), [(4096, 1024), (1024, 4096)])
def test_triton_gpt2_350m_mlp_shapes_match_reference(in_f, out_f, sparsity):
    """nn.Linear(4096, 1024) and (1024, 4096) (GPT-2 350M's c_proj and c_fc) at b=128 and 16k tokens, forward and
    backward: bf16 weights (dW split-K into the compact buffer, by row for 4096×1024: this ran out of shared memory
    on the H100) and fp32 masters under autocast (the trainer's case, dW into the full fp32 buffer)."""
    torch.manual_seed(4)
    block, m = 128, 16384
    rows, cols = out_f // block, in_f // block
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[torch.randperm(rows * cols)[: round((1 - sparsity) * rows * cols)]] = True
    mask = mask.view(rows, cols)
    info = build_block_mask_info(mask, block, "cuda")
    x = torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(out_f, in_f, device="cuda") / in_f**0.5
    dy = torch.randn(m, out_f, device="cuda", dtype=torch.bfloat16)
    xr, wr = x.float().requires_grad_(), w.to(torch.bfloat16).float().requires_grad_()
    yr = block_sparse_linear(xr, wr, None, info, backend="ref")
    yr.backward(dy.float())
    empty = expand_block_mask(mask.cuda(), block) == 0
    for weight, amp in [(w.to(torch.bfloat16), False), (w, True)]:
        xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            y = block_sparse_linear(xs, ws, None, info, backend="triton")
        y.backward(dy)
        assert y.dtype == torch.bfloat16 and ws.grad.dtype == weight.dtype
        for got, want in [(y, yr), (xs.grad, xr.grad), (ws.grad, wr.grad)]:
            assert _rel_err(got, want) < 2e-2
        assert (ws.grad[empty] == 0).all()


@pytest.mark.gpu
def test_module_on_gpu_under_autocast_with_dense_wgrad():
    torch.manual_seed(1)
    mod = BlockSparseLinear(256, 512, bias=False, block=64).cuda()
    mask = torch.rand(8, 4) < 0.4
    mask[0, 0] = True
    mod.set_block_mask(mask)
    x = torch.randn(3, 700, 256, device="cuda")
    emask = expand_block_mask(mask, 64).cuda().float()
    for dense_wgrad in (False, True):
        mod.dense_wgrad = dense_wgrad
        mod.weight.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = mod(x)
        assert y.dtype == torch.bfloat16 and y.shape == (3, 700, 512)
        y.float().square().sum().backward()
        assert mod.weight.grad.dtype == torch.float32
        w = mod.weight.detach().clone().requires_grad_()
        yr = F.linear(x, w * emask)
        yr.square().sum().backward()
        assert _rel_err(y, yr) < 2e-2
        want = w.grad if not dense_wgrad else (2 * yr.detach()).reshape(-1, 512).t() @ x.reshape(-1, 256)
        assert _rel_err(mod.weight.grad, want) < 3e-2


@pytest.mark.gpu
def test_module_fwd_bwd_replays_from_a_cuda_graph():
    """One fwd+bwd captured in a CUDA graph (bench_block_sparse's graph mode, CUDA-graph training): nothing on the
    per-call path syncs with the host or reads host state a replay would miss, so replays on new inputs match eager
    calls (fp32 masters under autocast, with bias; dW split-K into the fp32 grad)."""
    torch.manual_seed(5)
    mod = BlockSparseLinear(256, 512, block=64).cuda()
    mask = torch.rand(8, 4) < 0.5
    mask[0, 0] = True
    mod.set_block_mask(mask)
    x = torch.randn(4096, 256, device="cuda", requires_grad=True)
    dy = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16)
    leaves = [x, mod.weight, mod.bias]

    def call() -> torch.Tensor:
        for t in leaves:
            t.grad = None
        with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
            y = mod(x)
        y.backward(dy)
        return y.detach()  # a live autograd graph would keep AccumulateGrad nodes of another stream

    graph, y_static = capture(call)
    static = [y_static, *(t.grad for t in leaves)]
    for _ in range(2):
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
        graph.replay()
        eager = [call(), *(t.grad for t in leaves)]
        for got, want in zip(static, eager, strict=True):
            assert _rel_err(got, want) < 1e-4  # the dW atomics may add in another order


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_programmatic_launches_match_plain_ones(w_dtype):
    """With programmatic dependent launch (Hopper and later) each kernel may start while the one before it runs: the
    same gradients as plain launches, eagerly and as CUDA-graph replays, call after call (dW beside dX, split-K
    atomics into the buffer zeroed just before dX; the 16-bit dW's cast pass after it)."""
    if not bs.pdl_capable(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm90 or later")
    torch.manual_seed(7)
    info = build_block_mask_info(torch.rand(32, 8) < 0.25, 128, "cuda")
    x = torch.randn(8192, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(4096, 1024, device="cuda") / 32).to(w_dtype).requires_grad_()
    dy = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)

    def call() -> list[torch.Tensor]:
        x.grad = w.grad = None
        with torch.autocast("cuda", torch.bfloat16, enabled=w_dtype == torch.float32, cache_enabled=False):
            y = block_sparse_linear(x, w, None, info, backend="triton", dw_density=0.25)
        y.backward(dy)
        return [y.detach(), x.grad, w.grad]

    def close(got: torch.Tensor, want: torch.Tensor) -> None:
        assert _rel_err(got, want) < 1e-5  # fp32 atomics may add in another order

    assert bs.dw_splits(8192, bs.expected_tasks(info.grid, 128, 0.25)[0], x.device) > 1  # the atomics path
    check_pdl_against_plain(bs, call, close)


@pytest.mark.gpu
def test_compiled_module_matches_eager_cuda():
    """The trainer's case under inductor: fp32 masters and bias under bf16 autocast, Triton kernels inside the custom
    ops, fullgraph (a break raises). Every mask (other block and dW task counts) runs the one compiled graph and
    matches the eager call up to the order of dW's split-K atomics."""
    torch.manual_seed(6)
    mod = BlockSparseLinear(256, 512, block=64).cuda()
    x = torch.randn(4, 1024, 256, device="cuda", requires_grad=True)
    dy = torch.randn(4, 1024, 512, device="cuda", dtype=torch.bfloat16)
    leaves = [x, mod.weight, mod.bias]
    compiled, counter = _counted_compile(mod, "inductor")

    def amp(fn):
        def call(inp):
            with torch.autocast("cuda", torch.bfloat16):
                return fn(inp)

        return call

    for density in (0.5, 0.2, 1.0, 0.05):
        mask = torch.rand(8, 4) < density
        mask[0, 0] = True
        mod.set_block_mask(mask)
        got, want = _fwd_bwd(amp(compiled), x, leaves, dy), _fwd_bwd(amp(mod), x, leaves, dy)
        assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
        for g, w in zip(got[:3], want[:3], strict=True):
            assert _rel_err(g, w) < 1e-4
        # db = Σ dY: eager rounds the bf16 sum before the fp32 cast, inductor fuses the two and keeps fp32
        assert _rel_err(got[3], want[3]) < 2**-8
        assert (got[2][expand_block_mask(mask.cuda(), 64) == 0] == 0).all()
    assert counter.frame_count == 1
