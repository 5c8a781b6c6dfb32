import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from kernels.cross_entropy import CrossEntropy, cross_entropy, cross_entropy_ref, triton_unsupported
from model.gpt import GPT, GPTConfig, cross_entropy_loss
from tests.interpreted import check_interpreted

gpu = pytest.mark.gpu


def test_ref_by_hand():
    # Row 0: logits (0, 0, ln 2), target 2: p = 2/4, loss ln 2. Row 1: ignored. Row 2: (ln 3, 0, 0), target 1:
    # p = 1/5, loss ln 5. Mean over the two counted rows.
    logits = torch.tensor([[0.0, 0.0, math.log(2)], [5.0, 1.0, 2.0], [math.log(3), 0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([2, -1, 1])
    loss = cross_entropy_ref(logits, targets)
    assert loss.item() == pytest.approx((math.log(2) + math.log(5)) / 2)
    loss.backward()
    want = torch.tensor([[0.25, 0.25, -0.5], [0.0, 0.0, 0.0], [0.6, 0.2 - 1.0, 0.2]]) / 2
    torch.testing.assert_close(logits.grad, want)


def test_model_default_loss_is_the_ref():
    torch.manual_seed(0)
    model = GPT(GPTConfig(preset="tiny", block_size=16, vocab_size=64))
    assert model.loss_fn is cross_entropy_loss
    x = torch.randint(0, 64, (2, 16))
    y = x.clone()
    y[0, :3] = -1
    logits, loss = model(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 64), y.view(-1), ignore_index=-1))
    model.loss_fn = CrossEntropy("ref")
    torch.testing.assert_close(model(x, y)[1], loss)


def test_compiled_model_traces_the_loss_in_one_graph():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = GPT(GPTConfig(preset="tiny", block_size=16, vocab_size=64))
    model.loss_fn = CrossEntropy("auto")
    x = torch.randint(0, 64, (2, 16))
    want = model(x, x)[1]
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    got = torch.compile(model, backend=counter, fullgraph=True)(x, x)[1]
    assert counter.frame_count == 1
    torch.testing.assert_close(got, want)


def test_cpu_dispatch_and_bad_backends():
    logits, targets = torch.randn(4, 10), torch.randint(0, 10, (4,))
    assert triton_unsupported(logits, targets) == "logits are not on a CUDA device"
    torch.testing.assert_close(cross_entropy(logits, targets), cross_entropy_ref(logits, targets))
    with pytest.raises(RuntimeError, match="cannot run this call: logits are not on a CUDA device"):
        cross_entropy(logits, targets, backend="triton")
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        cross_entropy(logits, targets, backend="cuda")
    with pytest.raises(ValueError, match="loss kernel must be one of auto, triton, ref"):
        CrossEntropy("fast")


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import tests.triton_interp  # noqa: F401
    import torch
    from kernels import cross_entropy as ce

    torch.manual_seed(0)
    # Chunks of 64 over vocabularies that are (130, 200) and are not (64) a multiple of it; fp32 and bf16; one
    # ignored row, one all-ignored batch (nan, as F.cross_entropy), a row whose logits are all equal.
    ce.FWD_BLOCK = ce.BWD_BLOCK = 64
    for N, V, dtype, tol in [(7, 200, torch.float32, 1e-6), (5, 64, torch.bfloat16, 8e-3),
                             (9, 130, torch.bfloat16, 8e-3)]:
        x = (torch.randn(N, V) * 4).to(dtype)
        x[2] = 1.5
        t = torch.randint(0, V, (N,))
        t[1] = -1
        assert ce.triton_unsupported(x, t) is None
        got_x, want_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = ce.cross_entropy(got_x, t)  # auto: Triton in the interpreter
        want = ce.cross_entropy_ref(want_x, t)
        (3 * got).backward()
        (3 * want).backward()
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_x.grad.float(), want_x.grad.float(), rtol=0, atol=tol)
        assert (got_x.grad[1] == 0).all()
        all_ignored = ce.cross_entropy(x, torch.full((N,), -1))
        assert torch.isnan(all_ignored), all_ignored

    # In a model compiled whole (fullgraph: the dispatch and the autograd.Function trace without a break), the
    # same loss and gradients as the eager model with the reference loss.
    from torch._dynamo.testing import CompileCounterWithBackend
    from model.gpt import GPT, GPTConfig
    model = GPT(GPTConfig(preset="tiny", block_size=16, vocab_size=96))
    idx = torch.randint(0, 96, (2, 16))
    want = model(idx, idx)[1]
    want.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model.loss_fn = ce.CrossEntropy("triton")
    counter = CompileCounterWithBackend("aot_eager")
    got = torch.compile(model, backend=counter, fullgraph=True)(idx, idx)[1]
    got.backward()
    assert counter.frame_count == 1, counter.frame_count
    torch.testing.assert_close(got, want)
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)
    print("ok")
    """
)


@pytest.mark.slow
def test_triton_kernels_match_ref_in_interpreter():
    pytest.importorskip("triton")
    check_interpreted(_INTERPRETER_SCRIPT)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_matches_ref_on_gpu(dtype):
    torch.manual_seed(0)
    N, V = 1000, 50304
    x = (torch.randn(N, V, device="cuda") * 3).to(dtype)
    t = torch.randint(0, V, (N,), device="cuda")
    t[::7] = -1
    got_x, want_x = x.clone().requires_grad_(), x.float().requires_grad_()
    got = cross_entropy(got_x, t, backend="triton")
    want = cross_entropy_ref(want_x, t)
    (0.5 * got).backward()
    (0.5 * want).backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    tol = 1e-7 if dtype == torch.float32 else 2**-8 * want_x.grad.abs().max().item()
    torch.testing.assert_close(got_x.grad.float(), want_x.grad, rtol=0, atol=tol)


@gpu
def test_compiled_model_trains_the_same_with_either_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(preset="tiny", block_size=64, vocab_size=512)).cuda()
    x = torch.randint(0, 512, (4, 64), device="cuda")
    results = []
    for backend in ("ref", "triton"):
        model.loss_fn = CrossEntropy(backend)
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = torch.compile(model)(x, x)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_ref, grads_ref), (loss_tri, grads_tri) = results
    torch.testing.assert_close(loss_tri, loss_ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads_tri, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


@gpu
def test_bench_rows_on_gpu(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "ce.json"
    proc = subprocess.run([sys.executable, "-m", "kernels.bench_cross_entropy", "--tokens", "2048", "--out",
                           str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert {r["variant"] for r in record["rows"]} == {"triton", "inductor", "eager"}
    assert record["errors"]["grad_rel"] < 1e-2 and record["errors"]["loss_rel"] < 1e-5
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > r["fwd_ms"] for r in record["rows"])
