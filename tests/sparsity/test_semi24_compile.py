"""A torch.compile'd GPT with --method 2of4 is one graph (the 2:4 layers are custom ops) and trains exactly as eager."""

import pytest
import torch
from torch._dynamo.utils import counters

from kernels import semi24 as s
from model.gpt import GPT, GPTConfig
from sparsity.semi24 import Semi24, Semi24Config
from tests.helpers import method_step


def _setup(device: str = "cpu", **knobs):
    torch.manual_seed(0)
    mcfg = GPTConfig(preset="tiny", block_size=16, vocab_size=64) if device == "cpu" else \
        GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=64, vocab_size=256)
    model = GPT(mcfg).to(device)
    method = Semi24(Semi24Config(**knobs), mcfg, total_steps=4, seed=0)
    model = method.attach(model)
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-2 if device == "cpu" else 1e-3, betas=(0.9, 0.95),
                                    device_type=device)
    return model, method, opt


def _batch(step: int, micro: int, cfg: GPTConfig, device: str, batch: int):
    g = torch.Generator().manual_seed(1000 + 10 * step + micro)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=g)
    return x.to(device), torch.roll(x, -1, 1).to(device)


def _train(model, method, opt, run_model, device: str = "cpu", batch: int = 4, autocast=None):
    """4 optimizer steps of 2 micro-batches: the mask refreshes after step 1, step 3 is the dense fine-tune.
    Returns the micro-batch losses, every parameter's gradient before each optimizer step, the final masks, and the
    number of captured MLP CUDA graphs after each step's backward."""
    losses, grads, graphs = [], [], []
    mlps = [m for m in model.modules() if isinstance(m, s.SparseMLP24)]

    def check(where, step, *_):
        if where == "after_backward":
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            graphs.append(sum(len(m._graphs) for m in mlps))

    for step in range(4):
        # The first call compiles and the dense fine-tune may compile once more; the optimizer steps and the mask
        # refresh in between must not recompile.
        with torch._dynamo.config.patch(error_on_recompile=step not in (0, 3)):
            micro = [_batch(step, k, model.config, device, batch) for k in range(2)]
            losses += method_step(run_model, method, opt, step, micro, check=check, autocast=autocast)[0]
    return losses, grads, {n: m.mask_index.clone() for n, m in method.layers.items()}, graphs


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_compiled_gpt_is_one_graph_and_bit_identical_to_eager(cuda_graph):
    """fullgraph=True raises on any graph break. aot_eager runs the ops' fakes and autograd formulas as inductor does;
    the MVUE seeds, masks and grads must come out bit for bit as eager (fp32 on CPU)."""
    knobs = dict(backend="ref", cuda_graph=cuda_graph, mask_interval=2, decay=0.5, dense_ft_fraction=0.25)
    model, method, opt = _setup(**knobs)
    eager = _train(model, method, opt, model)
    torch._dynamo.reset()
    counters.clear()
    model, method, opt = _setup(**knobs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = _train(model, method, opt, compiled)
    assert not counters["graph_break"]
    # One graph per phase (sparse, dense fine-tune); SparseMLP24 switches to dense inside its op.
    assert counters["stats"]["unique_graphs"] == (1 if cuda_graph else 2)
    assert got[0] == eager[0]
    for a, b in zip(got[1], eager[1], strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(got[2][n], eager[2][n]) for n in eager[2])
    mlps = [m for m in model.modules() if isinstance(m, s.SparseMLP24)]
    assert len(mlps) == (2 if cuda_graph else 0) and not any(m._pending for m in mlps)
    x, y = _batch(9, 0, model.config, "cpu", 4)
    with torch.no_grad():  # evaluation: the ops' no-grad path, nothing kept for a backward
        assert torch.equal(compiled(x, y)[1], model(x, y)[1])
    assert not any(m._pending for m in mlps)
    loss = compiled(x, y)[1]  # a forward whose backward never comes: its MLP graphs go with its own graph
    assert all(len(m._pending) == 1 for m in mlps)
    del loss
    assert not any(m._pending for m in mlps)


# ------------------------------------------------------------------------------------------------------- GPU
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


# The MLP capture fails in some runs and not in others: on an H100 (torch 2.11, 2026-11-23) it failed
# (cudaErrorStreamCaptureInvalidated after an AccumulateGrad stream-mismatch warning); on an H200 (session 22) it
# failed for whichever backend ran first in the process and then captured and replayed for the other, in both orders.
CAPTURE_FAILS = "the MLP capture failed and the MLPs fell back to eager (known, intermittent; cuda_graph is off)"


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("backend", ["cusparselt", "auto"])
def test_gpu_compiled_gpt_matches_eager(backend, cuda_graph):
    """Inductor, fullgraph, bf16 autocast, the trainer's hook order: the compiled model calls the ops, whose bodies
    run the eager cuSPARSELt path (and, with cuda_graph, capture and replay the MLP graphs). MVUE off: its draws
    would amplify bf16 rounding differences between the two models into sampling noise."""
    if not s.cusparselt_available():
        pytest.skip("no cuSPARSELt-capable GPU")
    s._BROKEN.discard("graph")
    knobs = dict(backend=backend, cuda_graph=cuda_graph, mvue=False, mask_interval=2, decay=6e-5,
                 dense_ft_fraction=0.25)
    runs = []
    for compile_it in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model, method, opt = _setup("cuda", **knobs)
        run_model = torch.compile(model, fullgraph=True) if compile_it else model
        runs.append(_train(model, method, opt, run_model, "cuda", batch=8,
                           autocast=torch.autocast("cuda", torch.bfloat16)))
        assert not counters["graph_break"]
        if cuda_graph and "graph" in s._BROKEN:  # a capture that worked is held to everything below
            pytest.xfail(CAPTURE_FAILS)
        # Captured at the third call (two warm-ups), replayed through the mask refresh, dropped by the dense phase.
        assert runs[-1][3] == ([0, 2, 2, 0] if cuda_graph else [0] * 4) and "graph" not in s._BROKEN
    (loss_e, grads_e, *_), (loss_c, grads_c, *_) = runs
    assert all(abs(a - b) < 1e-2 * abs(b) for a, b in zip(loss_c, loss_e, strict=True))
    for a, b in zip(grads_c, grads_e, strict=True):
        for n in b:
            assert _rel(a[n], b[n]) < 5e-2, n
