"""Block-sparse linear layers for block-granular MST: only the nonzero b×b blocks of W are computed.

A weight W (out, in) is cut into b×b blocks; a bool block mask (out/b, in/b) says which blocks are on. All three
GEMMs of a linear skip the empty blocks:

  forward  Y = X Wᵀ      per output row block j of W, sum over its nonzero column blocks k   (CSR lists)
  dX       dX = dY W     per input column block k of W, sum over its nonzero row blocks j    (CSC lists)
  dW       dW = dYᵀ X    only the nonzero blocks (an SDDMM with a K = tokens reduction), written into a
                         full-size dW that is zero on empty blocks; mode `DENSE_WGRAD` computes the full dense
                         dW with one GEMM instead (MST scores growth with it on topology-update steps).

Mode `DENSE_PATH` runs all three as dense GEMMs (cuBLAS) on the weight as it is, for layers dense enough that
the block kernels lose to cuBLAS. The mode is an int the ops read when they run: `BlockSparseLinear.runtime_mode`
reaches a compiled graph as an input (`kernels.compile_runtime_modes`), so MST's switches between paths and its
update steps run the graph it has, and CUDA-graph replays record one graph per combination of modes.

The index lists are built once per mask (MST changes masks every ~100 steps) as int32 tensors on the weight's
device (`BlockMaskInfo`). Each forward packs the nonzero blocks of the weight parameter, in the compute dtype,
into a contiguous (nnz, b, b) tensor (one small launch reading only those blocks) that the forward and dX
kernels share: under autocast this is F.linear's cast of the fp32 master weight, done on the blocks in use,
and nothing is cached across optimizer steps. dW is written in the weight's own dtype, so autograd adds no
full-size casts. The plain-PyTorch reference (mask expanded to elements, dense matmul) is the spec and the CPU
fallback.

Kernel notes (H100). Forward/dX: one program per (token tile, output block), all blocks of a token tile adjacent
in the grid so the tile's activations come from HBM once; the packed W (≤ 8 MB bf16 for 4096×1024) stays in L2.
The K loop is flat over (nonzero block, 64-wide chunk), so the pipeliner keeps chunks (2 or 3, see `mm_smem`)
in flight across block boundaries. At b=128 the 256×128 tile (8 warps) reuses each loaded byte about as well as
cuBLAS's 128×256; at b ≤ 64 the output tile is only b wide, so those kernels stay L2-bandwidth bound. Both loads
and the output's store are TMA copies (tensor descriptors; rows past M read as zeros, never stored). The dW
SDDMM groups up to G blocks that share a row (or a column, whichever lists are longer) into one task, so the
shared dY (or X) slice is loaded once for G blocks (at b = 128 and 64, G = 2 and 4, as TMA boxes into G b×b
accumulators, `_sddmm_tma_kernel`; at b = 32, G = 8, as one b × G·b tile of pointer loads, `_sddmm_kernel`), and
splits the token reduction across programs (fp32 atomics) when there are too few tasks to fill the GPU's last
wave (`expected_tasks`, `dw_splits`): straight into the zeroed fp32 dW of fp32 master weights, or into a compact
(nnz, b, b) buffer that one pass casts into a 16-bit dW, writing the empty blocks' zeros in the same launch.
Nothing on the per-call path syncs with the host (all sizes come from the index tensors' shapes), so a fwd+bwd
can be captured in a CUDA graph. Host work per fwd+bwd: the autograd op, a zero-fill and 4 launches (pack, forward,
dX, dW; a 16-bit dW reduced over split token chunks adds its cast pass); the backend choice and the dW split
count are cached, so with short kernels the launches are what the host spends its time on. Under torch.compile the
same steps are two torch.library ops (forward; dX and dW), tied together by an autograd.Function that dynamo traces,
that take the mask as its three index tensors, so a model compiles into one graph, and a mask update (new index
tensors, new lengths) runs the same graph, no recompile. A compiled step's host cost per layer grows with the ops'
Python and with each tensor input (guards, size asserts, dispatch): `bench_block_sparse --host-cost` measures it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import define_op, launch_pdl, pdl_capable, select, triton_available
from kernels.autotune import autotune

BLOCK_SIZES = (32, 64, 128)
DENSE_WGRAD, DENSE_PATH = 1, 2  # bits of a call's mode: the dense dW; every GEMM dense (cuBLAS, W as it is)
DW_TILE = 256  # width of the dW tile: G = DW_TILE // b blocks share one load of their common dY or X slice
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------------------------
# Block masks, index lists and block scores


@dataclasses.dataclass(frozen=True)
class BlockMaskInfo:
    """A block mask and the int32 index lists the kernels walk. Build with `build_block_mask_info`.

    The lists live in three tensors (`tensors()`), grouped by what sizes them, and are read as views of those
    (`row_ptr`, ... below, made on first use). Each tensor is an input of every custom op and of a compiled graph,
    where each one costs host time per call (guards, size and stride asserts, dispatch), so a mask is three tensors,
    its grid (R, C) and b (`from_tensors`). Every size is fixed by (R, C) and b: `lists` has room for all R·C blocks
    and `tasks` for the most dW tasks any mask on that grid makes, the unused tail padded (the kernels never read
    it as a block, a padding task does no work). So a mask update changes values, never shapes: a compiled graph
    neither recompiles nor sees a size known only at run time, and CUDA graphs of it (compile_mode reduce-overhead)
    replay across updates. The cost: the packed weight and the compact dW buffer are sized for R·C blocks (the
    dense weight's size) whatever the density, and the packing and dW launches have programs for every slot.
    """

    index: torch.Tensor  # (2R + 2C + 2 + R·C,): row_ptr | row_order | col_ptr | col_order | block_id, sized by (R, C)
    lists: torch.Tensor  # (5, R·C): row_cols | col_rows | col_ids | blk_rows | blk_cols, then padding (block (0, 0))
    tasks: torch.Tensor  # (T·(2G+1),): task_fixed (T) | task_other (T, G) | task_ids (T, G), T = the most tasks
    grid: tuple[int, int]  # (R, C) = (out/b, in/b)
    block: int
    count: int = -1  # the nonzero blocks (the lists' used length); -1 where unknown (inside an op: never needed)

    # index: forward CSR (row j's nonzero column blocks are row_cols[row_ptr[j]:row_ptr[j+1]]), rows by nonzero count
    # descending (launch order); dX CSC (column k's nonzero row blocks are col_rows[col_ptr[k]:col_ptr[k+1]]), columns
    # in launch order; the compact index of each block, -1 where empty.
    @functools.cached_property
    def row_ptr(self) -> torch.Tensor:
        return self.index[: self.grid[0] + 1]

    @functools.cached_property
    def row_order(self) -> torch.Tensor:
        r = self.grid[0]
        return self.index[r + 1 : 2 * r + 1]

    @functools.cached_property
    def col_ptr(self) -> torch.Tensor:
        r, c = self.grid
        return self.index[2 * r + 1 : 2 * r + c + 2]

    @functools.cached_property
    def col_order(self) -> torch.Tensor:
        r, c = self.grid
        return self.index[2 * r + c + 2 : 2 * r + 2 * c + 2]

    @functools.cached_property
    def block_id(self) -> torch.Tensor:
        r, c = self.grid
        return self.index[2 * r + 2 * c + 2 :].view(r, c)

    # lists, nnz long: each CSR entry's column block; each CSC entry's row block and compact index (where dX finds
    # the block in the packed W); the nonzero blocks in row-major order (position = compact index).
    @functools.cached_property
    def row_cols(self) -> torch.Tensor:
        return self.lists[0]

    @functools.cached_property
    def col_rows(self) -> torch.Tensor:
        return self.lists[1]

    @functools.cached_property
    def col_ids(self) -> torch.Tensor:
        return self.lists[2]

    @functools.cached_property
    def blk_rows(self) -> torch.Tensor:
        return self.lists[3]

    @functools.cached_property
    def blk_cols(self) -> torch.Tensor:
        return self.lists[4]

    # tasks: the dW tasks: the row (or column) block the G grouped blocks share; their column (or row) blocks,
    # padding repeating slot 0; their compact indices, -1 for padding.
    @functools.cached_property
    def task_fixed(self) -> torch.Tensor:
        return self.tasks[: self.n_tasks]

    @functools.cached_property
    def task_other(self) -> torch.Tensor:
        t, g = self.n_tasks, self.group
        return self.tasks[t : t * (g + 1)].view(t, g)

    @functools.cached_property
    def task_ids(self) -> torch.Tensor:
        t, g = self.n_tasks, self.group
        return self.tasks[t * (g + 1) :].view(t, g)

    @property
    def n_tasks(self) -> int:
        return self.tasks.shape[0] // (2 * self.group + 1)

    @property
    def by_row(self) -> bool:
        """dW tasks group blocks of one row (else of one column)."""
        return _by_row(*self.grid)

    @property
    def group(self) -> int:
        """G, the blocks of one dW task."""
        return _group(self.block)

    @property
    def mask(self) -> torch.Tensor:
        """(R, C) bool, on the lists' device."""
        return self.block_id >= 0

    @property
    def nnz(self) -> int:
        """Slots of the lists (R·C): what the packed weight and the compact dW are sized by."""
        return self.lists.shape[1]

    @property
    def n_blocks(self) -> int:
        """Nonzero blocks."""
        return self.count if self.count >= 0 else int((self.block_id >= 0).sum())

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the weight this mask covers."""
        return self.grid[0] * self.block, self.grid[1] * self.block

    @property
    def device(self) -> torch.device:
        return self.index.device

    def density(self) -> float:
        return self.n_blocks / (self.grid[0] * self.grid[1])

    def tensors(self) -> list[torch.Tensor]:
        return [self.index, self.lists, self.tasks]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor], grid: tuple[int, int], block: int) -> BlockMaskInfo:
        return cls(*tensors, grid=tuple(grid), block=block)

    def to(self, device: torch.device | str) -> BlockMaskInfo:
        return dataclasses.replace(self, index=self.index.to(device), lists=self.lists.to(device),
                                   tasks=self.tasks.to(device))


def _by_row(n_rows: int, n_cols: int) -> bool:
    """Group dW blocks along the axis with the longer lists, so fewer of a task's G slots are padding."""
    return n_cols >= n_rows


def _group(block: int) -> int:
    return max(1, DW_TILE // block)


def _grouped_tasks(lengths: np.ndarray, other: np.ndarray, ids: np.ndarray, group: int, list_len: int):
    """Cut each list (lists laid end to end, `lengths` long, each at most `list_len`) into tasks of at most `group`
    entries; room for the most tasks any lists could make, the unused ones all padding (ids -1: no work)."""
    n_lists = lengths.size
    n_groups = (lengths + group - 1) // group
    first_group = np.cumsum(n_groups) - n_groups
    starts = np.cumsum(lengths) - lengths
    owner = np.repeat(np.arange(n_lists), lengths)
    pos = np.arange(other.size) - starts[owner]
    task = first_group[owner] + pos // group
    n_tasks = n_lists * _cdiv(list_len, group)
    task_other = np.zeros((n_tasks, group), np.int32)
    task_ids = np.full((n_tasks, group), -1, np.int32)
    task_other[task, pos % group] = other
    task_ids[task, pos % group] = ids
    # Padding slots re-read the task's first block (an L2 hit) and are not stored: an unmasked gather keeps the
    # kernel's loads vectorized, which a per-slot mask of unknown constancy would not.
    pad = task_ids < 0
    task_other[pad] = np.broadcast_to(task_other[:, :1], task_other.shape)[pad]
    task_fixed = np.zeros(n_tasks, np.int32)
    task_fixed[: int(n_groups.sum())] = np.repeat(np.arange(n_lists), n_groups)
    return task_fixed, task_other, task_ids


def build_block_mask_info(mask: torch.Tensor, block: int, device: torch.device | str | None = None) -> BlockMaskInfo:
    """Index lists for a (out/b, in/b) bool block mask, as int32 tensors on `device` (default: the mask's).

    Built on the host in numpy: a grid has at most a few thousand blocks, and numpy's per-call cost is a third of
    torch's (0.10 against 0.36 ms for a 12x48 grid on the CPU), which adds up over an MST update's ~50 layers."""
    if block not in BLOCK_SIZES:
        raise ValueError(f"block size must be one of {BLOCK_SIZES}, got {block}")
    if mask.dim() != 2:
        raise ValueError(f"block mask must be 2-D (out/b, in/b), got shape {tuple(mask.shape)}")
    device = mask.device if device is None else torch.device(device)
    m = mask.detach().to("cpu", torch.bool).numpy()
    n_rows, n_cols = m.shape
    blk_rows, blk_cols = np.nonzero(m)  # row-major, so each row's columns come out sorted
    row_counts, col_counts = m.sum(1), m.sum(0)
    t_cols, t_rows = np.nonzero(m.T)  # column-major walk: (column, row) pairs
    block_id = np.full((n_rows, n_cols), -1, np.int32)
    block_id[blk_rows, blk_cols] = np.arange(blk_rows.size, dtype=np.int32)
    if _by_row(n_rows, n_cols):
        tasks = _grouped_tasks(row_counts, blk_cols, block_id[blk_rows, blk_cols], _group(block), n_cols)
    else:
        tasks = _grouped_tasks(col_counts, t_rows, block_id[t_rows, t_cols], _group(block), n_rows)
    index = [
        [0], np.cumsum(row_counts),  # row_ptr
        np.argsort(-row_counts, kind="stable"),  # row_order: most blocks first, ties in row order
        [0], np.cumsum(col_counts),  # col_ptr
        np.argsort(-col_counts, kind="stable"),  # col_order
        block_id.ravel(),
    ]
    lists = [blk_cols, t_rows, block_id[t_rows, t_cols], blk_rows, blk_cols]  # row_cols is blk_cols: same walk
    padded = np.zeros((5, n_rows * n_cols), np.int32)  # the padding names block (0, 0): valid, never used
    padded[:, : blk_rows.size] = np.stack(lists)
    info = BlockMaskInfo(
        index=torch.from_numpy(np.concatenate(index).astype(np.int32)),
        lists=torch.from_numpy(padded),
        tasks=torch.from_numpy(np.concatenate([tasks[0], tasks[1].ravel(), tasks[2].ravel()])),
        grid=(n_rows, n_cols),
        block=block,
        count=int(blk_rows.size),
    )
    return info.to(device)


def expand_block_mask(block_mask: torch.Tensor, block: int) -> torch.Tensor:
    """(R, C) block mask -> (R·b, C·b) element mask."""
    return block_mask.repeat_interleave(block, 0).repeat_interleave(block, 1)


def block_scores(t: torch.Tensor, block: int, reduce: str = "sum") -> torch.Tensor:
    """Per-block score of |t| for a (out, in) tensor (weights for pruning, dense gradients for growth): (R, C) fp32;
    a (..., out, in) stack of them gives (..., R, C).

    Default `sum` (L1): a block's score is the sum of the element scores element-MST compares (|W|, |G|), so block
    MG with b=1 is exactly element MG, and one large entry cannot carry an otherwise useless block the way it does
    under `l2` (the whole b×b tile costs the same to compute whichever entries matter). `mean` ranks blocks of one
    layer exactly as `sum` does (equal block sizes); it only differs when comparing layers, which MST doesn't do
    (its per-layer counts come from the ER allocation). `l2` is the first-order loss decrease of one gradient step
    on the block (‖G_B‖²), offered for the gradient score.
    """
    if t.dim() < 2 or t.shape[-2] % block or t.shape[-1] % block:
        raise ValueError(f"tensor shape {tuple(t.shape)} is not a 2-D multiple of block size {block}")
    n_rows, n_cols = t.shape[-2] // block, t.shape[-1] // block
    v = t.detach().float().abs().reshape(*t.shape[:-2], n_rows, block, n_cols, block)
    if reduce == "sum":
        return v.sum((-3, -1))
    if reduce == "mean":
        return v.mean((-3, -1))
    if reduce == "l2":
        return v.square().sum((-3, -1)).sqrt()
    raise ValueError(f"block score reduce must be one of sum, mean, l2, got {reduce!r}")


# ---------------------------------------------------------------------------------------------------------------
# Reference (the spec; CPU fallback)


def _element_mask(info: BlockMaskInfo, like: torch.Tensor) -> torch.Tensor:
    return expand_block_mask(info.mask.to(like.device), info.block).to(like.dtype)


def fwd_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, info: BlockMaskInfo) -> torch.Tensor:
    return F.linear(x, weight * _element_mask(info, weight), None if bias is None else bias.to(x.dtype))


def dx_ref(dy: torch.Tensor, weight: torch.Tensor, info: BlockMaskInfo) -> torch.Tensor:
    return dy @ (weight * _element_mask(info, weight))


def dw_ref(dy: torch.Tensor, x: torch.Tensor, info: BlockMaskInfo) -> torch.Tensor:
    dw = dy.t() @ x
    return dw * _element_mask(info, dw)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels


# (BM, BK, warps, stages). b=128 wants the 256×128 tile (the A tile is reused across 128 output columns and the W
# tile across 256 rows: 85 flop/byte of L2 traffic, as cuBLAS's 128×256); the 128-row ones are for b ≤ 64 and fp32.
# Stages 3 keep 2 chunks in flight and stages 5 keep 3 (see `mm_smem`); stages 4 compiles to the stages-3 kernel.
MM_TILES = [
    (256, 64, 8, 3), (256, 64, 8, 5), (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 4, 5), (128, 32, 4, 3),
    (128, 32, 4, 5), (64, 32, 4, 3),
]  # fmt: skip
# (BK, warps, stages) for the b × G·b dW tile (128×256 at b=128); 32-wide chunks for fp32 operands, whose 64-wide
# ones need 288 KB in 3 stages at b=128. The 4-warp 64-wide ones are what the b=64 TMA kernel picks on an H200 (one
# warpgroup a 64-row dot); before they were listed it ran 32-wide chunks (`raw/h200-block-sparse-s27-first.json`).
DW_TILES = [(64, 8, 3), (64, 8, 4), (32, 8, 3), (32, 4, 4), (64, 4, 3), (64, 4, 4), (32, 4, 6)]

# A config's pipeline buffers must fit the device's shared memory a program may use (the opt-in maximum Triton
# launches against: 227 KB on the H100, 163 KB on the A100). Neither kernel needs other shared memory worth
# counting: the test suite compiles both for sm90 and checks Triton's own count against `mm_smem` / `dw_smem`.
# The reserve is for the barriers and index buffers Triton adds (tens of bytes).
_SMEM_RESERVE = 1024


def _configs(names: tuple[str, ...], sizes: list[tuple[int, ...]], pre_hook=None) -> list[triton.Config]:
    """(tile sizes..., num_warps, num_stages) rows; one small config in the interpreter (nothing to tune there)."""
    if _INTERPRET:
        return [triton.Config(dict.fromkeys(names, 16), num_warps=4, num_stages=1, pre_hook=pre_hook)]
    return [
        triton.Config(dict(zip(names, s[:-2], strict=True)), num_warps=s[-2], num_stages=s[-1], pre_hook=pre_hook)
        for s in sizes
    ]


def _set_mm_boxes(nargs: dict) -> None:
    """`_bsr_mm_kernel`'s pre-hook: its descriptors' boxes are the config's tiles (A: BM×BK; W: b×BK, read
    transposed, in the forward, BK×b in dX; the output C: BM×b)."""
    bm, bk, b = nargs["BM"], nargs["BK"], nargs["B"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [b, bk] if nargs["W_T"] else [bk, b]
    nargs["c_desc"].block_shape = [bm, b]


def mm_smem(config: triton.Config, block: int, elem_bytes: int) -> int:
    """Shared memory of `_bsr_mm_kernel` under `config`: the A (BM×BK) and W (BK×b) chunks in flight, and the
    BM×b output tile its TMA store leaves from. The index load that feeds the chunks' addresses takes a pipeline
    stage of its own, so num_stages s keeps max(2, (s+1) // 2) chunks in flight (Triton 3.6: s = 3 and 4 compile
    to the same kernel, s = 5 holds 3 chunks). Triton 3.6 puts a 16-bit output tile in the pipeline's buffers,
    dead by then, but gives an fp32 one its own."""
    chunks = max(2, (config.num_stages + 1) // 2)
    pipeline = chunks * (config.kwargs["BM"] + block) * config.kwargs["BK"] * elem_bytes
    out = config.kwargs["BM"] * block * elem_bytes
    return pipeline + out if elem_bytes == 4 else max(pipeline, out)


def dw_smem(config: triton.Config, block: int, group: int, elem_bytes: int) -> int:
    """Shared memory of `_sddmm_kernel` under `config`: num_stages chunks of the dY and X slices (BK×b and BK×G·b)."""
    return config.num_stages * config.kwargs["BK"] * (block + group * block) * elem_bytes


def _fitting(configs: list[triton.Config], need, limit: int) -> list[triton.Config]:
    """The configs whose shared memory fits `limit` bytes; if none does, the one that needs least (its launch then
    fails with Triton's own message: no config can run there)."""
    fits = [c for c in configs if need(c) + _SMEM_RESERVE <= limit]
    return fits or [min(configs, key=need)]


def mm_configs_for(configs: list[triton.Config], block: int, elem_bytes: int, limit: int) -> list[triton.Config]:
    """The `_bsr_mm_kernel` configs worth tuning for block size `block` on a device with `limit` bytes of shared
    memory a program."""
    shaped = [
        c
        for c in configs
        # b=128, 16-bit: 64-wide chunks, 2 a block; fp32 ones may need 32-wide to fit beside the fp32 output tile
        if (c.kwargs["BK"] == 64 if block == 128 and elem_bytes == 2 else c.kwargs["BK"] <= block)
        and c.kwargs["BM"] * block <= 128 * 32 * c.num_warps  # fp32 accumulator: at most 128 registers a thread
    ]
    return _fitting(shaped, lambda c: mm_smem(c, block, elem_bytes), limit)


def dw_configs_for(
    configs: list[triton.Config], block: int, group: int, elem_bytes: int, limit: int
) -> list[triton.Config]:
    """The `_sddmm_kernel` configs worth tuning for a b × G·b tile under `limit` bytes of shared memory."""
    shaped = [c for c in configs if block * group * block <= 128 * 32 * c.num_warps]
    return _fitting(shaped, lambda c: dw_smem(c, block, group, elem_bytes), limit)


@functools.cache
def _smem_limit(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _arg(named_args: dict, kwargs: dict, name: str):
    return named_args[name] if name in named_args else kwargs[name]


def _prune_mm(configs, named_args, **kwargs):
    a = named_args["a_desc"].base
    return mm_configs_for(configs, _arg(named_args, kwargs, "B"), a.element_size(), _smem_limit(a.device))


def _prune_dw(configs, named_args, **kwargs):
    dy = named_args["dy_ptr"] if "dy_ptr" in named_args else named_args["dy_desc"].base
    b, g = _arg(named_args, kwargs, "B"), _arg(named_args, kwargs, "G")
    return dw_configs_for(configs, b, g, dy.element_size(), _smem_limit(dy.device))


_MM_CONFIGS = _configs(("BM", "BK"), MM_TILES, _set_mm_boxes)
_DW_CONFIGS = _configs(("BK",), DW_TILES)
MM_TAIL_WAVES = 2  # `_bsr_mm_kernel`'s list-major tail, in programs per multiprocessor
_DW_ALIGN = 64  # split-K chunks are a multiple of every BK
# The task sizes `_sddmm_tma_kernel` is written for; G = 8 (b = 32) takes the pointer-load kernel: through TMA with
# G = 4 (DW_TILE 128) it ran 0.66–0.88x of it on an H200 (`results/raw/h200-block-sparse-s27-first.json`).
TMA_DW_GROUPS = (2, 4)


@autotune(
    configs=_MM_CONFIGS,
    key=["M", "NJ", "B", "W_T", "NNZ_LOG2"],
    prune_configs_by={"early_config_prune": _prune_mm},
)
@triton.jit
def _bsr_mm_kernel(
    a_desc, w_desc, c_desc, bias_ptr, ptr_ptr, idx_ptr, ids_ptr, order_ptr, M, NJ, NNZ_LOG2, TAIL,
    W_T: tl.constexpr, IDS: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr, B: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """C[:, j-block] = sum over p in list j of A[:, idx[p]-block] @ (block ids[p] of the packed W, transposed if W_T).

    Forward: j = row block of W, lists = CSR, ids = p (IDS=False), W_T. dX: j = column block, lists = CSC with
    their packed ids. The K loop is flat over (block, BK-chunk) so Triton's pipeliner sees one loop with both
    loads (and the index load feeding them, a stage ahead) in flight. Both loads are TMA copies (tensor
    descriptors, boxes set per config by `_set_mm_boxes`): a data-dependent block offset is just a coordinate,
    with no per-thread address math or pointer registers, and rows past M come back as zeros. On an H200 that
    made the forward and dX 8–18% faster than the same loop over pointer loads. The output tile leaves through a
    TMA store too (rows past M clipped): 1–7% faster than a pointer store per kernel, 2–3.5% per fwd+bwd
    (`results/raw/h200-block-sparse-s29.json`).

    Launch order: token tile by token tile, its NJ programs together (its A rows are read from HBM about once),
    longest list first; but the last ~TAIL programs go list by list, longest first, across the last token tiles.
    Programs are dispatched in order as multiprocessors free up, so only the end is unbalanced: token-tile order
    ends on a wave that mixes long and short lists, and the multiprocessors that drew short ones wait. On an H200
    the list-major tail (2 programs a multiprocessor) made the forward and dX 0–7% faster, most at 90% sparsity
    and on short lists (`results/raw/h200-block-sparse-s28.json`).
    """
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_tail = tl.minimum(n_m, tl.cdiv(TAIL, NJ))  # token tiles launched list-major
    head = (n_m - n_tail) * NJ
    q = tl.maximum(pid - head, 0)  # both sides of each select are computed: keep the unused one well defined
    n_q = tl.maximum(n_tail, 1)
    pid_m = tl.where(pid < head, pid // NJ, n_m - n_tail + q % n_q)
    jj = tl.where(pid < head, pid % NJ, q // n_q)
    j = tl.load(order_ptr + jj)
    start = tl.load(ptr_ptr + j)
    end = tl.load(ptr_ptr + j + 1)
    if PDL:  # after the index loads (only a mask update writes the lists, before the forward's packing)
        gdc_wait()
        gdc_launch_dependents()
    S: tl.constexpr = B // BK
    acc = tl.zeros((BM, B), dtype=tl.float32)
    for t in range(start * S, end * S):
        p = t // S
        kk = (t % S) * BK
        k = tl.load(idx_ptr + p)
        if IDS:
            blk = tl.load(ids_ptr + p)
        else:
            blk = p
        a = a_desc.load([pid_m * BM, k * B + kk])
        if W_T:  # the packed W viewed as (nnz·b, b): block blk is its rows blk·b to blk·b + b
            w = w_desc.load([blk * B, kk]).T
        else:
            w = w_desc.load([blk * B + kk, 0])
        acc = tl.dot(a, w, acc)
    if HAS_BIAS:  # rounded to the activations' dtype first, as autocast casts the bias
        acc += tl.load(bias_ptr + j * B + tl.arange(0, B)).to(c_desc.dtype).to(tl.float32)[None, :]
    c_desc.store([pid_m * BM, j * B], acc.to(c_desc.dtype))


@triton.jit
def _pack_kernel(w_ptr, out_ptr, rows_ptr, cols_ptr, block_id_ptr, C, stride_w0, stride_w1, B: tl.constexpr,
                 PDL: tl.constexpr):  # fmt: skip
    """Packed block p (row-major b×b, the compute dtype) = W block (rows[p], cols[p]): the only cast of W. A padding
    slot (its block's id is not p) moves nothing."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0)
    r = tl.load(rows_ptr + pid).to(tl.int64)
    c = tl.load(cols_ptr + pid).to(tl.int64)
    used = tl.load(block_id_ptr + r * C + c) == pid
    offs = tl.arange(0, B)
    inb = (offs[:, None] >= 0) & used
    w = tl.load(w_ptr + (r * B + offs)[:, None] * stride_w0 + (c * B + offs)[None, :] * stride_w1, mask=inb)
    out = out_ptr + pid.to(tl.int64) * (B * B) + offs[:, None] * B + offs[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=inb)  # round-to-nearest-even, as torch casts


@autotune(
    configs=_DW_CONFIGS,
    key=["M", "B", "N_TASKS_LOG2", "BY_ROW", "FULL", "ATOMIC"],
    reset_to_zero=["out_ptr"],  # split-K accumulates with atomics, so benchmarking runs must start from zero
    prune_configs_by={"early_config_prune": _prune_dw},
)
@triton.jit
def _sddmm_kernel(
    dy_ptr, x_ptr, out_ptr, fixed_ptr, other_ptr, ids_ptr,
    M, chunk, n_tasks, N_TASKS_LOG2, stride_dm, stride_dk, stride_xm, stride_xk, stride_or, stride_oc,
    B: tl.constexpr, G: tl.constexpr, BY_ROW: tl.constexpr, FULL: tl.constexpr, ATOMIC: tl.constexpr,
    EVEN: tl.constexpr, LATE_WAIT: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """For task t, split s: acc = dY[rows of s, its dW rows]ᵀ @ X[rows of s, its dW columns], a tile of dW itself.

    By row: the task's blocks share row block `fixed`, so acc is (B, G·B): dW[fixed·B + i, other_g·B + g%B]. By
    column: they share column block `fixed`, acc is (G·B, B): dW[other_g·B + g%B, fixed·B + i]. Either way a
    thread's adjacent accumulator elements are adjacent in dW, so the stores (and split-K atomics) are coalesced:
    by column, the transposed (B, G·B) tile made them a column-strided scatter, 1.7x the time of the by-row case
    on an H200. FULL writes into the (out, in) dW (zeroed by the caller) at its strides, else into the compact
    (nnz, B, B) fp32 buffer at the block's id. ATOMIC adds (split-K) instead of storing. LATE_WAIT: launched
    programmatically dependent on the dX kernel, which writes nothing this kernel reads: the loop runs beside dX's
    last wave, and only the outputs wait for the kernels before (see `_pdl`).
    """
    pid = tl.program_id(0)
    split = pid // n_tasks  # all tasks of one token chunk run together, so that chunk of dY and X stays in L2
    t = pid % n_tasks
    fixed = tl.load(fixed_ptr + t)
    offs_i = tl.arange(0, B)
    offs_g = tl.arange(0, G * B)
    other = tl.load(other_ptr + t * G + offs_g // B)
    gathered = tl.max_contiguous(tl.multiple_of(other * B + offs_g % B, B), B)  # G runs of B contiguous columns
    m_start = split * chunk
    m_end = tl.minimum(m_start + chunk, M)
    m_end = tl.where(tl.load(ids_ptr + t * G) < 0, m_start, m_end)  # a padding task (slot 0 empty): no work
    offs_k = tl.arange(0, BK)
    if BY_ROW:
        dy_cols, x_cols = fixed * B + offs_i, gathered
        acc = tl.zeros((B, G * B), dtype=tl.float32)
    else:
        dy_cols, x_cols = gathered, fixed * B + offs_i
        acc = tl.zeros((G * B, B), dtype=tl.float32)
    for m0 in range(m_start, m_end, BK):
        rows = (m0 + offs_k).to(tl.int64)
        if EVEN:  # every chunk is whole: unmasked loads
            d = tl.load(dy_ptr + rows[:, None] * stride_dm + dy_cols[None, :] * stride_dk)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + x_cols[None, :] * stride_xk)
        else:
            r_mask = (rows < m_end)[:, None]
            d = tl.load(dy_ptr + rows[:, None] * stride_dm + dy_cols[None, :] * stride_dk, mask=r_mask, other=0.0)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + x_cols[None, :] * stride_xk, mask=r_mask, other=0.0)
        acc = tl.dot(tl.trans(d), x, acc)
    if LATE_WAIT:
        gdc_wait()
    ids = tl.load(ids_ptr + t * G + offs_g // B)
    # The in-block offsets come straight from the aranges: written as `r_el % B`, `c_el % B` they hid their
    # contiguity, and the atomics went through a layout conversion of the tile of 64-bit pointers in shared
    # memory (256 KB at b=128, over the H100's 227 KB whatever the config).
    if BY_ROW:
        r_el, c_el = (fixed * B + offs_i)[:, None], (other * B + offs_g % B)[None, :]
        local, blk = offs_i[:, None] * B + (offs_g % B)[None, :], ids[None, :]
    else:
        r_el, c_el = (other * B + offs_g % B)[:, None], (fixed * B + offs_i)[None, :]
        local, blk = (offs_g % B)[:, None] * B + offs_i[None, :], ids[:, None]
    if FULL:
        out = out_ptr + r_el.to(tl.int64) * stride_or + c_el.to(tl.int64) * stride_oc
    else:
        out = out_ptr + blk.to(tl.int64) * (B * B) + local
    o_mask = (local >= 0) & (blk >= 0)  # padding slots (id -1) are never written
    if ATOMIC:
        tl.atomic_add(out, acc, mask=o_mask, sem="relaxed")
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


def _set_dw_boxes(nargs: dict) -> None:
    bk, b = nargs["BK"], nargs["B"]
    nargs["dy_desc"].block_shape = [bk, b]
    nargs["x_desc"].block_shape = [bk, b]


@autotune(
    configs=_configs(("BK",), DW_TILES, _set_dw_boxes),
    key=["M", "B", "G", "N_TASKS_LOG2", "BY_ROW", "FULL", "ATOMIC"],
    reset_to_zero=["out_ptr"],
    prune_configs_by={"early_config_prune": _prune_dw},
)
@triton.jit
def _sddmm_tma_kernel(
    dy_desc, x_desc, out_ptr, fixed_ptr, other_ptr, ids_ptr,
    M, chunk, n_tasks, N_TASKS_LOG2, stride_or, stride_oc,
    B: tl.constexpr, G: tl.constexpr, BY_ROW: tl.constexpr, FULL: tl.constexpr, ATOMIC: tl.constexpr,
    LATE_WAIT: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """`_sddmm_kernel`'s tasks for G = 2 or 4 (b = 128 or 64) with TMA loads: the task's blocks are G b×b
    accumulators, each fed by its own BK×b box of the gathered operand (a box is one contiguous run of columns; the
    shared slice is one box, loaded once for all G dots). No per-thread address math, and rows past M come back
    as zeros; split chunks are multiples of every BK, so no chunk reads into the next split's rows. Each dot is
    (gathered box)ᵀ @ (shared box), by column dY_otherᵀ X_fixed = dW[other, fixed]; by row X_otherᵀ dY_fixed is
    dW[fixed, other]ᵀ, transposed once after the loop. The by-row dot as dY_fixedᵀ X_other (no final transpose)
    was 3–7% slower at b = 64 on an H200 and no faster at b = 128 (`results/raw/h200-block-sparse-s27.json`).
    Against the pointer-load kernel: 15–20% faster at b = 128 (`h200-block-sparse-s25.json`), 5–13% at b = 64
    and 75% sparsity. The accumulators are named, not a list (Triton carries no lists through a loop), so G = 4's
    two extra ones sit under static `if`s. The outputs go through `_dw_tile_out`, one b×b block at a time."""
    pid = tl.program_id(0)
    split = pid // n_tasks
    t = pid % n_tasks
    fixed = tl.load(fixed_ptr + t)
    others = other_ptr + t * G
    o0, o1 = tl.load(others), tl.load(others + 1)
    acc0 = tl.zeros((B, B), dtype=tl.float32)
    acc1 = tl.zeros((B, B), dtype=tl.float32)
    if G == 4:
        o2, o3 = tl.load(others + 2), tl.load(others + 3)
        acc2 = tl.zeros((B, B), dtype=tl.float32)
        acc3 = tl.zeros((B, B), dtype=tl.float32)
    if BY_ROW:
        gathered, shared = x_desc, dy_desc
    else:
        gathered, shared = dy_desc, x_desc
    m_start = split * chunk
    m_end = tl.minimum(m_start + chunk, M)
    m_end = tl.where(tl.load(ids_ptr + t * G) < 0, m_start, m_end)
    for m0 in range(m_start, m_end, BK):
        s = shared.load([m0, fixed * B])
        acc0 = tl.dot(gathered.load([m0, o0 * B]).T, s, acc0)
        acc1 = tl.dot(gathered.load([m0, o1 * B]).T, s, acc1)
        if G == 4:
            acc2 = tl.dot(gathered.load([m0, o2 * B]).T, s, acc2)
            acc3 = tl.dot(gathered.load([m0, o3 * B]).T, s, acc3)
    if LATE_WAIT:  # as `_sddmm_kernel`'s
        gdc_wait()
    offs = tl.arange(0, B)
    ids = ids_ptr + t * G
    _dw_tile_out(out_ptr, acc0, fixed, o0, tl.load(ids), offs, stride_or, stride_oc, B, BY_ROW, FULL, ATOMIC)
    _dw_tile_out(out_ptr, acc1, fixed, o1, tl.load(ids + 1), offs, stride_or, stride_oc, B, BY_ROW, FULL, ATOMIC)
    if G == 4:
        _dw_tile_out(out_ptr, acc2, fixed, o2, tl.load(ids + 2), offs, stride_or, stride_oc, B, BY_ROW, FULL, ATOMIC)
        _dw_tile_out(out_ptr, acc3, fixed, o3, tl.load(ids + 3), offs, stride_or, stride_oc, B, BY_ROW, FULL, ATOMIC)


@triton.jit
def _dw_tile_out(out_ptr, acc, fixed, other, blk, offs, stride_or, stride_oc, B: tl.constexpr, BY_ROW: tl.constexpr,
                 FULL: tl.constexpr, ATOMIC: tl.constexpr):  # fmt: skip
    """Block (fixed, other) (by row; (other, fixed) by column) of dW from its b×b tile, by row transposed; id -1:
    padding, not written."""
    if BY_ROW:
        acc = tl.trans(acc)
        r_el, c_el = fixed * B + offs, other * B + offs
    else:
        r_el, c_el = other * B + offs, fixed * B + offs
    if FULL:
        out = out_ptr + r_el.to(tl.int64)[:, None] * stride_or + c_el.to(tl.int64)[None, :] * stride_oc
    else:
        out = out_ptr + blk.to(tl.int64) * (B * B) + offs[:, None] * B + offs[None, :]
    o_mask = (offs[:, None] >= 0) & (blk >= 0)
    if ATOMIC:
        tl.atomic_add(out, acc, mask=o_mask, sem="relaxed")
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _scatter_kernel(compact_ptr, block_id_ptr, out_ptr, C, stride_o0, stride_o1, B: tl.constexpr,
                    PDL: tl.constexpr):  # fmt: skip
    """Full-size dW from the compact fp32 blocks, zero on empty blocks, in the output's dtype (one pass)."""
    if PDL:
        gdc_wait()
    pid = tl.program_id(0)
    r = (pid // C).to(tl.int64)
    c = (pid % C).to(tl.int64)
    bid = tl.load(block_id_ptr + pid).to(tl.int64)
    offs = tl.arange(0, B)
    v = tl.load(compact_ptr + bid * (B * B) + offs[:, None] * B + offs[None, :],
                mask=(offs[:, None] >= 0) & (bid >= 0), other=0.0)  # fmt: skip
    out = out_ptr + (r * B + offs)[:, None] * stride_o0 + (c * B + offs)[None, :] * stride_o1
    tl.store(out, v.to(out_ptr.dtype.element_ty))


def _cdiv(a: int, b: int) -> int:
    """triton.cdiv for host code: that one is a constexpr function, ~3 µs a call against ~0.1 µs for this."""
    return -(-a // b)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


USE_PDL = True  # benchmarks flip it to measure what programmatic dependent launch gains


def _pdl(device: torch.device) -> bool:
    """Launch the kernels programmatically dependent on the kernel before them (Hopper and later): a launch may
    start its programs while the kernel before it still runs, and each program waits (griddepcontrol.wait) for
    that kernel to finish before it reads anything. So a launch's latency, and its programs' index loads, overlap
    the previous kernel's last wave. The packing, forward and dX kernels wait before any data they read, having
    let their own dependents start only after that wait (so that a chain of such launches never overtakes a kernel
    outside it); the forward and dX read their index lists first, which only a mask update writes, before the
    forward's packing. The dW kernel runs its whole loop beside the dX kernel before it (dX writes nothing dW
    reads) and waits only before its outputs, which the zero-fill before dX must precede. On an H200, per fwd+bwd:
    0.8-0.9% faster at 1024x4096, 75%, 2-3.6% at 90% and at b=64 (`results/raw/h200-block-sparse-s30.json`)."""
    return USE_PDL and pdl_capable(device)


def pack_blocks(weight: torch.Tensor, info: BlockMaskInfo, dtype: torch.dtype) -> torch.Tensor:
    """The nonzero blocks of `weight` (any float dtype, e.g. the fp32 master) as (nnz, b, b) in `dtype`, in compact
    (row-major block) order. Under autocast this is the cast F.linear would do, restricted to the blocks in use."""
    b = info.block
    packed = torch.empty(info.nnz, b, b, device=weight.device, dtype=dtype)
    if info.nnz:
        pdl = _pdl(weight.device)
        _pack_kernel[(info.nnz,)](
            weight, packed, info.blk_rows, info.blk_cols, info.block_id, info.grid[1], weight.stride(0),
            weight.stride(1), B=b, PDL=pdl,
            num_warps=8 if b == 128 else 4, **launch_pdl(pdl),
        )  # fmt: skip
    return packed


def _descriptor(t: torch.Tensor) -> TensorDescriptor:
    """A TMA descriptor of the 2-D t, or of a contiguous copy where t's layout cannot be described (TMA needs a
    16-byte aligned base and rows, unit stride along them). Its box is a placeholder until the autotuner's config
    is known (the kernels' pre-hooks set it)."""
    if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
        t = t.contiguous()
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16])


def _mm(a: torch.Tensor, packed: torch.Tensor, bias, info: BlockMaskInfo, n: int, forward: bool) -> torch.Tensor:
    m = a.shape[0]
    if info.nnz == 0:  # nothing to multiply (and an empty index tensor has no pointer to pass)
        c = a.new_zeros(m, n)
        return c + bias.to(a.dtype) if bias is not None else c
    c = torch.empty(m, n, device=a.device, dtype=a.dtype)
    if forward:
        n_j, lists = info.grid[0], (info.row_ptr, info.row_cols, info.row_cols, info.row_order)
    else:
        n_j, lists = info.grid[1], (info.col_ptr, info.col_rows, info.col_ids, info.col_order)
    if m == 0:  # no rows: a TMA descriptor cannot describe an empty tensor
        return c + bias.to(a.dtype) if bias is not None else c
    b = info.block
    a_desc = _descriptor(a)
    w_desc = _descriptor(packed.view(-1, b))  # (nnz·b, b)
    c_desc = _descriptor(c)
    assert c_desc.base is c  # fresh and contiguous, so described in place: stores into a copy would be lost
    grid = lambda meta: (_cdiv(m, meta["BM"]) * n_j,)
    pdl = _pdl(a.device)
    _bsr_mm_kernel[grid](
        a_desc, w_desc, c_desc, bias if bias is not None else c, *lists,
        m, n_j, info.nnz.bit_length(), MM_TAIL_WAVES * _num_sms(a.device),
        W_T=forward, IDS=not forward, HAS_BIAS=bias is not None, PDL=pdl, B=b, **launch_pdl(pdl),
    )  # fmt: skip
    return c


def fwd_triton(x, weight, bias, info: BlockMaskInfo, packed: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, in) @ (W ⊙ M)ᵀ + bias in x's dtype; `packed` = pack_blocks(weight, info, x.dtype) if already made."""
    packed = pack_blocks(weight, info, x.dtype) if packed is None else packed
    return _mm(x, packed, bias, info, info.shape[0], forward=True)


def dx_triton(dy, weight, info: BlockMaskInfo, packed: torch.Tensor | None = None) -> torch.Tensor:
    """dy (M, out) @ (W ⊙ M) in dy's dtype, from the same packed blocks as the forward."""
    packed = pack_blocks(weight, info, dy.dtype) if packed is None else packed
    return _mm(dy, packed, None, info, info.shape[1], forward=False)


@functools.cache  # a loop of up to 64 steps, the same answer for every call of a layer
def dw_splits(m: int, n_tasks: int, device: torch.device, n_high: int | None = None) -> int:
    """Token-chunks of the dW reduction: the fewest that fill the GPU's last wave of programs about as well as any
    (each split adds b·G·b fp32 atomics a task), chunks of at least 1024 tokens. Where `n_tasks` is an expectation
    (the real count is on the device), waves are counted for `n_high` tasks: a split count that fills the last wave
    exactly runs one more wave as soon as the mask makes one task more."""
    sms = _num_sms(device)
    n_high = n_tasks if n_high is None else max(n_high, n_tasks)
    best, best_fill = 1, 0.0
    for s in range(1, max(1, min(m // 1024, 64)) + 1):
        fill = n_tasks * s / (_cdiv(n_high * s, sms) * sms)
        if fill > best_fill + 0.05:
            best, best_fill = s, fill
    return best


@functools.cache
def expected_tasks(grid: tuple[int, int], block: int, density: float) -> tuple[int, int]:
    """dW tasks of a random mask on `grid` with each block on with probability `density`, as (mean, mean + 2 sd):
    each list (row or column, as `_by_row` groups them) of c blocks makes ceil(c / G) tasks, so the mean is
    n_lists · E[ceil(c / G)] for c ~ Binomial(list length, density), not n_slots · density: the lists' last tasks
    are partly padding. At 25% of a 32×8 grid (b=128, G=2) that is 34 tasks, not 32, and split-K sized for 32
    (4 splits: 128 programs on 132 SMs) ran a second wave whenever the mask made more than 33, 1.5x the dW time on
    an H200. The sd treats lists as independent (an upper bound for masks with a fixed block count)."""
    n_rows, n_cols = grid
    n_lists, length = (n_rows, n_cols) if _by_row(n_rows, n_cols) else (n_cols, n_rows)
    c = np.arange(length + 1)
    log_pmf = _log_binomial_pmf(c, length, min(max(density, 1e-9), 1.0))
    pmf, tasks = np.exp(log_pmf), -(-c // _group(block))
    mean = float(np.sum(pmf * tasks))
    sd = (n_lists * max(float(np.sum(pmf * tasks**2)) - mean**2, 0.0)) ** 0.5
    return max(1, round(n_lists * mean)), max(1, math.ceil(n_lists * mean + 2 * sd))


def _log_binomial_pmf(c: np.ndarray, n: int, p: float) -> np.ndarray:
    if p >= 1.0:
        return np.where(c == n, 0.0, -np.inf)
    log_choose = np.array([math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) for k in c])
    return log_choose + c * math.log(p) + (n - c) * math.log(1 - p)


class _DwPlan(NamedTuple):
    chunk: int  # tokens a program reduces over
    splits: int  # token chunks (programs a task)
    atomic: bool  # split-K: fp32 atomics into a zeroed buffer
    full: bool  # the kernel writes the (out, in) dW itself (else a compact (nnz, b, b) fp32 buffer, then a cast)


@functools.cache  # dw_buffer and dw_triton both ask, once each per backward
def _dw_plan(m: int, grid: tuple[int, int], block: int, dtype: torch.dtype, device: torch.device, splits: int | None,
             density: float) -> _DwPlan:  # fmt: skip
    # The grid has a program per task slot (padding ones exit at once): split-K is sized for the tasks the expected
    # density makes, since the real count is on the device and a replayed CUDA graph cannot change its grid anyway.
    if splits is None:
        mean, high = expected_tasks(grid, block, density)
        splits = dw_splits(m, mean, device, high)
    chunk = _cdiv(_cdiv(m, splits), _DW_ALIGN) * _DW_ALIGN
    splits = _cdiv(m, chunk)
    atomic = splits > 1
    return _DwPlan(chunk, splits, atomic, dtype == torch.float32 or not atomic)


def dw_buffer(dy: torch.Tensor, info: BlockMaskInfo, dtype: torch.dtype | None = None, splits: int | None = None,
              density: float = 1.0) -> torch.Tensor:  # fmt: skip
    """The zeroed buffer `dw_triton(dy, ..., out=)` writes, made ahead so that its zero-fill is not the kernel just
    before dW."""
    dtype = dy.dtype if dtype is None else dtype
    if info.n_tasks == 0:
        return dy.new_zeros(info.shape, dtype=dtype)
    plan = _dw_plan(dy.shape[0], info.grid, info.block, dtype, dy.device, splits, density)
    shape = info.shape if plan.full else (info.nnz, info.block, info.block)
    # Zeroed for the atomics and for the empty blocks; a memset, far below the GEMM's own traffic.
    return torch.zeros(shape, device=dy.device, dtype=dtype if plan.full else torch.float32)


def dw_triton(
    dy: torch.Tensor, x: torch.Tensor, info: BlockMaskInfo, dtype: torch.dtype | None = None, splits: int | None = None,
    density: float = 1.0, out: torch.Tensor | None = None, after_dx: bool = False,
) -> torch.Tensor:
    """dYᵀ X on the nonzero blocks, zero elsewhere, as a full (out, in) tensor in `dtype` (default dy's).

    Accumulation is fp32. An fp32 result (the master weights' grad) takes the split-K atomics directly; a 16-bit
    one gets them in a compact fp32 buffer that one pass casts and scatters (zeros included) into the result.
    `out`: the buffer from `dw_buffer` (same arguments), else made here. `after_dx`: the kernel launched just
    before on this stream was `dx_triton`'s, so dW may run beside it (`_pdl`).
    """
    b, m = info.block, dy.shape[0]
    dtype = dy.dtype if dtype is None else dtype
    n_tasks = info.n_tasks
    dw = dw_buffer(dy, info, dtype, splits, density) if out is None else out
    if n_tasks == 0:
        return dw
    plan = _dw_plan(m, info.grid, info.block, dtype, dy.device, splits, density)
    pdl = after_dx and _pdl(dy.device)
    strides = (dw.stride(0), dw.stride(1)) if plan.full else (0, 0)
    flags = dict(B=b, G=info.group, BY_ROW=info.by_row, FULL=plan.full, ATOMIC=plan.atomic, LATE_WAIT=pdl)
    if info.group in TMA_DW_GROUPS:  # TMA boxes, one per block of the task
        _sddmm_tma_kernel[(n_tasks * plan.splits,)](
            _descriptor(dy), _descriptor(x), dw, info.task_fixed, info.task_other, info.task_ids,
            m, plan.chunk, n_tasks, n_tasks.bit_length(), *strides, **flags, **launch_pdl(pdl),
        )  # fmt: skip
    else:
        _sddmm_kernel[(n_tasks * plan.splits,)](
            dy, x, dw, info.task_fixed, info.task_other, info.task_ids,
            m, plan.chunk, n_tasks, n_tasks.bit_length(), dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
            *strides, **flags, EVEN=m % plan.chunk == 0, **launch_pdl(pdl),
        )  # fmt: skip
    return dw if plan.full else scatter_blocks(dw, info, dtype)


def scatter_blocks(compact: torch.Tensor, info: BlockMaskInfo, dtype: torch.dtype) -> torch.Tensor:
    n_rows, n_cols = info.grid
    out = torch.empty(info.shape, device=compact.device, dtype=dtype)
    pdl = _pdl(compact.device)
    _scatter_kernel[(n_rows * n_cols,)](
        compact, info.block_id, out, n_cols, out.stride(0), out.stride(1), B=info.block, PDL=pdl,
        num_warps=8 if info.block == 128 else 4, **launch_pdl(pdl),
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------------
# Autograd: eager calls through an autograd.Function, compiled models through torch.library custom ops


class _Ops(NamedTuple):
    """prepare(weight, info, dtype) -> the weight operand fwd and dx share (made once in the forward, saved)."""

    prepare: object
    fwd: object  # (x, operand, bias, info) -> y
    dx: object  # (dy, operand, info) -> dx
    dw: object  # (dy, x, info, dtype) -> dw


def _fwd_packed(x, packed, bias, info):
    return fwd_triton(x, None, bias, info, packed)


def _dx_packed(dy, packed, info):
    return dx_triton(dy, None, info, packed)


def _cast_ref(weight, info, dtype):
    return weight.to(dtype, copy=True)  # a copy even in weight's dtype: a custom op's outputs may not alias inputs


def _dw_ref_as(dy, x, info, dtype):
    return dw_ref(dy, x, info).to(dtype)


IMPLS = {
    "triton": _Ops(pack_blocks, _fwd_packed, _dx_packed, dw_triton),
    "ref": _Ops(_cast_ref, fwd_ref, dx_ref, _dw_ref_as),
}


def _triton_can_run(*device_types: str) -> bool:
    if _INTERPRET:
        return all(d == "cpu" for d in device_types)
    return triton_available() and all(d == "cuda" for d in device_types)


def _choose_impl(backend: str, x_device: str, w_device: str) -> str:
    return select(IMPLS, backend, {"triton": lambda: _triton_can_run(x_device, w_device)})


# select() depends on nothing else; it costs a few µs a call, the cache a dict lookup. (Eager calls only: dynamo
# would trace through the cache wrapper, and warn that it does.)
_impl_name = functools.cache(_choose_impl)


# The steps both wrappers run. x is already in the compute dtype; weight and bias stay in theirs (the fp32 masters
# under autocast): the weight is cast once per forward, blocks in use only, and its gradient is written in its own
# dtype, so autograd adds no full-size casts around the op.


def _forward(x, weight, bias, info: BlockMaskInfo, impl: str, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, the weight operand the forward used, which dX reuses)."""
    if mode & DENSE_PATH:
        # The whole weight in the compute dtype. In the Triton impl's (nnz, b, b) operand shape: the packed buffer
        # has room for all R·C blocks, the weight's size, so the two paths give a compiled graph the same shapes.
        w_op = weight.to(x.dtype, copy=True)  # a copy even in weight's dtype: an op's outputs may not alias inputs
        y = F.linear(x, w_op, None if bias is None else bias.to(x.dtype))
        return y, w_op.view(info.nnz, info.block, info.block) if impl == "triton" else w_op
    ops = IMPLS[impl]
    w_op = ops.prepare(weight, info, x.dtype)
    return ops.fwd(x, w_op, bias, info), w_op


def _backward(dy, x, w_op, info: BlockMaskInfo, impl: str, dtype: torch.dtype, mode: int, density: float,
              need_dx: bool, need_dw: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(dX, dW), None where not needed. The Triton dW's zeroed buffer is made before dX, so that the dW kernel
    directly follows the dX kernel and may run beside its last wave (`_pdl`)."""
    if mode & DENSE_PATH:
        dx = dy @ w_op.view(info.shape) if need_dx else None
        return dx, (dy.t() @ x).to(dtype) if need_dw else None
    ops = IMPLS[impl]
    dense_wgrad = bool(mode & DENSE_WGRAD)
    sparse_dw = need_dw and not dense_wgrad and impl == "triton"
    dw_out = dw_buffer(dy, info, dtype, density=density) if sparse_dw else None
    dx = ops.dx(dy, w_op, info) if need_dx else None
    dw = None
    if sparse_dw:
        dw = dw_triton(dy, x, info, dtype, density=density, out=dw_out, after_dx=need_dx)
    elif need_dw:
        dw = (dy.t() @ x).to(dtype) if dense_wgrad else ops.dw(dy, x, info, dtype)
    return dx, dw


class _BlockSparseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, info, impl, mode, dw_density):
        y, w_op = _forward(x, weight, bias, info, impl, mode)
        ctx.save_for_backward(x, w_op)
        ctx.info, ctx.impl, ctx.mode, ctx.dw_density = info, impl, mode, dw_density
        ctx.w_dtype, ctx.b_dtype = weight.dtype, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_op = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw = _backward(dy, x, w_op, ctx.info, ctx.impl, ctx.w_dtype, ctx.mode, ctx.dw_density, need_dx,
                           need_dw)  # fmt: skip
        db = dy.sum(0).to(ctx.b_dtype) if need_db else None
        return dx, dw, db, None, None, None, None


# The same steps as torch.library ops, so that torch.compile traces a block-sparse linear as opaque nodes (shapes
# from the fakes) instead of breaking the graph: a break inside a transformer block makes dynamo run GPT.forward's
# loop over blocks eagerly and split every block. The mask comes in as its index tensors and b, so a mask update
# feeds new inputs to the same graph. The ops have no autograd of their own: an autograd.Function that dynamo traces
# (`_BlockSparseLinearOps`) ties them together, so a compiled step calls each op's kernel straight from the
# dispatcher. (torch.library.custom_op with register_autograd puts Python in front of every call of a compiled
# graph: its autograd kernel, a redispatch, dynamo-disable wrappers and output-alias checks.) Eager calls keep
# `_BlockSparseLinearFn`: dispatching even these ops adds more host time than an eager call spends otherwise, and
# eager calls are host-bound already.
def _fwd_impl(x, weight, bias, index, grid, block, impl, mode):
    """(y, the weight operand dX reuses)."""
    return _forward(x, weight, bias, BlockMaskInfo.from_tensors(index, grid, block), impl, mode)


def _fwd_fake(x, weight, bias, index, grid, block, impl, mode):
    w_op = x.new_empty(
        (BlockMaskInfo.from_tensors(index, grid, block).nnz, block, block) if impl == "triton" else weight.shape
    )
    return x.new_empty(x.shape[0], weight.shape[0]), w_op


def _bwd_impl(dy, x, w_op, index, grid, block, impl, dtype, mode, dw_density, need_dx, need_dw):
    """(dX, dW), one op for both: a layer's backward then pays one op's dispatch and mask rebuild. A gradient not
    needed comes back empty (an op's outputs are tensors)."""
    info = BlockMaskInfo.from_tensors(index, grid, block)
    dx, dw = _backward(dy, x, w_op, info, impl, dtype, mode, dw_density, need_dx, need_dw)
    return dy.new_empty(0) if dx is None else dx, dy.new_empty(0, dtype=dtype) if dw is None else dw


def _bwd_fake(dy, x, w_op, index, grid, block, impl, dtype, mode, dw_density, need_dx, need_dw):
    dx = dy.new_empty(dy.shape[0], grid[1] * block) if need_dx else dy.new_empty(0)
    dw = dy.new_empty(dy.shape[1], x.shape[1], dtype=dtype) if need_dw else dy.new_empty(0, dtype=dtype)
    return dx, dw


_MASK_ARGS = "Tensor[] index, int[] grid, int block, str impl"  # BlockMaskInfo.from_tensors's, and the backend
_fwd_op = define_op(
    f"block_sparse_fwd(Tensor x, Tensor weight, Tensor? bias, {_MASK_ARGS}, SymInt mode) -> (Tensor, Tensor)",
    _fwd_impl,
    _fwd_fake,
)
_bwd_op = define_op(
    f"block_sparse_bwd(Tensor dy, Tensor x, Tensor w_op, {_MASK_ARGS}, ScalarType dtype, SymInt mode, "
    "float dw_density, bool need_dx, bool need_dw) -> (Tensor, Tensor)",
    _bwd_impl,
    _bwd_fake,
)


class _BlockSparseLinearOps(torch.autograd.Function):
    """`_BlockSparseLinearFn` with the steps as ops, for dynamo to trace; the mask's tensors come last, one argument
    each."""

    @staticmethod
    def forward(ctx, x, weight, bias, grid, block, impl, mode, dw_density, *index):
        y, w_op = _fwd_op(x, weight, bias, list(index), grid, block, impl, mode)
        ctx.save_for_backward(x, w_op, *index)
        ctx.grid, ctx.block, ctx.impl, ctx.mode, ctx.dw_density = grid, block, impl, mode, dw_density
        ctx.w_dtype, ctx.b_dtype = weight.dtype, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_op, *index = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_dx or need_dw:
            dx, dw = _bwd_op(
                dy, x, w_op, index, ctx.grid, ctx.block, ctx.impl, ctx.w_dtype, ctx.mode, ctx.dw_density,
                need_dx, need_dw,
            )
            dx, dw = dx if need_dx else None, dw if need_dw else None
        if need_db:
            db = dy.sum(0).to(ctx.b_dtype)
        return dx, dw, db, None, None, None, None, None, *[None] * len(index)


def block_sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    block_mask_info: BlockMaskInfo,
    backend: str = "auto",
    mode: int = 0,
    dw_density: float = 1.0,
) -> torch.Tensor:
    """y = x (W ⊙ M)ᵀ + bias with M the block mask expanded to elements, computing only nonzero blocks.

    Gradients: dX over nonzero blocks; dW zero on empty blocks, or the full dense dYᵀX when `mode` has
    DENSE_WGRAD (MST topology-update steps). With DENSE_PATH all three are dense GEMMs on W as it is (equal to the
    above when W is zero off the mask), and dW is dense. Under autocast the math sees what F.linear's would: x, W
    and bias rounded to the autocast dtype (W's nonzero blocks only, inside the op) with fp32 accumulation; y is in
    the autocast dtype and the weight/bias grads in the parameters' own dtypes. Without autocast x and weight must
    share a dtype. torch.compile traces it with no graph break (custom ops, the mask's index tensors as inputs).
    """
    info = block_mask_info
    if weight.shape != info.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match the block mask's {info.shape}")
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # The op's own matmuls then see operands already in the autocast dtype: autocast has nothing left to cast.
        x = x.to(torch.get_autocast_dtype(dev))
    elif x.dtype != weight.dtype:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if info.device != weight.device:
        info = info.to(weight.device)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if torch.compiler.is_compiling():
        name = _choose_impl(backend, dev, weight.device.type)
        y = _BlockSparseLinearOps.apply(x2, weight, bias, info.grid, info.block, name, mode, dw_density,
                                        *info.tensors())
    else:
        name = _impl_name(backend, dev, weight.device.type)
        y = _BlockSparseLinearFn.apply(x2, weight, bias, info, name, mode, dw_density)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _mode_flag(bit: int) -> property:
    """A bool attribute that is one bit of the module's `runtime_mode`."""

    def get(self) -> bool:
        return bool(self.runtime_mode & bit)

    def set_(self, on: bool) -> None:
        self.runtime_mode = self.runtime_mode | bit if on else self.runtime_mode & ~bit

    return property(get, set_)


class BlockSparseLinear(nn.Linear):
    """nn.Linear whose weight is used only on the nonzero blocks of a block mask (state_dict keys unchanged).

    The mask is a plain attribute (the sparsity method checkpoints it); `set_block_mask` builds its index lists on
    the weight's device (a forward rebuilds them if the module has moved since: under torch.compile that would be a
    graph break, so set masks after moving). `dense_wgrad = True` makes the next backwards return the dense dW.

    `dense_path = True` runs dense GEMMs (cuBLAS) on the weight as it is, for a caller that keeps the weight at exact
    zero off the mask and masks its gradient itself (MST does both every step): the forward and dX are then the
    block path's products, and dW is the dense gradient (what `dense_wgrad` asks for). Above about half density the
    block kernels are slower than the dense GEMM (they run every nonzero block as a b-wide tile), so MST sends its
    near-dense layers (the warm-up and restoration) this way. Both flags are bits of `runtime_mode`, which the ops
    read when they run: under torch.compile (after `kernels.compile_runtime_modes()`) flipping them compiles nothing.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        block: int = 64,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if block not in BLOCK_SIZES:
            raise ValueError(f"block size must be one of {BLOCK_SIZES}, got {block}")
        if in_features % block or out_features % block:
            raise ValueError(f"linear {out_features}x{in_features} is not divisible into {block}x{block} blocks")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.block = block
        self.backend = backend
        self.runtime_mode = 0  # DENSE_WGRAD | DENSE_PATH bits: `dense_wgrad`, `dense_path`
        self.dw_density = 1.0  # the density dW's split-K is sized for (its grid is fixed: BlockMaskInfo)
        self.block_mask = torch.ones(out_features // block, in_features // block, dtype=torch.bool)
        self._info: BlockMaskInfo | None = None

    @classmethod
    def from_dense(cls, linear: nn.Linear, block: int = 64, backend: str = "auto") -> BlockSparseLinear:
        """Wrap an nn.Linear, adopting its parameter objects (optimizer state and tying survive)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, block, backend, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def set_block_mask(self, mask: torch.Tensor) -> None:
        shape = (self.out_features // self.block, self.in_features // self.block)
        if tuple(mask.shape) != shape:
            raise ValueError(f"block mask must have shape {shape}, got {tuple(mask.shape)}")
        self.block_mask = mask.detach().to("cpu", torch.bool)
        new, old = build_block_mask_info(self.block_mask, self.block, "cpu"), self._info
        if old is None or old.device != self.weight.device:
            self._info = new.to(self.weight.device)
            return
        # New values in the same tensors (their sizes depend on the grid alone): a compiled graph's inputs keep
        # their addresses. A new address makes a CUDA-graph replay (compile_mode reduce-overhead) re-record: on the
        # H200 the step after each MST update took ~0.2 s instead of 22 ms, and cudagraph trees stop graphing a
        # function that re-records too often.
        for dst, src in zip(old.tensors(), new.tensors(), strict=True):
            dst.copy_(src)
        self._info = dataclasses.replace(old, count=new.count)

    def block_mask_info(self) -> BlockMaskInfo:
        if self._info is None or self._info.device != self.weight.device:
            self._info = build_block_mask_info(self.block_mask, self.block, self.weight.device)
        return self._info

    dense_wgrad = _mode_flag(DENSE_WGRAD)
    dense_path = _mode_flag(DENSE_PATH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_sparse_linear(x, self.weight, self.bias, self.block_mask_info(), self.backend, self.runtime_mode,
                                   self.dw_density)

    def extra_repr(self) -> str:
        density = self.block_mask.float().mean().item()
        path = ", dense_path" if self.dense_path else ""
        return f"{super().extra_repr()}, block={self.block}, block_density={density:.3f}{path}"
