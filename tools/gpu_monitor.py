"""Sample the GPU's clocks, power and temperature while a benchmark runs (nvidia-smi in the background).

A long run at full tensor-core load can draw the board to its power limit and lower its clocks, which a few timed
steps never see; a bench row that carries what the GPU ran at says whether two methods' times were measured at the
same clocks. Used by bench.py around each method:

    with GpuMonitor(torch.cuda.current_device()) as mon:
        ...  # the timed work
    row["gpu"] = mon.summary()   # None without nvidia-smi (CPU machines, CI)

`nvidia-smi --query-gpu ... --loop-ms=N` prints one CSV line per sample; `summary` reduces them to median / p10 /
p90 per field and counts the active clock-event (throttle) reasons as nvidia-smi names them in its hex bitmask.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
from collections import Counter
from typing import Any

FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu")
REASONS = "clocks_event_reasons.active"  # older drivers call it clocks_throttle_reasons.active
OLD_REASONS = "clocks_throttle_reasons.active"
# nvidia-smi's clock event reason bits (nvml.h, nvmlClocksEventReason*)
REASON_BITS = {0x1: "gpu_idle", 0x2: "app_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x10: "sync_boost",
               0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake", 0x100: "display_clocks"}  # fmt: skip


def reasons(mask: int) -> list[str]:
    """Names of the bits set in a clock-event reason mask (unknown bits as hex)."""
    names = [name for bit, name in REASON_BITS.items() if mask & bit]
    rest = mask & ~sum(REASON_BITS)
    return names + ([hex(rest)] if rest else [])


def summarize(lines: list[str], fields: tuple[str, ...]) -> dict[str, Any] | None:
    """Median / p10 / p90 of each numeric field over the sampled CSV lines, and how many samples had each clock
    event reason active. Lines that do not parse (a header, '[N/A]', a cut-off last line) are skipped."""
    cols: dict[str, list[float]] = {f: [] for f in fields if f not in (REASONS, OLD_REASONS)}
    why: Counter[str] = Counter()
    n = 0
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(fields):
            continue
        try:
            values = {f: (int(p, 16) if f in (REASONS, OLD_REASONS) else float(p)) for f, p in zip(fields, parts)}
        except ValueError:
            continue
        n += 1
        for f, v in values.items():
            if f in cols:
                cols[f].append(v)
            else:
                why.update(reasons(int(v)) or ["none"])
    if not n:
        return None
    out: dict[str, Any] = {"samples": n}
    for f, vs in cols.items():
        q = statistics.quantiles(vs, n=10) if len(vs) >= 2 else [vs[0]] * 9
        out[f] = {"median": statistics.median(vs), "p10": q[0], "p90": q[-1]}
    if why:
        out["clock_event_reasons"] = dict(why)
    return out


class GpuMonitor:
    """nvidia-smi sampling GPU `index` (a CUDA device index, mapped to its UUID so CUDA_VISIBLE_DEVICES cannot
    confuse the two) every `interval_ms` while the block runs. Does nothing where nvidia-smi is missing or fails."""

    def __init__(self, index: int | None = None, interval_ms: int = 500, exe: str | None = None):
        self.index, self.interval_ms = index, interval_ms
        self.exe = exe if exe is not None else shutil.which("nvidia-smi")
        self.fields: tuple[str, ...] = ()
        self._proc: subprocess.Popen | None = None
        self._out = None

    def _gpu_id(self) -> str | None:
        if self.index is None:
            return None
        import torch

        uuid = str(torch.cuda.get_device_properties(self.index).uuid)
        return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"

    def _query(self, fields: tuple[str, ...]) -> list[str]:
        cmd = [self.exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
        gpu = self._gpu_id()
        return cmd + (["-i", gpu] if gpu else [])

    def __enter__(self) -> GpuMonitor:
        if not self.exe:
            return self
        for fields in (FIELDS + (REASONS,), FIELDS + (OLD_REASONS,), FIELDS):  # the first this driver accepts
            try:
                probe = subprocess.run(self._query(fields), capture_output=True, text=True, timeout=20)
            except (OSError, subprocess.SubprocessError):
                return self
            if probe.returncode == 0 and summarize(probe.stdout.splitlines(), fields):
                self.fields = fields
                break
        else:
            return self
        self._out = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(self._query(self.fields) + [f"--loop-ms={self.interval_ms}"], stdout=self._out,
                                      stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def summary(self) -> dict[str, Any] | None:
        if self._out is None:
            return None
        self._out.seek(0)
        out = summarize(self._out.read().splitlines(), self.fields)
        self._out.close()
        self._out = None
        return out
