"""cuSPARSELt's compressed 2:4 layout, written by us: no `torch._cslt_compress` on the training step's hot path.

`torch._cslt_compress(A)` of a 2:4 matrix A (m, k), 16-bit, returns an (m, k/2 + k/16) tensor whose flat storage is

- the kept values, row-major: row r's k/2 kept entries in column order;
- then the metadata, one 4-bit code per group of 4 (row r, group g = columns 4g..4g+3): code = i0 | i1 << 2 for the
  kept positions i0 < i1, packed four codes to a 16-bit word (first code in the low bits). Codes are ordered by
  tiles of 64 rows x 8 groups (32 columns), tiles along k first; inside a tile the code of (r, g) sits at position
      p = r3 | g2 << 1 | g0 << 2 | g1 << 3 | r0 << 4 | r1 << 5 | r2 << 6 | r4 << 7 | r5 << 8
  (r_i, g_i: bit i of r mod 64 and g mod 8), i.e. word p >> 2, nibble p & 3.

Read off the H100 (cuSPARSELt in torch 2.11, bf16, shapes 128x128 ... 4096x1024; `tests/kernels/test_cslt_pack.py`
checks it against `_cslt_compress` on the GPU): the values are exactly the row-major kept entries, and the metadata
depends on the mask alone. Two uses in 2:4 training (kernels/semi24.py):
- the weight: its mask changes only at a refresh, so each step writes only the values (`write_values`, a gather)
  into the buffer compressed at the refresh, instead of compressing W and Wᵀ again (0.5-0.9 ms per layer);
- the gradient: `mvue24_pack` draws MVUE 2:4 along the tokens of dY and writes MVUE(dYᵀ) straight into this layout,
  in one pass, where MVUE + `_cslt_compress` cost 1-15 ms per call.
Shapes: m a multiple of 64 and k of 32 (`supported`); others keep `_cslt_compress`.
"""

from __future__ import annotations

import torch

TILE_ROWS, TILE_COLS = 64, 32


def supported(m: int, k: int, dtype: torch.dtype) -> bool:
    return m % TILE_ROWS == 0 and k % TILE_COLS == 0 and dtype in (torch.bfloat16, torch.float16)


def _check(m: int, k: int, dtype: torch.dtype) -> None:
    if not supported(m, k, dtype):
        raise ValueError(f"cuSPARSELt layout: needs rows % 64, cols % 32 and a 16-bit dtype, got {m}x{k} {dtype}")


def kept_positions(mask: torch.Tensor) -> torch.Tensor:
    """(m, k/4, 2) int64: the two kept positions (ascending) of each group of 4 of a 2:4 mask (m, k). A group
    with fewer than two kept entries is filled with the lowest unkept positions (its values are zero anyway)."""
    m, k = mask.shape
    g = mask.reshape(m, k // 4, 4).to(torch.int8)
    pos = g.argsort(dim=-1, descending=True, stable=True)[..., :2]
    return pos.sort(dim=-1).values


def kept_columns(mask: torch.Tensor) -> torch.Tensor:
    """(m, k/2) int64: the column of each kept entry, row-major: where `write_values` gathers the values from."""
    m, k = mask.shape
    pos = kept_positions(mask)
    return (pos + 4 * torch.arange(k // 4, device=mask.device)[None, :, None]).reshape(m, k // 2)


def metadata(pos: torch.Tensor) -> torch.Tensor:
    """The metadata words (int16, m·k/16) of the kept positions pos (m, k/4, 2), in cuSPARSELt's order."""
    m, groups = pos.shape[:2]
    code = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.int32)  # (m, k/4)
    # (row tiles, 64, col tiles, 8) -> tiles k-first, then r = (r5 r4, r3, r2 r1 r0) and g = (g2, g1 g0)
    t = code.reshape(m // 64, 4, 2, 8, groups // 8, 2, 4).permute(0, 4, 1, 3, 6, 2, 5)  # tr tc r54 r210 g10 r3 g2
    shift = 4 * (torch.arange(2, device=pos.device)[:, None] + 2 * torch.arange(2, device=pos.device)[None, :])
    words = (t << shift).sum((-2, -1)).reshape(-1)  # a word's four codes occupy disjoint bits: sum = or
    return (words - ((words >> 15) << 16)).to(torch.int16)  # as a signed 16-bit word


def pack_ref(a: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """What `torch._cslt_compress(a)` returns for a 2:4 matrix a (m, k) (mask: its 2:4 mask, default a != 0)."""
    m, k = a.shape
    _check(m, k, a.dtype)
    pos = kept_positions(a != 0 if mask is None else mask)
    values = a.reshape(m, k // 4, 4).gather(-1, pos).reshape(-1)
    return torch.cat([values, metadata(pos).view(a.dtype)]).view(m, k // 2 + k // 16)


def unpack_ref(packed: torch.Tensor) -> torch.Tensor:
    """The dense (m, k) matrix of a compressed one: the inverse of pack_ref, whichever positions a group with fewer
    than two nonzeros names."""
    m = packed.shape[0]
    k = packed.shape[1] * 16 // 9
    flat = packed.reshape(-1)
    words = (flat[m * k // 2 :].view(torch.int16).to(torch.int32) & 0xFFFF).reshape(m // 64, k // 32, 4, 8, 4)
    shift = 4 * (torch.arange(2, device=packed.device)[:, None] + 2 * torch.arange(2, device=packed.device)[None, :])
    code = (words[..., None, None] >> shift) & 0xF  # tr tc r54 r210 g10 r3 g2, as in metadata()
    code = code.permute(0, 2, 5, 3, 1, 6, 4).reshape(m, k // 4)
    pos = torch.stack([code & 3, code >> 2], -1).long()
    dense = torch.zeros(m, k // 4, 4, dtype=packed.dtype, device=packed.device)
    dense.scatter_(-1, pos, flat[: m * k // 2].view(m, k // 4, 2))
    return dense.reshape(m, k)


def values_view(packed: torch.Tensor) -> torch.Tensor:
    """The (m, k/2) values part of a compressed tensor, a view: writing it updates the operand in place."""
    m = packed.shape[0]
    k = packed.shape[1] * 16 // 9
    return packed.view(-1)[: m * k // 2].view(m, k // 2)


def write_values(packed: torch.Tensor, w: torch.Tensor, cols: torch.Tensor) -> None:
    """Re-pack the values of a compressed operand whose mask is unchanged: packed's values = w's entries at cols
    (`kept_columns` of the mask), cast to packed's dtype. w may be a strided view (e.g. Wᵀ)."""
    values_view(packed).copy_(w.gather(1, cols))


# ------------------------------------------------------------------------------------------------ fused MVUE
def mvue24_pack_ref(x: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    """MVUE 2:4 along the tokens of dY x (T, N), compressed: pack_ref of kernels.semi24's MVUE(dYᵀ) (N, T)."""
    from kernels import semi24

    return pack_ref(semi24.mvue24_t(x, seed))


def mvue24_pack(x: torch.Tensor, seed: int) -> torch.Tensor:
    """The Triton kernel of `mvue24_pack_ref`, with the draws of kernels.semi24_triton.mvue24_t (same Philox
    counters), so both give the same MVUE(dYᵀ) for a seed; one pass over dY."""
    from kernels.cslt_pack_triton import mvue_pack_kernel

    T, N = x.shape
    _check(N, T, x.dtype)
    x = x.contiguous()
    out = torch.empty(N, T // 2 + T // 16, dtype=x.dtype, device=x.device)
    mvue_pack_kernel[(T // TILE_COLS, N // TILE_ROWS)](x, out, out.view(torch.int16), T, N, seed)
    return out


# ------------------------------------------------------------------------------------------------------ bench
def _replay_ms(fn) -> float:
    from kernels.benchutil import capture, time_ms

    graph, _ = capture(fn)
    return time_ms(graph.replay, warmup=3, reps=20, sync_each=False)


def _bench_shape(out_f: int, in_f: int, tokens: int) -> dict:
    from kernels import semi24_triton
    from kernels.semi24 import GemmPlan, _cslt_mm, _search_alg

    torch.manual_seed(0)
    w = torch.randn(out_f, in_f, device="cuda")
    mask = _transposable_mask(out_f, in_f)
    pruned = torch.where(mask, w, 0.0).bfloat16()  # +0.0 where pruned, as prune24 writes (w * mask gives -0.0)
    pruned_t = pruned.t().contiguous()
    packed, packed_t = torch._cslt_compress(pruned), torch._cslt_compress(pruned_t)
    cols, cols_t = kept_columns(mask), kept_columns(mask.t())
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(tokens, out_f, device="cuda", dtype=torch.bfloat16)
    dyt = mvue24_pack(dy, 1)
    dyt_ref = semi24_triton.mvue24_t(dy, 1)
    same_dyt = torch.equal(dyt.view(torch.int16), torch._cslt_compress(dyt_ref).view(torch.int16))
    same_dyt_dense = torch.equal(unpack_ref(dyt), dyt_ref)
    write_values(packed, w, cols)
    same_w = torch.equal(packed.view(torch.int16), torch._cslt_compress(pruned).view(torch.int16))
    plan = {name: GemmPlan(True, *_search_alg(a, b, tr)) for name, a, b, tr in
            [("fwd", packed, x.t(), True), ("dgrad", packed_t, dy.t(), True), ("wgrad", dyt, x, False)]}
    row = {
        "weight": [out_f, in_f], "tokens": tokens, "mvue_pack_equal_cslt": same_dyt, "w_pack_equal_cslt": same_w,
        "mvue_pack_unpacks_to_mvue": same_dyt_dense,
        "repack_w_wt_cslt_ms": _replay_ms(lambda: (torch._cslt_compress(pruned), torch._cslt_compress(pruned_t))),
        "repack_w_wt_ours_ms": _replay_ms(lambda: (write_values(packed, w, cols), write_values(packed_t, w.t(),
                                                                                             cols_t))),
        "mvue_compress_cslt_ms": _replay_ms(lambda: torch._cslt_compress(semi24_triton.mvue24_t(dy, 1))),
        "mvue_pack_ours_ms": _replay_ms(lambda: mvue24_pack(dy, 1)),
        "fwd_dense_ms": _replay_ms(lambda: x @ pruned.t()),
        "fwd_sparse_ms": _replay_ms(lambda: _cslt_mm(packed, x.t(), True, plan["fwd"])),
        "dgrad_dense_ms": _replay_ms(lambda: dy @ pruned),
        "dgrad_sparse_ms": _replay_ms(lambda: _cslt_mm(packed_t, dy.t(), True, plan["dgrad"])),
        "wgrad_dense_ms": _replay_ms(lambda: dy.t() @ x),
        "wgrad_sparse_ms": _replay_ms(lambda: _cslt_mm(dyt, x, False, plan["wgrad"])),
    }
    row.update(_linear_rows(out_f, in_f, tokens))
    dense = row["fwd_dense_ms"] + row["dgrad_dense_ms"] + row["wgrad_dense_ms"]
    ours = (row["fwd_sparse_ms"] + row["dgrad_sparse_ms"] + row["wgrad_sparse_ms"] + row["repack_w_wt_ours_ms"]
            + row["mvue_pack_ours_ms"])
    row["sum_of_parts_speedup"] = dense / ours  # GEMMs + packing, each timed alone: not one fwd+bwd
    row["linear_speedup"] = row["linear_fwd_bwd_ms"] / row["linear24_fwd_bwd_ms"]  # one whole fwd+bwd each
    return row


def _linear_rows(out_f: int, in_f: int, tokens: int) -> dict:
    """One whole Linear24 fwd+bwd (every GEMM sparse: gemm_mode 'sparse'), its operands re-packed every call as
    after an optimizer step (prune + value re-pack) and MVUE(dYᵀ) packed, against nn.Linear, both replayed from
    CUDA graphs (host time excluded: the trainer's compile_mode=reduce-overhead has none either). The mask search
    (every 40 steps by default) is not included."""
    from kernels.semi24 import Linear24, transposable_search

    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=False, device="cuda")
    sparse = Linear24.from_dense(lin, backend="cusparselt", mvue=True, seed=1)
    sparse.set_mask(transposable_search(lin.weight))
    x = torch.randn(tokens, in_f, device="cuda", requires_grad=True)
    dy = torch.randn(tokens, out_f, device="cuda", dtype=torch.bfloat16)

    def step(module, repack: bool):
        def call():
            lin.weight.grad, x.grad = None, None
            if repack:
                module.invalidate()
            with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
                y = module(x)
            y.backward(dy)
        return call

    return {"linear24_fwd_bwd_ms": _replay_ms(step(sparse, True)), "linear_fwd_bwd_ms": _replay_ms(step(lin, False))}


def bench(out: str | None = None, tokens: int = 16384) -> list[dict]:
    """GPU time (CUDA-graph replays) of the per-step packing of one 2:4 linear, cuSPARSELt's way and ours, and of
    its three GEMMs sparse (searched algorithm) and dense, at the GPT-2 MLP shapes.

        python -m kernels.cslt_pack results.json
    """
    import json

    rows = []
    for shape in [(3072, 768), (768, 3072), (4096, 1024), (1024, 4096), (5120, 1280), (1280, 5120), (6400, 1600),
                  (1600, 6400)]:
        rows.append(_bench_shape(*shape, tokens))
        print(json.dumps(rows[-1]), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows


def _transposable_mask(m: int, k: int) -> torch.Tensor:
    shift = torch.randint(0, 4, (m // 4, k // 4), device="cuda").repeat_interleave(4, 0).repeat_interleave(4, 1)
    return (torch.arange(m, device="cuda")[:, None] + torch.arange(k, device="cuda")[None, :] + shift) % 4 < 2


if __name__ == "__main__":
    import sys

    bench(sys.argv[1] if len(sys.argv) > 1 else None)
