"""Compile a run's Triton kernels ahead of it, in child processes, while the run compiles its model.

A cold Triton cache makes a run's first calls of our kernels compile them, and the block-sparse kernels autotune
over several configs (each one compiled): on an H200 the first step with block-sparse layers took 26.5 s in a GPT-2
124M block-MST run, the next new shapes 5.7 s more (`results/raw/h200-runtime-modes-s31.json`). The kernels land in
Triton's on-disk cache, so a child process that runs each layer's fwd+bwd once, on the same GPU with the run's
shapes, leaves them there for the run to load. The run compiles nothing twice that a child finished first, and a
kernel the run reaches first it compiles itself: the same binary, so results are unchanged. The children's
autotune picks land on the disk too (`kernels/autotune.py`): the run takes them instead of timing the configs
again, and waits for a child still timing a key it reaches rather than timing it beside it.

A method lists what its model will launch (`Method.kernel_warmups`); `spawn` starts one child per list item.

    python -m kernels.prewarm '{"kind": "block_sparse", "out": 3072, "in": 768, "block": 64, "blocks": 58,
                                "dw_density": 0.1, "tokens": 16384}'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("block_sparse", "hsa")


def check(spec: dict) -> None:
    """A one-line ValueError for a spec `run` cannot take."""
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"prewarm spec kind must be one of {', '.join(KINDS)}, got {kind!r}")
    need = {"block_sparse": ("out", "in", "block", "blocks", "dw_density", "tokens"),
            "hsa": ("batch", "heads", "T", "head_dim", "stride")}[kind]  # fmt: skip
    missing = [k for k in need if k not in spec]
    if missing:
        raise ValueError(f"prewarm spec {kind} lacks {', '.join(missing)}")


def run(spec: dict, device: str = "cuda") -> None:
    """One fwd+bwd of the kernels `spec` describes, as the trainer calls them (bf16 autocast over fp32 masters)."""
    check(spec)
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the CPU interpreter checks fp32 only
    if spec["kind"] == "block_sparse":
        from kernels import block_sparse as bs

        out, inp, b, m = spec["out"], spec["in"], spec["block"], spec["tokens"]
        grid = (out // b, inp // b)
        mask = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
        mask[torch.randperm(mask.numel(), generator=gen)[: spec["blocks"]]] = True
        mod = bs.BlockSparseLinear(inp, out, bias=spec.get("bias", True), block=b, backend="triton").to(device)
        mod.set_block_mask(mask.view(grid))
        mod.dw_density = spec["dw_density"]
        x = torch.randn(m, inp, generator=gen).to(device, dtype).requires_grad_()
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            y = mod(x)
        y.backward(torch.randn(y.shape, generator=gen).to(device, y.dtype))
    else:
        from kernels.hsa_attention import hsa_attention_triton

        B, H, T, D = spec["batch"], spec["heads"], spec["T"], spec["head_dim"]
        qkv = torch.randn(B, T, 3 * H * D, generator=gen).to(device, dtype)  # the model's c_attn output layout
        q, k, v = (t.view(B, T, H, D).transpose(1, 2).requires_grad_() for t in qkv.split(H * D, dim=2))
        o = hsa_attention_triton(q, k, v, spec["stride"])
        o.backward(torch.randn(o.shape, generator=gen).to(device, o.dtype))
    if device == "cuda":
        torch.cuda.synchronize()


def spawn(specs: list[dict], device: torch.device) -> list[subprocess.Popen]:
    """One child process per distinct spec, on `device`, output discarded; returns them (nobody needs to wait)."""
    unique = list({json.dumps(s, sort_keys=True): s for s in specs}.values())
    for spec in unique:
        check(spec)
    env = dict(os.environ)
    if device.index is not None:  # the child sees the run's GPU as its only one
        visible = env.get("CUDA_VISIBLE_DEVICES")
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[device.index] if visible else str(device.index)
    return [
        subprocess.Popen([sys.executable, "-m", "kernels.prewarm", json.dumps(s)], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        for s in unique
    ]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m kernels.prewarm '<spec as JSON>'", file=sys.stderr)
        return 2
    try:
        spec = json.loads(argv[0])
        check(spec)
    except (json.JSONDecodeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run(spec, "cuda" if torch.cuda.is_available() else "cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
