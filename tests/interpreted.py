"""Run a check script under Triton's CPU interpreter in a child process: the interpreter must be on before triton is
imported, and TRITON_INTERPRET must not reach the other tests. The script's first import is tests.triton_interp."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_interpreted(script: str, timeout: int = 120) -> None:
    """Runs `script`; it passes when it exits 0 with "ok" as the last thing it printed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
