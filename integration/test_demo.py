"""README command one: the narrated demo runs to the end on real servers and cleans up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_every_step_and_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for backend in ("consul", "etcd"):
        assert f"== {backend}: dev server" in out
    for step in ("registered", "withdrawn after", "back after", "re-registered", "deregistered"):
        assert out.count(step) >= 2, step
    assert "agent exited with 0" in out
    assert out.rstrip().endswith("done: every process this demo started is stopped.")
