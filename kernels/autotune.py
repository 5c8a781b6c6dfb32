"""`triton.autotune` whose picks outlive the process, and whose timing runs have the GPU to themselves.

Triton's own disk cache of autotune results (`cache_results`) skips every kernel whose configs carry a pre-hook,
and the block-sparse kernels' hooks set their TMA descriptors' boxes. So each process timed every config again at
its first call of each shape: 8.5 s in the first block-sparse step of a GPT-2 block-MST run on an H200, after the
prewarm children had timed the very same configs (`results/raw/h200-mst-block-wholerun-s31-6000-prewarm.json`).
Here a pick is stored as the config's index in the pruned list (a hook is code; an index is not), in Triton's
cache, under what Triton keys its own results by: its version and backend, the kernel's source, the environment
that invalidates compiled kernels, the tuning key and the pruned configs.

Two locks make the picks shared between the processes of a machine (prewarm children, DDP ranks, the run):
- one per tuning key, held while that key is timed: a second process to reach the key waits and takes the first
  one's pick. The run takes its children's picks instead of timing them again, and every DDP rank runs the same
  config, so the same rounding.
- one per GPU, held only while a config is being timed: processes compile their configs in parallel but time them
  one at a time, so no timing includes another process's kernels.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator

import torch
from triton import knobs
from triton.runtime.autotuner import Autotuner, Config
from triton.runtime.cache import get_cache_manager, triton_key
from triton.runtime.jit import JITFunction

from kernels import AUTOTUNE

PICK_FILE = "pick.json"
# Triton's default timing is 25 ms of warm-up and 100 ms of runs a config; these kernels take 0.05-1 ms, so 25 ms
# is still hundreds of runs, and tuning a layer's three kernels costs a quarter of the time.
TIMING_WARMUP_MS, TIMING_REP_MS = 5, 25


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """An exclusive advisory lock on `path` (made if missing) for the block; the OS drops it if the process dies."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class PickStore:
    """One tuning key's pick in Triton's cache directory, with the lock that orders the processes timing it."""

    def __init__(self, key: str):
        self.cache = get_cache_manager(hashlib.sha256(key.encode()).hexdigest())
        self.lock_path = os.path.join(self.cache.cache_dir, "pick.lock")

    def load(self, configs: list[Config]) -> tuple[Config, dict] | None:
        """The stored pick among `configs` and every config's timings, or None if none is stored."""
        path = self.cache.get_file(PICK_FILE)
        if path is None:
            return None
        with open(path) as f:
            data = json.load(f)
        if data["configs"] != [str(c) for c in configs]:  # a hash collision, or a file from elsewhere
            return None
        timings = {configs[i]: t for i, t in enumerate(data["timings"])}
        return configs[data["best"]], timings

    def save(self, configs: list[Config], best: Config, timings: dict) -> None:
        data = {"configs": [str(c) for c in configs], "best": configs.index(best),
                "timings": [timings.get(c) for c in configs]}  # fmt: skip
        self.cache.put(json.dumps(data), PICK_FILE, binary=False)  # Triton's put: a rename, so never half-read


def _target_hash() -> str:
    from triton.compiler.compiler import make_backend
    from triton.runtime.driver import driver

    return make_backend(driver.active.get_current_target()).hash()


def _env() -> str:
    from triton._C.libtriton import get_cache_invalidating_env_vars

    return str(sorted(get_cache_invalidating_env_vars().items()))


class PersistentAutotuner(Autotuner):
    """Triton's Autotuner with the disk cache above: Triton asks `check_disk_cache` at each key new to the process."""

    def store_key(self, tuning_key: tuple, configs: list[Config]) -> str:
        fn = self.fn
        while not isinstance(fn, JITFunction):  # through heuristics wrappers
            fn = fn.fn
        parts = [triton_key(), _target_hash(), fn.cache_key, _env(), str(tuning_key)]
        return "-".join([*parts, *(str(c) for c in configs)])

    def check_disk_cache(self, tuning_key: tuple, configs: list[Config], bench_fn: Callable[[], None]) -> bool:
        store = PickStore(self.store_key(tuning_key, configs))
        with locked(store.lock_path):
            stored = store.load(configs)
            if stored is None:
                bench_fn()  # sets self.cache[tuning_key] and self.configs_timings
                store.save(configs, self.cache[tuning_key], self.configs_timings)
                AUTOTUNE["timed"] += 1
                return False
        self.cache[tuning_key], self.configs_timings = stored
        AUTOTUNE["from_disk"] += 1
        return True


def _timing_lock() -> str:
    uuid = torch.cuda.get_device_properties(torch.cuda.current_device()).uuid
    return os.path.join(knobs.cache.dir, f"timing-{uuid}.lock")


def _benchmarker() -> Callable:
    from triton.runtime.driver import driver

    return driver.active.get_benchmarker()


def timed(kernel_call: Callable[[], None], quantiles: tuple[float, ...]):
    """Triton's benchmark of one config, its first call (where the config compiles) outside the GPU's lock."""
    kernel_call()
    torch.cuda.synchronize()
    with locked(_timing_lock()):
        return _benchmarker()(kernel_call, quantiles=quantiles, warmup=TIMING_WARMUP_MS, rep=TIMING_REP_MS)


def autotune(
    configs: list[Config], key: list[str], prune_configs_by: dict | None = None, reset_to_zero: list[str] | None = None
) -> Callable[[JITFunction], PersistentAutotuner]:
    """`triton.autotune(configs, key, ...)` with picks shared through the disk (none in the interpreter, which
    Triton never lets cache, and which has one config here anyway)."""

    def decorator(fn: JITFunction) -> PersistentAutotuner:
        return PersistentAutotuner(fn, fn.arg_names, configs, key, reset_to_zero, None,
                                   prune_configs_by=prune_configs_by, do_bench=timed, cache_results=True)  # fmt: skip

    return decorator
