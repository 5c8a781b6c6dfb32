"""Autotune picks that outlive the process: stored, taken by a later process, waited for while another process
times the same key, and timed under the GPU's lock."""

import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from triton import knobs

from kernels import autotune as at

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [triton.Config({"BK": bk}, num_warps=w, num_stages=3) for bk, w in ((32, 4), (64, 4), (64, 8))]


@triton.jit
def _toy_kernel(x_ptr, N, BK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BK), tl.zeros((BK,), tl.float32), mask=tl.arange(0, BK) < N)


def _tuner():
    """A fresh tuner for the toy kernel: what another process would hold, with its own Config objects."""
    configs = [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages) for c in CONFIGS]
    return at.autotune(configs, key=["N"])(_toy_kernel)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(at, "_target_hash", lambda: "cpu-test")  # no GPU backend to hash here
    assert knobs.cache.dir == str(tmp_path)
    return tmp_path


def _bench_picking(tuner, key, index):
    def bench():
        tuner.configs_timings = {c: [float(i + 1), 0.0, 0.0] for i, c in enumerate(tuner.configs)}
        tuner.cache[key] = tuner.configs[index]

    return bench


def _no_bench():
    raise AssertionError("timed a key whose pick was stored")


def test_a_pick_made_in_one_process_is_taken_by_the_next_without_timing():
    first, second, key = _tuner(), _tuner(), (100, "torch.float32")
    assert first.check_disk_cache(key, first.configs, _bench_picking(first, key, 2)) is False
    assert second.check_disk_cache(key, second.configs, _no_bench) is True
    assert second.cache[key] is second.configs[2]  # its own Config object, so its own pre-hook runs
    assert second.configs_timings[second.configs[0]] == [1.0, 0.0, 0.0]


def test_picks_are_per_key_and_per_pruned_list():
    first, key = _tuner(), (100, "torch.float32")
    first.check_disk_cache(key, first.configs, _bench_picking(first, key, 1))
    other = _tuner()
    for k, configs in (((200, "torch.float32"), other.configs), (key, other.configs[:2])):
        # a new key, and the same key over other configs: both timed
        assert other.check_disk_cache(k, configs, _bench_picking(other, k, 0)) is False


def test_kernel_source_is_in_the_key():
    tuner, key = _tuner(), (100, "torch.float32")
    parts = tuner.store_key(key, tuner.configs)
    assert tuner.fn.cache_key in parts and str(key) in parts and str(tuner.configs[1]) in parts


def test_a_process_reaching_a_key_being_timed_waits_for_its_pick(cache_dir):
    tuner, key = _tuner(), (100, "torch.float32")
    store_key = tuner.store_key(key, tuner.configs)
    started = cache_dir / "started"
    child = textwrap.dedent(f"""
        import sys, time, triton
        from pathlib import Path
        from kernels import autotune as at
        configs = [triton.Config({{"BK": bk}}, num_warps=w, num_stages=3) for bk, w in ((32, 4), (64, 4), (64, 8))]
        store = at.PickStore(sys.argv[1])
        with at.locked(store.lock_path):
            Path({str(started)!r}).touch()
            time.sleep(1.0)  # timing the configs
            store.save(configs, configs[1], {{c: [1.0, 0.0, 0.0] for c in configs}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", child, store_key], cwd=ROOT, env=dict(os.environ))
    deadline = time.monotonic() + 60
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the child never took the lock"
        time.sleep(0.05)
    assert tuner.check_disk_cache(key, tuner.configs, _no_bench) is True
    assert tuner.cache[key] is tuner.configs[1]
    assert proc.wait(timeout=60) == 0


def test_a_stored_pick_over_other_configs_is_ignored(cache_dir):
    tuner, key = _tuner(), (100, "torch.float32")
    store = at.PickStore(tuner.store_key(key, tuner.configs))
    store.save(tuner.configs, tuner.configs[0], {})
    path = Path(store.cache.get_file(at.PICK_FILE))
    data = json.loads(path.read_text())
    data["configs"][0] = "BK: 16, num_warps: 2"
    path.write_text(json.dumps(data))
    assert store.load(tuner.configs) is None


def test_configs_are_timed_under_the_gpu_lock_after_a_first_call_outside_it(cache_dir, monkeypatch):
    lock = cache_dir / "timing.lock"
    monkeypatch.setattr(at, "_timing_lock", lambda: str(lock))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    events = []

    def held() -> bool:
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    def benchmarker(fn, quantiles, warmup, rep):
        events.append(("bench", held()))
        fn()
        return [0.5, 0.4, 0.6]

    monkeypatch.setattr(at, "_benchmarker", lambda: benchmarker)
    call = lambda: events.append(("call", lock.exists() and held()))
    assert at.timed(call, (0.5, 0.2, 0.8)) == [0.5, 0.4, 0.6]
    assert events == [("call", False), ("bench", True), ("call", True)]
    assert not held()
