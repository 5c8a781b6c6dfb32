"""Session 33 probe: why block MST's steps 200-202 (the first block-sparse update and the steps after it) take
0.1-0.9 s in the whole run. Runs the whole-run command's schedule (6000 steps, reduce-overhead) to step 199, then
times steps 200-205 and 300-303 one by one and profiles the host ops of 200-202 (top by self CPU time)."""

import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.getcwd())  # run from the repository root

from bench import RandomTokens, for_method  # noqa: E402
from core.config import load_config  # noqa: E402
from train import setup, train_step  # noqa: E402

sets = ["mst.granularity=block", "train.compile_mode=reduce-overhead", "train.batch_size=16", "train.grad_accum=1",
        "train.steps=6000"]
cfg = load_config("configs/gpt2.toml", "mst", for_method(sets, "mst"))
run = setup(cfg, data=RandomTokens(50257, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed))


def timed(s):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    train_step(run, s)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


ms = {s: timed(s) for s in range(0, 200)}
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for s in range(200, 203):
        ms[s] = timed(s)
for s in list(range(203, 206)) + list(range(206, 304)):
    ms[s] = timed(s)
out = {k: round(v, 1) for k, v in ms.items() if k < 3 or k >= 195 and (k < 210 or k >= 298)}
print(json.dumps(out))
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90))
os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
with open(os.path.join(os.environ.get("OUT", "."), "transition.json"), "w") as f:
    json.dump({"step_ms": out}, f)
sys.exit(0)
