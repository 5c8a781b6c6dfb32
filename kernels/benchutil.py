"""Timing and error helpers shared by the kernel benchmarks (kernels/bench_*.py)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], warmup: int, reps: int, sync_each: bool = True) -> float:
    """Median milliseconds of fn() over reps calls after warmup calls: CUDA events on a GPU (sync_each=False queues
    the calls back to back, as training does), the host clock on a CPU (smoke runs only)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
        return statistics.median(times)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
        if sync_each:
            end.synchronize()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def capture(fn: Callable[[], object], warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, object]:
    """fn captured in a CUDA graph after `warmup` calls on a side stream (they also finish Triton autotuning and
    cuBLAS/cuSPARSELt setup, which cannot run inside a capture); returns the graph and what the captured call
    returned (static tensors that every replay overwrites). Nothing fn reads may keep an autograd graph from an
    earlier call alive: its AccumulateGrad nodes belong to another stream and the capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in fp32."""
    want = want.float()
    return ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
