"""Timing and error helpers shared by the kernel benchmarks (kernels/bench_*.py)."""

from __future__ import annotations

import contextlib
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from unittest import mock

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


def graph_ms(fn: Callable[[], object], reps: int = 50, rounds: int = 3) -> float:
    """Milliseconds a replay of fn captured in a CUDA graph (`capture`): `rounds` runs of `reps` back-to-back
    replays between one CUDA event pair each, the fastest run's mean (the one-off A/B scripts in results/raw)."""
    graph, _ = capture(fn)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    runs = []
    for _ in range(rounds):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) / reps)
    return min(runs)


def record_header(method: str, module: str) -> dict[str, str]:
    """The keys every results JSON of a kernel benchmark starts with: what it measures, the command that ran it
    (`python -m <module>` with this process's arguments), the CUDA device, torch and triton versions."""
    import triton

    return {
        "method": method,
        "command": shlex.join(["python", "-m", module, *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in fp32."""
    want = want.float()
    return ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def rel_norm_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got - want‖ / ‖want‖ (Frobenius), in fp32."""
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


class StubKernel:
    """Stands in for a Triton kernel: counts launches instead of running them."""

    def __init__(self, launches: list[str], name: str) -> None:
        self.launches, self.name = launches, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(self.name)


@contextlib.contextmanager
def stubbed_launches(module: object, names: tuple[str, ...]) -> Iterator[list[str]]:
    """`module`'s Triton kernels `names` replaced by launch counters (the yielded list of launched names), with torch
    on one thread meanwhile, so that no idle worker thread counts in a host-time measurement."""
    launches: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.ExitStack() as stack:
            for name in names:
                stack.enter_context(mock.patch.object(module, name, StubKernel(launches, name)))
            yield launches
    finally:
        torch.set_num_threads(threads)


def host_work(step: Callable[[], object], launches: list[str], reps: int, per: int, unit: str) -> dict[str, float]:
    """Host cost of an already warmed-up step, divided over its `per` units (layers, calls): µs of this process's
    CPU time (the best of 5 rounds of `reps` steps: other processes on a shared machine don't count), Python and C
    calls (one profiled step) and kernel launches (that step's entries in `launches`)."""
    rounds = []
    for _ in range(5):
        t = time.process_time()
        for _ in range(reps):
            step()
        rounds.append((time.process_time() - t) / reps)
    calls = {"call": 0, "c_call": 0}

    def count(frame, event, arg) -> None:
        if event in calls:
            calls[event] += 1

    launches.clear()
    sys.setprofile(count)
    try:
        step()
    finally:
        sys.setprofile(None)
    return {
        f"host_us_per_{unit}": 1e6 * min(rounds) / per,
        f"python_calls_per_{unit}": calls["call"] / per,
        f"c_calls_per_{unit}": calls["c_call"] / per,
        f"launches_per_{unit}": len(launches) / per,
    }
