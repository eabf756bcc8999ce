"""Shared pieces: statistics, tables, servers, a service process to kill."""

from __future__ import annotations

import contextlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from registry_agent.testing.servers import ConsulServer, EtcdServer, ServerProcess

HERE = Path(__file__).resolve().parent
BACKENDS = ("consul", "etcd")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Row:
    """One line of a result table."""

    figure: str
    backend: str
    samples: list[float]
    goal: str
    ok: bool
    unit: str = "s"
    note: str = ""

    def cells(self) -> list[str]:
        scale, fmt = {"ms": (1000.0, "{:.2f}"), "%": (100.0, "{:.1f}"), "MB": (1.0, "{:.0f}")}.get(
            self.unit, (1.0, "{:.3f}")
        )
        med = fmt.format(statistics.median(self.samples) * scale) if self.samples else "-"
        p95 = fmt.format(percentile(self.samples, 95) * scale) if self.samples else "-"
        return [
            self.figure,
            self.backend,
            str(len(self.samples)),
            f"{med} {self.unit}",
            f"{p95} {self.unit}",
            self.goal,
            "yes" if self.ok else "NO",
            self.note,
        ]


HEADER = ["figure", "backend", "n", "median", "p95", "goal", "met", "note"]


def table(rows: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> str:
    """A Markdown table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def log(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def server(kind: str) -> Iterator[ServerProcess]:
    """A fresh real server of ``kind`` on free loopback ports."""
    made: ServerProcess = ConsulServer() if kind == "consul" else EtcdServer()
    made.start()
    try:
        yield made
    finally:
        made.close()


def start_service_process(url: str, port: int, ttl: float) -> subprocess.Popen[str]:
    """A separate process registering itself (to kill -9); returns once registered."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "service_process.py"), url, str(port), str(ttl)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "registered":
        proc.kill()
        raise RuntimeError(f"service process failed: {proc.communicate()[1][-500:]}")
    return proc


def stop_process(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


def now() -> float:
    return time.perf_counter()


@dataclass
class TestResult:
    """One integration test case from a JUnit report: outcome and measured durations."""

    name: str
    passed: bool
    measured: list[tuple[str, float]]
    #: The failure's message when it did not pass.
    why: str = ""


def run_measured_tests(*paths: str) -> list[TestResult]:
    """Run integration test files (2 workers) and read back what each measured."""
    root = HERE.parent
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        subprocess.run(
            [
                *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2"),
                *("-o", "junit_family=xunit1", f"--junitxml={report}"),
                *(str(root / "integration" / path) for path in paths),
            ],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        tree = ET.parse(report)
    results = []
    for case in tree.iter("testcase"):
        problems = [case.find(tag) for tag in ("failure", "error", "skipped")]
        found_problem = next((p for p in problems if p is not None), None)
        passed = found_problem is None
        why = "" if found_problem is None else (found_problem.get("message") or "")[:300]
        measured = []
        for prop in case.iter("property"):
            if prop.get("name") == "measured":
                found = re.search(r"\s{2,}(\S.*?)\s+(\d+\.\d+)s \(bound", prop.get("value", ""))
                if found:
                    measured.append((found.group(1).strip(), float(found.group(2))))
        results.append(TestResult(case.get("name", ""), passed, measured, why))
    return results
