"""tools/gpu_monitor.py: parsing nvidia-smi's samples, and the sampler driven by a fake nvidia-smi."""

import stat
import sys
import time

from tools.gpu_monitor import FIELDS, OLD_REASONS, REASONS, GpuMonitor, reasons, summarize

FAKE = """#!{python}
import sys, time
query = next(a for a in sys.argv if a.startswith("--query-gpu=")).split("=", 1)[1].split(",")
if "{reject}" and "{reject}" in query:
    print("Field \\"{reject}\\" is not a valid field to query.", file=sys.stderr)
    sys.exit(2)
rows = [("1980", "2619", "402.5", "45", "0x0"), ("1755", "2619", "699.9", "61", "0x4"),
        ("1785", "2619", "700.1", "62", "0x4")]
loop = any(a.startswith("--loop-ms=") for a in sys.argv)
for i in range(len(rows) if loop else 1):
    print(", ".join(rows[i][:len(query)]), flush=True)
if loop:
    time.sleep(60)  # nvidia-smi samples until it is terminated
"""


def fake_smi(tmp_path, reject=""):
    path = tmp_path / "nvidia-smi"
    path.write_text(FAKE.format(python=sys.executable, reject=reject))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_reasons_names_the_bits():
    assert reasons(0) == [] and reasons(0x4) == ["sw_power_cap"]
    assert reasons(0x4 | 0x40 | 0x1000) == ["sw_power_cap", "hw_thermal", "0x1000"]


def test_summarize_takes_median_and_percentiles_and_skips_junk():
    fields = ("clocks.sm", "power.draw", REASONS)
    lines = ["clocks.sm, power.draw, reasons", "1000, 300, 0x0", "[N/A], 1, 0x0", "2000, 500, 0x4", "3000, 700, 0x4",
             "30"]  # a header, a missing value and a cut-off line: skipped
    out = summarize(lines, fields)
    assert out["samples"] == 3
    assert out["clocks.sm"]["median"] == 2000 and out["power.draw"]["median"] == 500
    assert out["clocks.sm"]["p10"] < 2000 < out["clocks.sm"]["p90"]
    assert out["clock_event_reasons"] == {"none": 1, "sw_power_cap": 2}
    assert summarize(["junk"], fields) is None


def test_monitor_samples_until_the_block_ends(tmp_path):
    with GpuMonitor(exe=fake_smi(tmp_path), interval_ms=10) as mon:
        deadline = time.time() + 20
        while mon._out.tell() == 0 and time.time() < deadline:  # the fake prints its samples at once
            time.sleep(0.05)
        time.sleep(0.2)
    assert mon._proc.poll() is not None  # terminated, not left running
    out = mon.summary()
    assert mon.fields == FIELDS + (REASONS,)
    assert out["samples"] == 3 and out["clocks.sm"]["median"] == 1785 and out["power.draw"]["median"] == 699.9
    assert out["clock_event_reasons"] == {"none": 1, "sw_power_cap": 2}


def test_monitor_falls_back_to_the_old_reasons_field_and_to_nothing(tmp_path):
    with GpuMonitor(exe=fake_smi(tmp_path, reject=REASONS), interval_ms=10) as mon:
        pass
    assert mon.fields == FIELDS + (OLD_REASONS,)
    with GpuMonitor(exe="", interval_ms=10) as none:  # no nvidia-smi (CPU machines): nothing sampled
        pass
    assert none.summary() is None
    with GpuMonitor(exe=str(tmp_path / "missing"), interval_ms=10) as broken:
        pass
    assert broken.summary() is None
