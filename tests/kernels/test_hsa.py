import textwrap

import pytest
import torch

from kernels.hsa_attention import (
    MODES,
    TUNED,
    HsaAttention,
    HsaConfig,
    Launch,
    config_error,
    default_config,
    hsa_attention,
    hsa_attention_ref,
    hsa_attention_triton,
    hsa_density,
    hsa_forward,
    hsa_mask,
)
from model.gpt import GPT, GPTConfig, causal_attention
from tests.helpers import attention_qkv, check_hsa_op_layouts, check_pdl_against_plain
from tests.interpreted import check_interpreted


def test_sparse_mask_T8_l3_by_hand():
    rows = [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {1, 2, 3, 4}, {2, 3, 4, 5}, {0, 3, 4, 5, 6}, {1, 4, 5, 6, 7}]
    expected = torch.tensor([[j in row for j in range(8)] for row in rows])
    assert torch.equal(hsa_mask(8, 3, "sparse"), expected)


@pytest.mark.parametrize("stride, nnz", [(128, 126_528), (256, 231_040)])
def test_sparse_nnz_T1024(stride, nnz):
    assert int(hsa_mask(1024, stride).sum()) == nnz


def test_fixed_mask_T8_l4():
    m = hsa_mask(8, 4, "fixed")
    causal = torch.ones(8, 8).tril().bool()
    block = torch.zeros(8, 8, dtype=torch.bool)
    block[:4, :4] = block[4:, 4:] = True
    expected = causal & block
    expected[4:, 3] = True
    assert torch.equal(m, expected)
    with pytest.raises(ValueError, match="T % stride"):
        hsa_mask(10, 4, "fixed")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T, stride", [(64, 8), (96, 7), (100, 128)])
def test_density_counts_the_mask(mode, T, stride):
    if mode == "fixed" and T % stride:
        pytest.skip("fixed needs T % stride == 0")
    assert hsa_density(T, stride, mode) == pytest.approx(int(hsa_mask(T, stride, mode).sum()) / (T * (T + 1) / 2))


def test_mask_is_cached_per_key():
    assert hsa_mask(32, 4, "local") is hsa_mask(32, 4, "local", "cpu")
    assert hsa_mask(32, 4, "local") is not hsa_mask(32, 4, "strided")


def _qkv(B=2, H=2, T=16, D=8, dtype=torch.float32):
    return [torch.randn(B, H, T, D, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("mode", MODES)
def test_ref_equals_hand_masked_softmax(mode):
    T, stride = 16, 4
    q, k, v = _qkv(T=T)
    out = hsa_attention_ref(q, k, v, stride, mode)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    scores = q2 @ k2.transpose(-1, -2) / q2.size(-1) ** 0.5
    scores = scores.masked_fill(~hsa_mask(T, stride, mode), float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ v2
    expected_grads = torch.autograd.grad(expected, (q2, k2, v2), dout)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_stride_at_least_T_is_dense_causal():
    q, k, v = _qkv(T=24)
    torch.testing.assert_close(hsa_attention_ref(q, k, v, 24), causal_attention(q, k, v), atol=1e-6, rtol=1e-5)


def test_dispatch_on_cpu():
    q, k, v = _qkv()
    torch.testing.assert_close(hsa_attention(q, k, v, 4), hsa_attention_ref(q, k, v, 4))
    with pytest.raises(RuntimeError, match="cannot run"):
        hsa_attention(q, k, v, 4, backend="triton")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        hsa_attention(q, k, v, 4, backend="cuda")


def test_hsa_attention_module_plugs_into_gpt():
    """HsaAttention as CausalSelfAttention.attend: stride >= T is dense causal, a short stride is not, and
    runtime_mode 1 is dense causal again; it adds nothing to the state_dict."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(preset="tiny", block_size=32, vocab_size=64))
    keys = set(model.state_dict())
    idx = torch.randint(0, 64, (2, 32))
    dense_logits = model(idx, idx)[0]
    for block in model.transformer.h:
        block.attn.attend = HsaAttention(32, "sparse")  # stride >= T keeps every causal pair
    torch.testing.assert_close(model(idx, idx)[0], dense_logits, atol=1e-5, rtol=1e-5)
    attend = HsaAttention(4, "sparse")
    for block in model.transformer.h:
        block.attn.attend = attend
    assert not torch.allclose(model(idx, idx)[0], dense_logits, atol=1e-3)
    attend.runtime_mode = 1
    torch.testing.assert_close(model(idx, idx)[0], dense_logits, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == keys and "dense causal" in repr(attend)
    with pytest.raises(ValueError, match="mode"):
        HsaAttention(4, "bigbird")
    with pytest.raises(ValueError, match="stride"):
        HsaAttention(0)


@pytest.mark.parametrize("model_layout", [True, False])
def test_ops_causal_branch_is_dense_causal_sdpa(model_layout):
    """causal = 1: the HSA ops run dense causal attention (flash; on the CPU its CPU kernel): SDPA's output and
    gradients, in the layouts the fakes give (what a compiled graph plans with)."""
    torch.manual_seed(0)
    q, k, v = attention_qkv((2, 4, 40, 16), model_layout)
    dout = torch.randn(2, 4, 40, 16)
    o, _, grads = check_hsa_op_layouts(q, k, v, dout, 8, 1)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)
    want.backward(dout)
    torch.testing.assert_close(o, want, atol=1e-5, rtol=1e-5)
    for g, leaf in zip(grads, leaves, strict=True):
        torch.testing.assert_close(g, leaf.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T, stride, hs", [(1024, 64, 64), (2048, 64, 64), (1024, 16, 128), (300, 3, 16), (40, 1, 32)])
def test_default_config_fits(T, stride, hs):
    assert config_error(default_config(T, stride, hs), T, stride, hs) is None


def test_tuned_entries_fit_their_shapes():
    for (T, stride, hs), cfg in TUNED.items():
        assert isinstance(cfg, HsaConfig) and config_error(cfg, T, stride, hs) is None, (T, stride, hs)


@pytest.mark.parametrize(
    "kernel, launch, match",
    [
        ("band_fwd", Launch(48, 4), "powers of two"),
        ("band_bwd", Launch(64, 3), "powers of two"),
        ("band_bwd", Launch(8, 4), ">= 16"),
        ("strided_fwd", Launch(16, 4), "residue class of 32 periods"),
        ("strided_bwd", Launch(256, 8), "256 x 64"),
        ("band_bwd", Launch(64, 4, 2, 32), "key tile"),
        ("strided_bwd", Launch(64, 4, maxnreg=300), "maxnreg"),
        ("band_fwd", Launch(64, 4, unrolled=True), "only band_bwd has an unrolled"),
        ("band_bwd", Launch(32, 4, unrolled=True), "within one 32-row block"),
    ],
)
def test_bad_configs_are_refused_with_the_reason(kernel, launch, match):
    T, stride, hs = 2048, 64, 64  # 32 periods per residue class
    cfg = default_config(T, stride, hs)._replace(**{kernel: launch})
    assert match in config_error(cfg, T, stride, hs)
    q, k, v = _qkv(B=1, H=1, T=T, D=hs)
    with pytest.raises(ValueError, match=kernel):
        hsa_forward(q, k, v, stride, cfg)


# The Triton kernel under the CPU interpreter, in a subprocess so TRITON_INTERPRET never reaches other tests; then
# the same kernels inside a compiled GPT.
# q, k, v are strided views of one (B, T, 3, nh, hs) tensor, as the model's c_attn split makes them.
_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import tests.triton_interp  # noqa: F401  (interpreter on, numpy shim)
    import torch

    from kernels.hsa_attention import hsa_attention_ref, hsa_attention_triton
    torch.manual_seed(0)
    # (B, H, T, l, hs): l below, at and above the 64-row block, T ragged against l and the block, l not a power of
    # two, l = 1, l > T, and a tile of 128 residue rows (T / l > 64).
    cases = [(2, 2, 64, 8, 16), (1, 1, 100, 16, 16), (1, 1, 200, 32, 32), (1, 1, 257, 64, 16), (1, 1, 512, 64, 16),
             (1, 1, 130, 48, 16), (1, 1, 300, 3, 16), (1, 1, 40, 1, 16), (1, 1, 90, 128, 16), (1, 1, 520, 5, 16)]
    for B, H, T, l, D in cases:
        base = torch.randn(B, T, 3, H, D)
        qkv = base.clone().requires_grad_()
        q, k, v = (qkv[:, :, n].transpose(1, 2) for n in range(3))
        out = hsa_attention_triton(q, k, v, l)
        dout = torch.randn_like(out)
        out.backward(dout)
        ref_in = [base[:, :, n].transpose(1, 2).clone().requires_grad_() for n in range(3)]
        ref = hsa_attention_ref(*ref_in, l)
        ref.backward(dout)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        for n in range(3):
            torch.testing.assert_close(qkv.grad[:, :, n].transpose(1, 2), ref_in[n].grad, atol=1e-5, rtol=1e-4)

    # Launch configurations other than the defaults (16- to 128-row strided tiles, band blocks of 32 and 128, key tiles
    # apart from query blocks, the unrolled band backward at l - 1 <= block, l = block + 1 included), picked up from
    # the TUNED table.
    from kernels import hsa_attention as hsa
    from kernels.hsa_attention import HsaConfig, Launch
    configs = [
        HsaConfig(Launch(16, 2), Launch(128, 4, 2, 32), Launch(32, 4), Launch(32, 4, 1, maxnreg=168)),
        HsaConfig(Launch(128, 8), Launch(32, 4, 3, 128), Launch(128, 8), Launch(128, 8, 2)),
        HsaConfig(Launch(16, 2), Launch(64, 4, 2, 64), Launch(32, 4), Launch(64, 4, 1, unrolled=True)),
    ]
    for T, l in [(257, 64), (300, 20), (130, 65), (40, 3)]:
        q, k, v = (torch.randn(1, 2, T, 16, requires_grad=True) for _ in range(3))
        dout = torch.randn(1, 2, T, 16)
        ref = hsa_attention_ref(q, k, v, l)
        ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
        for cfg in configs:
            assert hsa.config_error(cfg, T, l, 16) is None
            hsa.TUNED[(T, l, 16)] = cfg
            out = hsa_attention_triton(q, k, v, l)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
            for g, g_ref in zip(torch.autograd.grad(out, (q, k, v), dout), ref_grads):
                torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    hsa.TUNED.clear()

    # Output and gradient layouts: (B, T, nh, hs) for the model's q (no copy before c_proj), contiguous otherwise;
    # the fake ops (what torch.compile plans with) give the same strides as the kernels.
    from tests.helpers import attention_qkv, check_hsa_op_layouts
    for model_layout in (True, False):
        q, k, v = attention_qkv((2, 4, 40, 16), model_layout)
        o, lse, grads = check_hsa_op_layouts(q, k, v, torch.randn(2, 4, 40, 16), 8, 0)
        assert o.transpose(1, 2).is_contiguous() == model_layout and o.is_contiguous() != model_layout
        assert [g.stride() for g in grads] == [o.stride()] * 3

    # One tensor as q, k and v (dynamo refuses it twice in one autograd.Function), eager and compiled.
    x = torch.randn(1, 2, 40, 16, requires_grad=True)
    dout = torch.randn(1, 2, 40, 16)
    ref = hsa_attention_ref(x, x, x, 8)
    (ref_grad,) = torch.autograd.grad(ref, x, dout)
    self_attn = lambda x: hsa_attention_triton(x, x, x, 8)
    for fn in (self_attn, torch.compile(self_attn, backend="aot_eager", fullgraph=True)):
        out = fn(x)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.autograd.grad(out, x, dout)[0], ref_grad, atol=1e-5, rtol=1e-4)

    # Inside a compiled GPT the kernels are library ops: one graph, no break (fullgraph raises on any), same numbers.
    from model.gpt import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=64, bias=False))
    for block in model.transformer.h:
        block.attn.attend = lambda q, k, v, dropout_p=0.0: hsa_attention_triton(q, k, v, 8)
    idx = torch.randint(0, 64, (2, 64))
    want = model(idx, idx)[1]
    want.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(idx, idx)[1]
    got.backward()
    torch.testing.assert_close(got, want)
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)

    # HsaAttention switched to dense causal attention (runtime_mode 1) inside that compiled model: the same graph
    # (the mode is its input), HSA's and then dense causal attention's numbers. (Its Triton path is for 16-bit
    # dtypes on a GPU; here the interpreter runs it in fp32.)
    from torch._dynamo.testing import CompileCounterWithBackend

    from kernels import compile_runtime_modes
    from model.gpt import causal_attention
    hsa.triton_unsupported = lambda *args: None
    attend = hsa.HsaAttention(8)
    torch._dynamo.reset()
    compile_runtime_modes()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for mode, fn in [(0, lambda q, k, v, dropout_p=0.0: hsa_attention_ref(q, k, v, 8)), (1, causal_attention),
                     (0, lambda q, k, v, dropout_p=0.0: hsa_attention_ref(q, k, v, 8))]:
        for block in model.transformer.h:
            block.attn.attend = fn
        model.zero_grad(set_to_none=True)
        want = model(idx, idx)[1]
        want.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        for block in model.transformer.h:
            block.attn.attend = attend
        attend.runtime_mode = mode
        model.zero_grad(set_to_none=True)
        got = compiled(idx, idx)[1]
        got.backward()
        torch.testing.assert_close(got, want)
        for p, g in zip(model.parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad, g)
    assert counter.frame_count == 1, counter.frame_count
    print("ok")
    """
)


@pytest.mark.slow
def test_triton_kernel_matches_ref_in_interpreter():
    pytest.importorskip("triton")
    check_interpreted(_INTERPRETER_SCRIPT)


def test_bench_host_cost_compiles_one_graph():
    """kernels/bench_hsa.py --host-cost on a tiny chain: the stubbed Triton path compiles to one graph and launches
    the four kernels once per call."""
    pytest.importorskip("triton")
    from kernels import bench_hsa

    cost = bench_hsa.host_cost(n_calls=2, reps=1)
    assert cost["graphs"] == 1 and cost["launches_per_call"] == 4 and cost["host_us_per_call"] > 0


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.float() - ref).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "T, stride, hs", [(1024, 64, 64), (256, 16, 64), (512, 128, 128), (1000, 48, 64), (2048, 64, 64), (1024, 16, 128)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_ref_on_gpu(T, stride, hs, dtype):
    """Triton vs fp32 masked SDPA, allowed twice the error of the same SDPA run in low precision."""
    B, H = 2, 4
    q, k, v = (torch.randn(B, H, T, hs, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, T, hs, device="cuda", dtype=dtype)
    fp32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = hsa_attention_ref(*fp32, stride)
    ref_grads = torch.autograd.grad(ref, fp32, dout.float())
    low = hsa_attention_ref(q, k, v, stride)
    low_grads = torch.autograd.grad(low, (q, k, v), dout)
    out = hsa_attention(q, k, v, stride, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert _max_err(out, ref) <= 2 * _max_err(low, ref) + 1e-3
    for name, g, g_low, g_ref in zip("qkv", grads, low_grads, ref_grads):
        assert _max_err(g, g_ref) <= 2 * _max_err(g_low, g_ref) + 1e-3, f"d{name}"


@pytest.mark.gpu
@pytest.mark.parametrize("T, stride", [(1024, 64), (1024, 256)])
def test_programmatic_launches_match_plain_ones_bit_for_bit(T, stride):
    """With programmatic dependent launch each band kernel starts while its strided kernel runs (the forward's loop
    beside it, waiting only to merge): the same bits as plain launches, eagerly and as CUDA-graph replays, call
    after call (no atomics, so any race would show as a changed bit)."""
    from kernels import hsa_attention as hsa
    from kernels import pdl_capable

    if not pdl_capable(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm90 or later")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(8, 12, T, 64, generator=gen).cuda().bfloat16().requires_grad_() for _ in range(3))
    dout = torch.randn(8, 12, T, 64, generator=gen).cuda().bfloat16()

    def call() -> list[torch.Tensor]:
        out = hsa_attention_triton(q, k, v, stride)
        return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]

    check_pdl_against_plain(hsa, call, lambda got, want: torch.testing.assert_close(got, want, atol=0, rtol=0))


@pytest.mark.gpu
@pytest.mark.parametrize("model_layout", [True, False])
def test_causal_mode_is_dense_causal_attention_on_gpu(model_layout):
    """causal = 1 (HsaAttention.runtime_mode, MST's attention after HSA ends): the ops run flash attention's own
    kernels, within the error of SDPA's causal attention in bf16 against fp32, in the layouts the fakes promise."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = attention_qkv((2, 12, 1024, 64), model_layout, generator=gen, device="cuda", dtype=torch.bfloat16)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    dout = torch.randn(2, 12, 1024, 64, generator=gen).cuda().bfloat16()
    out = hsa_attention_triton(q, k, v, 64, 1)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    fp32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = causal_attention(*fp32)
    ref_grads = torch.autograd.grad(ref, fp32, dout.float())
    low = causal_attention(q, k, v)
    low_grads = torch.autograd.grad(low, (q, k, v), dout)
    assert _max_err(out, ref) <= 2 * _max_err(low, ref) + 1e-3
    for name, g, g_low, g_ref in zip("qkv", grads, low_grads, ref_grads):
        assert _max_err(g, g_ref) <= 2 * _max_err(g_low, g_ref) + 1e-3, f"d{name}"
    check_hsa_op_layouts(q, k, v, dout, 64, 1)


@pytest.mark.gpu
def test_auto_picks_triton_on_gpu_and_ref_otherwise():
    q, k, v = (torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    torch.testing.assert_close(hsa_attention(q, k, v, 16), hsa_attention_triton(q, k, v, 16), atol=0, rtol=0)
    ref = hsa_attention_ref(q, k, v, 16, "local")
    torch.testing.assert_close(hsa_attention(q, k, v, 16, "local"), ref, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "cfg",
    [
        HsaConfig(Launch(32, 2), Launch(128, 8, 2, 32), Launch(32, 4), Launch(32, 4, 1)),
        HsaConfig(Launch(128, 8), Launch(64, 4, 1, 128), Launch(128, 8), Launch(128, 8, 2)),
        HsaConfig(
            Launch(64, 4), Launch(64, 4, 2, 64, maxnreg=128), Launch(64, 4, maxnreg=128), Launch(64, 4, 2, maxnreg=168)
        ),
        HsaConfig(Launch(64, 4), Launch(64, 4, 2, 64), Launch(64, 4), Launch(64, 4, 1, maxnreg=168, unrolled=True)),
    ],
)
@pytest.mark.parametrize("T, stride", [(1000, 48), (2048, 64)])
def test_launch_configs_match_ref_on_gpu(cfg, T, stride, monkeypatch):
    """Configurations of the sweep's grid other than the defaults, as the model calls the kernel (q, k, v views of
    one c_attn output), through the TUNED table."""
    monkeypatch.setitem(TUNED, (T, stride, 64), cfg)
    B, H, hs = 2, 4, 64
    qkv = torch.randn(B, T, 3 * H * hs, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = (x.view(B, T, H, hs).transpose(1, 2) for x in qkv.split(H * hs, dim=2))
    dout = torch.randn(B, H, T, hs, device="cuda", dtype=torch.bfloat16)
    ref = hsa_attention_ref(*(x.detach().float() for x in (q, k, v)), stride)
    low = hsa_attention_ref(q, k, v, stride)
    out = hsa_attention(q, k, v, stride, backend="triton")
    assert out.transpose(1, 2).is_contiguous()  # (B, T, nh, hs): the model's transpose + contiguous is free
    assert _max_err(out, ref) <= 2 * _max_err(low, ref) + 1e-3
    fp32 = qkv.detach().float().requires_grad_()
    ref_q, ref_k, ref_v = (x.view(B, T, H, hs).transpose(1, 2) for x in fp32.split(H * hs, dim=2))
    (ref_grad,) = torch.autograd.grad(hsa_attention_ref(ref_q, ref_k, ref_v, stride), fp32, dout.float())
    (low_grad,) = torch.autograd.grad(low, qkv, dout)
    (grad,) = torch.autograd.grad(out, qkv, dout)
    for part, g, g_low, g_ref in zip("qkv", grad.chunk(3, -1), low_grad.chunk(3, -1), ref_grad.chunk(3, -1)):
        assert _max_err(g, g_ref) <= 2 * _max_err(g_low, g_ref) + 1e-3, f"d{part}"


@pytest.mark.gpu
def test_bench_rows_and_sweep_on_gpu():
    """kernels/bench_hsa.py on a small case: every variant and layout in both timing modes (the graph rows capture
    the HSA custom ops, forward and backward), then a sweep over a two-point grid per kernel."""
    import time

    from kernels import bench_hsa as bench

    rows = [r for mode in bench.MODES for r in bench.case_rows(256, 16, 2, mode, warmup=1, iters=3)]
    assert all("error" not in r for r in rows), [r["error"] for r in rows if "error" in r]
    assert len(rows) == len(bench.MODES) * len(bench.LAYOUTS) * 3
    assert all(r["fwd_ms"] > 0 and r["speedup_fwd_bwd"] > 0 for r in rows)
    grid = {"strided_fwd": [Launch(64, 4), Launch(32, 2)], "band_fwd": [Launch(64, 4, 3, 64), Launch(128, 8, 2, 64)],
            "strided_bwd": [Launch(64, 4), Launch(32, 4)], "band_bwd": [Launch(64, 4, 2), Launch(32, 4, 1)]}
    timer = lambda fn: bench.time_call(fn, "graph", 1, 3)
    swept = bench.sweep_case(256, 16, 2, timer, time.time() + 300, candidates=grid.__getitem__, log=lambda s: None)
    for name in HsaConfig._fields:
        trials = swept["kernels"][name]["trials"]
        assert len(trials) == 2 and all(t["ok"] and t["ms"] > 0 for t in trials), trials
        assert swept["kernels"][name]["best"] == min(trials, key=lambda t: t["ms"])["launch"]
    assert swept["tuned_fwd_ms"] > 0 and swept["tuned_bwd_ms"] > 0 and swept["tuned_entry"].startswith("(256, 16, 64)")


def test_hbm_bytes_by_hand():
    from kernels import bench_hsa as bench

    # B = nh = 1, T = 4, hs = 2, bf16: a (B, nh, T, hs) tensor is t = 16 bytes, lse s = 16 bytes
    nb = bench.hbm_bytes(4, 1, n_head=1, head_dim=2)
    assert nb["_strided_fwd_kernel"] == 4 * 16 + 16 and nb["_band_fwd_kernel"] == 5 * 16 + 32
    assert nb["_strided_bwd_kernel"] == 8 * 16 + 32 and nb["_band_bwd_kernel"] == 10 * 16 + 32
    assert nb["two_pass"] == 80 + 112 + 160 + 192 and nb["one_pass"] == 80 + 144


def test_per_kernel_stubs_name_the_kernels_each_pass_launches():
    """kernel_rows times one kernel by stubbing the other three: their names must be the module's, in launch order."""
    from kernels import bench_hsa as bench
    from kernels import hsa_attention as hsa
    from kernels.benchutil import stubbed_launches

    q, k, v, do = (torch.randn(1, 2, 128, 16) for _ in range(4))
    with stubbed_launches(hsa, bench.KERNELS) as launches:
        o, lse = hsa.hsa_forward(q, k, v, 16)
        hsa.hsa_backward(q, k, v, o, lse, do, 16)
    assert launches == list(bench.KERNELS)


@pytest.mark.gpu
def test_kernel_rows_on_gpu():
    from kernels import bench_hsa as bench

    row = bench.kernel_rows(256, 16, 2, warmup=1, iters=3)
    assert list(row["kernels"]) == list(bench.KERNELS)
    assert all(r["ms"] > 0 and r["GB_per_s"] > 0 for r in row["kernels"].values())
    assert row["hsa_fwd_ms"] > 0 and row["flash_fwd_bwd_ms"] > 0
