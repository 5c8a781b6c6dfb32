"""Run a few trainer steps under torchrun (gloo on CPU) and report, per rank, hashes of the weights and of the
method's state after every step. Used by tests/test_ddp.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py <root> <method> <steps> <out.json> [k=v..]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import tiny_config  # noqa: E402
from train import setup, train_step  # noqa: E402


def digest(obj) -> str:
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            h.update(x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if x.numel() else b"")
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, list | tuple):
            for v in x:
                feed(v)
        else:
            h.update(repr(x).encode())

    feed(obj)
    return h.hexdigest()


def main() -> None:
    root, method, steps, out = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    cfg = tiny_config(root, method, [f"train.steps={steps}", *sys.argv[5:]])
    run = setup(cfg)
    rank = dist.get_rank()
    # Different per-rank seeds for everything the method might draw from the global RNG: agreement must come
    # from the method's own synchronisation, not from luck.
    torch.manual_seed(1000 + rank)
    history = []
    for step in range(steps):
        loss, *_ = train_step(run, step)
        # SAT's "stats" are each rank's local activation statistics, all-reduced only when the next selection
        # is made; everything else a method holds must agree across ranks.
        shared = {k: v for k, v in run.method.state_dict().items() if k != "stats"}
        history.append({"loss": float(loss), "weights": digest(run.model.state_dict()), "method": digest(shared)})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, history)
    if rank == 0:
        out.write_text(json.dumps(gathered))
    dist.destroy_process_group()
    # Skip interpreter teardown: with gloo's threads and the Triton modules torch.compiler imports, CPython's
    # finalisation of this worker can stall (the trainer's own `torchrun train.py --method 2of4` exits cleanly).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
