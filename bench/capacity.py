"""Capacity: one agent process holding N registrations (TTL 10 s): CPU of one core and RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import Row, log, server
from registry_agent.testing.servers import free_port

WINDOW = 20.0
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return bool(json.loads(response.read())["ready"])
    except OSError:
        return False


def measure(url: str, count: int, workdir: Path) -> tuple[float, float, float]:
    """(seconds to register all, CPU fraction of one core, RSS MB) for ``count`` services."""
    status = free_port()
    services = "".join(
        f'[[service]]\nname = "cap"\nid = "cap-{i}"\naddress = "127.0.0.1"\nport = {10000 + i}\n'
        'ttl = "10s"\n\n'
        for i in range(count)
    )
    config = workdir / f"cap-{count}.toml"
    config.write_text(
        f'[backend]\nurl = "{url}"\n\n[status]\nlisten = "127.0.0.1:{status}"\n\n{services}'
    )
    log_file = open(workdir / f"cap-{count}.log", "wb")  # noqa: SIM115 - closed below
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "registry_agent",
            "run",
            "-c",
            str(config),
            "--log-level",
            "warning",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        started = time.monotonic()
        while not ready(status):
            if time.monotonic() - started > 120 or agent.poll() is not None:
                raise RuntimeError(
                    f"{count} services not ready: "
                    + (workdir / f"cap-{count}.log").read_text()[-2000:]
                )
            time.sleep(0.2)
        took = time.monotonic() - started
        time.sleep(3.0)  # settle: the first heartbeats and verifications spread out
        cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(WINDOW)
        cpu = (cpu_seconds(agent.pid) - cpu0) / (time.monotonic() - t0)
        return took, cpu, rss_mb(agent.pid)
    finally:
        agent.terminate()
        agent.wait(60)
        log_file.close()


def run(quick: bool = False) -> tuple[list[Row], list[list[str]]]:
    rows: list[Row] = []
    details: list[list[str]] = []
    counts = (100,) if quick else (100, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("consul", "etcd"):
            with server(kind) as srv:
                for count in counts:
                    log(f"capacity on {kind}: {count} registrations, {WINDOW:g}s window")
                    took, cpu, rss = measure(srv.url, count, Path(tmp))
                    details.append(
                        [kind, str(count), f"{took:.1f} s", f"{cpu * 100:.1f} %", f"{rss:.0f} MB"]
                    )
                    if count == 1000 or quick:
                        rows.append(
                            Row(
                                f"capacity: {count} registrations, CPU",
                                kind,
                                [cpu],
                                "< 10 % of a core",
                                cpu < 0.10,
                                unit="%",
                            )
                        )
                        rows.append(
                            Row(
                                f"capacity: {count} registrations, RSS",
                                kind,
                                [rss],
                                "< 150 MB",
                                rss < 150,
                                unit="MB",
                            )
                        )
    return rows, details
