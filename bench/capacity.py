"""Capacity: one agent process holding N registrations (TTL 10 s), beside the raw floor.

``python -m bench.capacity [--counts 1000,10000] [--backend consul,etcd]
[--repeats 3] [--window 30] [--profile]`` runs on its own; ``python -m bench``
runs it with the other families.

For each backend and count, on a fresh real server of its own, in turn:

- **ours**: ``python -m registry_agent run -c <file>`` with N ``[[service]]``
  (TTL 10 s, no checks). Time from the agent's start until the registry holds
  N passing entries; then, after a short settle, a steady window: the agent's
  CPU (% of one core, every thread) and RSS, the server's CPU; then the server
  is restarted with its data wiped, and the time from the moment it accepts
  connections again until all N are passing once more.
- **floor**: ``python -m bench.capacity_floor``, the raw client doing the
  minimum (see there), measured the same way on a server of its own.

"Passing" is read from the registry itself: etcd keys under
``/services/cap/`` whose value says ``"status": "passing"``; Consul services
``cap`` whose checks (``/v1/health/checks/cap``) are all passing.

``--profile`` runs the agent under cProfile (``bench.profiled_agent``) and
prints where its time goes in each phase: start -> all passing, the steady
window, wipe -> all back; its figures are inflated by the profiler.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pstats
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.capacity_floor import PREFIX, SERVICE
from bench.common import BACKENDS, Row, log, table
from registry_agent.testing.servers import ConsulServer, EtcdServer, ServerProcess

TTL = 10
SETTLE = 5.0
TICKS = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent


# -- process figures from /proc ---------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def memory_mb(pid: int, field_name: str = "VmRSS") -> float:
    """``VmRSS`` (or ``VmHWM``, the peak) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- what the registry holds --------------------------------------------------


def _fetch(url: str, body: object | None = None) -> object:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=30) as response:  # loopback only
        return json.loads(response.read() or b"null")


def passing(srv: ServerProcess) -> int | None:
    """How many ``cap`` entries the registry holds as passing now (None: the read failed)."""
    try:
        if isinstance(srv, EtcdServer):
            key = PREFIX.encode()
            end = key[:-1] + bytes([key[-1] + 1])
            reply = _fetch(
                f"{srv.client_url}/v3/kv/range",
                {
                    "key": base64.b64encode(key).decode(),
                    "range_end": base64.b64encode(end).decode(),
                },
            )
            assert isinstance(reply, dict)
            return sum(
                bool(json.loads(base64.b64decode(kv["value"])).get("status") == "passing")
                for kv in reply.get("kvs") or ()
            )
        assert isinstance(srv, ConsulServer)
        checks = _fetch(f"{srv.http}/v1/health/checks/{SERVICE}")
        assert isinstance(checks, list)
        ok: dict[str, bool] = {}
        for check in checks:
            sid = check["ServiceID"]
            ok[sid] = ok.get(sid, True) and check["Status"] == "passing"
        return sum(ok.values())
    except (OSError, ValueError, urllib.error.URLError):
        return None


def _counted(srv: ServerProcess) -> str:
    got = passing(srv)
    return "unknown (the read failed)" if got is None else str(got)


def wait_passing(
    srv: ServerProcess, count: int, timeout: float, alive: Callable[[], bool]
) -> float | None:
    """time.monotonic() when a read saw all ``count`` passing, or None after ``timeout``.

    Reads of 10,000 entries cost the server too: the pause between reads is
    twice the last read (at least 0.1 s), so polling takes at most a third of
    the time, and the figure is late by at most one pause and one read.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        before = time.monotonic()
        if (passing(srv) or 0) >= count:
            return time.monotonic()
        time.sleep(max(0.1, 2 * (time.monotonic() - before)))
    return None


def client_port(srv: ServerProcess) -> int:
    return srv.client_port if isinstance(srv, EtcdServer) else srv.http_port  # type: ignore[attr-defined]


def wait_accepting(srv: ServerProcess, timeout: float = 30.0) -> float:
    """time.monotonic() when the server's client port first accepts a connection."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((srv.host, client_port(srv)), timeout=0.5):
                return time.monotonic()
        except OSError:
            time.sleep(0.005)
    raise RuntimeError(f"{srv.name} did not accept connections within {timeout}s")


def wait_ready(srv: ServerProcess, timeout: float = 30.0) -> float:
    """time.monotonic() when the server says it is ready (etcd /health; Consul leader, node)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if srv.ready():
                return time.monotonic()
        except (OSError, ValueError, KeyError, urllib.error.URLError):
            pass
        time.sleep(0.01)
    raise RuntimeError(f"{srv.name} not ready within {timeout}s")


def make_server(kind: str) -> ServerProcess:
    return ConsulServer() if kind == "consul" else EtcdServer()


# -- one measurement ------------------------------------------------------------


@dataclass
class Sample:
    """One run of ours or the floor for one backend and count."""

    kind: str
    count: int
    who: str  # "ours" or "floor"
    register: float | None = None  # process start -> N passing
    cpu: float | None = None  # fraction of one core over the window
    rss: float | None = None  # MB at the end of the window
    peak_rss: float | None = None  # MB (VmHWM)
    server_cpu: float | None = None
    wipe: float | None = None  # ours: accepting -> N passing; floor: raw registration time
    server_ready: float | None = None  # after a wipe: accepting -> the server says ready
    held: bool = False  # all N still passing at the end of the window
    load: str = ""
    notes: list[str] = field(default_factory=list)


def _config(url: str, count: int, status_port: int) -> str:
    services = "".join(
        f'[[service]]\nname = "{SERVICE}"\nid = "{SERVICE}-{i}"\naddress = "127.0.0.1"\n'
        f'port = {10000 + i}\nttl = "{TTL}s"\n\n'
        for i in range(count)
    )
    return f'[backend]\nurl = "{url}"\n\n[status]\nlisten = "127.0.0.1:{status_port}"\n\n{services}'


def _window(sample: Sample, srv: ServerProcess, pid: int, window: float) -> None:
    assert srv.pid is not None
    cpu0, server0, t0 = cpu_seconds(pid), cpu_seconds(srv.pid), time.monotonic()
    time.sleep(window)
    cpu1, server1, t1 = cpu_seconds(pid), cpu_seconds(srv.pid), time.monotonic()
    sample.cpu = (cpu1 - cpu0) / (t1 - t0)
    sample.server_cpu = (server1 - server0) / (t1 - t0)
    sample.rss = memory_mb(pid)
    sample.peak_rss = memory_mb(pid, "VmHWM")
    sample.held = (passing(srv) or 0) >= sample.count


def _stop(proc: subprocess.Popen[bytes], sample: Sample, timeout: float = 60.0) -> None:
    if proc.poll() is not None:
        sample.notes.append(f"exited early ({proc.returncode})")
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        sample.notes.append(f"no exit {timeout:g}s after SIGTERM: killed")
        proc.kill()
        proc.wait(10)


#: Seconds to wait for all N to be passing (at start, after the wipe); ``--register-timeout``.
REGISTER_TIMEOUT: dict[str, float] = {}
AGENT_LOG_LEVEL = ["warning"]


def register_timeout(count: int) -> float:
    return REGISTER_TIMEOUT.get("value", max(120.0, count * 0.06))


def export_revision(rev: str, into: Path) -> Path:
    """The agent's code (registry_agent, backends) as committed at ``rev``, unpacked in ``into``.

    The checkout may hold someone's half-made edits; a measurement of a
    revision runs exactly what was committed.
    """
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, "registry_agent", "backends"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise SystemExit(f"--rev: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    imports = "import registry_agent._cli, registry_agent_consul, registry_agent_etcd"
    tried = subprocess.run(
        [sys.executable, "-c", imports], cwd=into, env=agent_env(into), capture_output=True
    )
    if tried.returncode != 0:
        last = tried.stderr.decode(errors="replace").strip().splitlines()[-1:]
        raise SystemExit(f"--rev {rev}: the agent does not import: {' '.join(last)}")
    return into


def agent_env(source: Path | None) -> dict[str, str] | None:
    """The agent's environment: ``source`` (an exported revision) ahead of the checkout."""
    if source is None:
        return None
    paths = [str(source), str(source / "backends"), str(ROOT)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def measure_ours(
    kind: str,
    count: int,
    window: float,
    workdir: Path,
    profile: Path | None = None,
    source: Path | None = None,
) -> Sample:
    """The agent holding ``count`` registrations on a fresh server of ``kind``."""
    sample = Sample(kind, count, "ours", load=load_average())
    config = workdir / f"cap-{kind}-{count}.toml"
    srv = make_server(kind)
    srv.start()
    # Port 0: the kernel's choice, never one someone else grabbed meanwhile.
    config.write_text(_config(srv.url, count, 0))
    log_path = workdir / f"cap-{kind}-{count}-{int(time.time())}.log"
    command = [sys.executable, "-m", "registry_agent"]
    if profile is not None:
        command = [sys.executable, "-m", "bench.profiled_agent", str(profile)]
    command += ["run", "-c", str(config), "--log-level", AGENT_LOG_LEVEL[0]]
    try:
        with open(log_path, "wb") as agent_log:
            started = time.monotonic()
            agent = subprocess.Popen(
                command,
                stdout=agent_log,
                stderr=subprocess.STDOUT,
                cwd=source or ROOT,
                env=agent_env(source),
            )
            try:

                def alive() -> bool:
                    return agent.poll() is None

                def phase(sig: signal.Signals) -> None:
                    # Profiles: start -> all passing, the window, wipe -> all back.
                    if profile is not None and alive():
                        agent.send_signal(sig)

                done = wait_passing(srv, count, register_timeout(count), alive)
                phase(signal.SIGUSR2)
                if done is None:
                    sample.notes.append(
                        f"{_counted(srv)} of {count} passing after {register_timeout(count):g}s"
                    )
                else:
                    sample.register = done - started
                time.sleep(SETTLE)
                phase(signal.SIGUSR1)
                if alive():
                    _window(sample, srv, agent.pid, window)
                phase(signal.SIGUSR2)
                if not sample.held:
                    sample.notes.append("not all passing at the end of the window")
                if done is not None and alive():
                    srv.stop()
                    phase(signal.SIGUSR1)
                    srv.wipe_data()
                    srv.spawn()
                    accepting = wait_accepting(srv)
                    sample.server_ready = wait_ready(srv) - accepting
                    back = wait_passing(srv, count, register_timeout(count), alive)
                    phase(signal.SIGUSR2)
                    if back is None:
                        sample.notes.append(
                            f"{_counted(srv)} of {count} back {register_timeout(count):g}s "
                            "after the wipe"
                        )
                    else:
                        sample.wipe = back - accepting
            finally:
                _stop(agent, sample)
        if agent.returncode not in (0, None) or sample.notes:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            if tail:
                sample.notes.append("log: " + " / ".join(tail)[:300])
    finally:
        srv.close()
    return sample


def measure_floor(kind: str, count: int, window: float) -> Sample:
    """The raw floor client holding ``count`` entries on a fresh server of ``kind``."""
    sample = Sample(kind, count, "floor", load=load_average())
    srv = make_server(kind)
    srv.start()
    try:
        started = time.monotonic()
        floor = subprocess.Popen(
            [sys.executable, "-m", "bench.capacity_floor", kind, srv.url, str(count), str(TTL)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        try:
            assert floor.stdout is not None
            readable, _, _ = select.select([floor.stdout], [], [], register_timeout(count))
            if not readable:
                sample.notes.append(
                    f"floor: {_counted(srv)} of {count} passing after {register_timeout(count):g}s"
                )
                return sample
            line = floor.stdout.readline().decode().split()
            if line[:1] != ["registered"]:
                _stop(floor, sample)
                assert floor.stderr is not None
                why = floor.stderr.read().decode(errors="replace").strip().splitlines()[-1:]
                sample.notes.append(f"floor failed: {' '.join(why)[:300]}")
                return sample
            sample.wipe = float(line[1])
            done = wait_passing(srv, count, register_timeout(count), lambda: floor.poll() is None)
            if done is not None:
                sample.register = done - started
            else:
                sample.notes.append(f"{_counted(srv)} of {count} passing")
            time.sleep(SETTLE)
            _window(sample, srv, floor.pid, window)
        finally:
            _stop(floor, sample)
    finally:
        srv.close()
    return sample


# -- tables ---------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One line of the capacity table: how to read a sample, and the goal for a count."""

    label: str
    unit: str
    read: Callable[[Sample], float | None]
    goal: Callable[[str, int], tuple[str, float | None]]  # (text, bound) per backend, count


def _no_goal(_kind: str, _count: int) -> tuple[str, float | None]:
    return "—", None


FIGURES = (
    Figure("time to register all", "s", lambda s: s.register, _no_goal),
    Figure(
        "agent CPU (one core)",
        "%",
        lambda s: s.cpu,
        lambda _k, n: ("< 2 %", 0.02) if n <= 1000 else ("< 10 %", 0.10),
    ),
    Figure(
        "agent RSS",
        "MB",
        lambda s: s.rss,
        lambda _k, n: ("< 100 MB", 100.0) if n <= 1000 else ("< 400 MB", 400.0),
    ),
    Figure(
        "server CPU (one core)",
        "%",
        lambda s: s.server_cpu,
        lambda k, n: ("< 5 %", 0.05) if k == "consul" and n <= 1000 else ("—", None),
    ),
    Figure("wipe → all back", "s", lambda s: s.wipe, lambda _k, _n: ("≤ 5 s", 5.0)),
)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "not reached"
    if unit == "%":
        return f"{value * 100:.2f} %"
    if unit == "MB":
        return f"{value:.0f} MB"
    return f"{value:.2f} s"


def _median_worst(values: Sequence[float | None], unit: str) -> tuple[str, str]:
    got = [v for v in values if v is not None]
    if not values:
        return "-", "-"
    median = _fmt(statistics.median(got), unit) if got else "not reached"
    worst = _fmt(max(got), unit) if len(got) == len(values) else "not reached"
    return median, worst


def summary(samples: Sequence[Sample]) -> list[list[str]]:
    """Rows: figure, backend, N, goal, ours median / worst, floor median / worst, met."""
    rows = []
    keys = sorted({(s.kind, s.count) for s in samples})
    for kind, count in keys:
        for fig in FIGURES:
            ours = [
                fig.read(s) for s in samples if (s.kind, s.count, s.who) == (kind, count, "ours")
            ]
            floor = [
                fig.read(s) for s in samples if (s.kind, s.count, s.who) == (kind, count, "floor")
            ]
            goal, bound = fig.goal(kind, count)
            met = ""
            if bound is not None and ours:
                fine = [v is not None and v <= bound for v in ours]
                med = [v for v in ours if v is not None]
                met = (
                    "yes"
                    if all(fine)
                    else "median only"
                    if med and len(med) == len(ours) and statistics.median(med) <= bound
                    else "NO"
                )
            floor_cells = _median_worst(floor, fig.unit)
            if fig.label.startswith("wipe") and floor:
                floor_cells = tuple(f"{c} (raw puts)" for c in floor_cells)  # type: ignore[assignment]
            rows.append(
                [
                    fig.label,
                    kind,
                    str(count),
                    goal,
                    *_median_worst(ours, fig.unit),
                    *floor_cells,
                    met,
                ]
            )
    return rows


SUMMARY_HEADER = [
    "figure",
    "backend",
    "N",
    "goal",
    "ours median",
    "ours worst",
    "floor median",
    "floor worst",
    "met",
]

DETAIL_HEADER = [
    "run",
    "backend",
    "N",
    "who",
    "register all",
    "CPU",
    "RSS (peak)",
    "server CPU",
    "wipe → back",
    "held",
    "load 1/5/15 min",
    "notes",
]


def details(samples: Sequence[Sample], runs: Sequence[int]) -> list[list[str]]:
    return [
        [
            str(run),
            s.kind,
            str(s.count),
            s.who,
            _fmt(s.register, "s"),
            _fmt(s.cpu, "%"),
            f"{_fmt(s.rss, 'MB')} ({_fmt(s.peak_rss, 'MB')})",
            _fmt(s.server_cpu, "%"),
            _fmt(s.wipe, "s")
            + (" (raw puts)" if s.who == "floor" else "")
            + (f" (server ready +{s.server_ready:.2f} s)" if s.server_ready is not None else ""),
            "yes" if s.held else "NO",
            s.load,
            "; ".join(s.notes),
        ]
        for s, run in zip(samples, runs, strict=True)
    ]


PHASES = ("agent start -> all passing", "steady window", "server wiped -> all back")


def print_profile(path: Path, title: str, top: int = 25) -> None:
    """Where the agent's time went in the window: functions by own time, and by file."""
    stats = pstats.Stats(str(path))
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in entries.values()) or 1.0
    by_func = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    print(f"\n### Profile, {title}: {total:.2f} s of CPU in the loop thread ({path.name})\n")
    print(
        table(
            [
                [f"{Path(f).name}:{line}:{name}", f"{v[2] / total * 100:.1f} %", f"{v[3]:.2f} s"]
                for (f, line, name), v in by_func
            ],
            ["function (own time)", "share", "cumulative"],
        )
    )
    ours = [
        (key, v)
        for key, v in entries.items()
        if "/registry_agent" in key[0] and "/bench/" not in key[0] and not key[2].startswith("<")
    ]
    print()
    print(
        table(
            [
                [
                    f"{'/'.join(Path(f).parts[-2:])}:{line}:{name}",
                    f"{v[3] / total * 100:.1f} %",
                    f"{v[1]}",
                ]
                for (f, line, name), v in sorted(ours, key=lambda kv: kv[1][3], reverse=True)[:top]
            ],
            ["our function (cumulative, callees included)", "share", "calls"],
        )
    )
    by_file: dict[str, float] = {}
    for (f, _line, _name), v in entries.items():
        parts = Path(f).parts
        short = "/".join(parts[-2:]) if len(parts) > 1 else f
        by_file[short] = by_file.get(short, 0.0) + v[2]
    print()
    print(
        table(
            [
                [name, f"{t / total * 100:.1f} %"]
                for name, t in sorted(by_file.items(), key=lambda kv: kv[1], reverse=True)[:top]
            ],
            ["file (own time)", "share"],
        )
    )


# -- entry points -----------------------------------------------------------------


def measure_all(
    kinds: Sequence[str],
    counts: Sequence[int],
    repeats: int,
    window: float,
    profile: bool = False,
    rev: str | None = None,
    keep: Path | None = None,
) -> tuple[list[Sample], list[int]]:
    samples: list[Sample] = []
    runs: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        logs = keep or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        source = export_revision(rev, Path(tmp) / "src") if rev else None
        for run in range(1, repeats + 1):
            for kind in kinds:
                for count in counts:
                    log(f"capacity run {run}/{repeats}: {kind}, {count} registrations, floor")
                    samples.append(measure_floor(kind, count, window))
                    runs.append(run)
                    log(f"capacity run {run}/{repeats}: {kind}, {count} registrations, ours")
                    prof = logs / f"agent-{kind}-{count}-{run}.prof" if profile else None
                    samples.append(measure_ours(kind, count, window, logs, prof, source))
                    runs.append(run)
                    if prof is not None:
                        time.sleep(0.5)  # the last phase's stats are written by now
                        for n, what in enumerate(PHASES, 1):
                            got = prof.with_name(f"{prof.name}.{n}")
                            if got.exists():
                                print_profile(got, f"{kind}, {count}: {what}")
    return samples, runs


def run(quick: bool = False) -> tuple[list[Row], list[list[str]]]:
    """For ``python -m bench``: the figure rows (ours) and the capacity table.

    Full: 1,000 registrations three times, 10,000 once (Consul alone needs
    minutes to take 10,000 registrations); quick: 100 and 1,000 once.
    """
    if quick:
        counts: tuple[int, ...] = (100, 1000)
        samples, _runs = measure_all(BACKENDS, counts, 1, 10.0)
    else:
        counts = (1000, 10000)
        samples, _runs = measure_all(BACKENDS, counts[:1], 3, 30.0)
        samples += measure_all(BACKENDS, counts[1:], 1, 30.0)[0]
    rows = []
    for kind in BACKENDS:
        for count in counts:
            ours = [s for s in samples if (s.kind, s.count, s.who) == (kind, count, "ours")]
            for fig in FIGURES[1:]:
                goal, bound = fig.goal(kind, count)
                values = [fig.read(s) for s in ours]
                got = [v for v in values if v is not None]
                if bound is None:
                    continue
                rows.append(
                    Row(
                        f"capacity: {count} registrations, {fig.label}",
                        kind,
                        got,
                        goal,
                        len(got) == len(values) and all(v <= bound for v in got),
                        unit=fig.unit,
                        note="" if len(got) == len(values) else "not reached in a run",
                    )
                )
    return rows, summary(samples)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__)
    parser.add_argument("--counts", default="1000,10000", help="registrations, comma-separated")
    parser.add_argument("--backend", default=",".join(BACKENDS), help="consul, etcd or both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=float, default=30.0, help="steady window, seconds")
    parser.add_argument("--profile", action="store_true", help="cProfile the agent, phase by phase")
    parser.add_argument(
        "--register-timeout",
        type=float,
        help="seconds to wait for all N passing (default: 0.06 s per registration, >= 120)",
    )
    parser.add_argument(
        "--keep", type=Path, help="keep the agents' configs, logs and profiles in this folder"
    )
    parser.add_argument(
        "--log-level", default="warning", help="the agent's --log-level (default warning)"
    )
    parser.add_argument(
        "--rev", help="run the agent as committed at this git revision (default: the checkout)"
    )
    args = parser.parse_args(argv)
    try:
        counts = [int(c) for c in args.counts.split(",")]
    except ValueError:
        parser.error(f"--counts: expected numbers like 1000,10000, got {args.counts!r}")
    kinds = args.backend.split(",")
    if bad := [k for k in kinds if k not in BACKENDS]:
        parser.error(f"--backend: expected consul or etcd, got {', '.join(bad)}")
    if args.repeats < 1 or args.window <= 0 or any(c < 1 for c in counts):
        parser.error("--repeats, --window and --counts must be positive")
    if args.register_timeout is not None:
        if args.register_timeout <= 0:
            parser.error("--register-timeout must be positive")
        REGISTER_TIMEOUT["value"] = args.register_timeout
    started = time.monotonic()
    print(f"# capacity: one agent process, TTL {TTL} s, no checks\n")
    print(f"window {args.window:g} s after a {SETTLE:g} s settle; load before: {load_average()}")
    print(f"{os.cpu_count()} cores\n")
    if args.rev:
        described = subprocess.run(
            ["git", "log", "-1", "--format=%h %s", args.rev], cwd=ROOT, capture_output=True
        ).stdout.decode()[:120]
        print(f"agent code as committed at {described.strip() or args.rev}\n")
    AGENT_LOG_LEVEL[0] = args.log_level
    samples, runs = measure_all(
        kinds, counts, args.repeats, args.window, args.profile, args.rev, args.keep
    )
    if args.profile:
        print("\n(profiled run: the agent's CPU figures include the profiler's cost)\n")
    print(f"\n## Summary ({args.repeats} runs: median and worst)\n")
    print(table(summary(samples), SUMMARY_HEADER))
    print("\n## Every run\n")
    print(table(details(samples, runs), DETAIL_HEADER))
    print(f"\nload after: {load_average()}; total time: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
