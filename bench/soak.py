"""Chaos soak: registrars, watchers and an agent process on Consul and etcd under random faults.

``python -m bench soak [--minutes 10] [--seed 1]`` (not part of the test suite).

It starts its own Consul (a server agent with a data folder) and etcd, puts a
:class:`~registry_agent.testing.faultproxy.FaultProxy` in front of each, and
runs against each: three registrars (one plain, one whose check flaps and is
withdrawn while failing, one kept critical while failing), a watcher through
the proxy and one direct, and a ``registry-agent run`` process (reloaded with
SIGHUP). Then, round after round, a seeded random fault hits one backend:
server restarted empty, stopped and started, frozen (SIGSTOP/SIGCONT), every
proxy mode, a check flapping, our entry deleted behind our back, the agent
reloaded with a service added or removed. After each heal the invariants are
checked: within a bound derived from the configuration, a state must begin
that holds for a TTL (an exact state that lapses sooner, e.g. a lease that
expires after the heal because a heartbeat was stuck on a dead connection, is
counted as a lapse and the wait goes on):

- the registry (read directly) holds exactly the desired entries, with the
  desired status, no duplicates in the server's own listing;
- every watcher's snapshot equals the registry;
- no etcd lease without a key;
- file descriptors, threads and asyncio tasks of this process back to their
  baseline (within a small slack);
- every error a backend raised, or a watcher reported, is a ``RegistryError``;
  the agent process is still running.

It prints the faults injected, survived, and every invariant violation.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from registry_agent_consul._http import blocking_bound

from bench.common import table
from registry_agent import (
    AsyncRegistrar,
    AsyncWatcher,
    Backend,
    CallableCheck,
    HealthStatus,
    RegistryError,
    RetryPolicy,
    ServiceInstance,
    open_backend,
)
from registry_agent.testing.fault_contract import (
    FAULTS,
    RecordedError,
    consul_ids,
    etcd_ids,
    etcd_orphan_leases,
    proxied_url,
    recording,
    target_of,
)
from registry_agent.testing.faultproxy import FaultProxy
from registry_agent.testing.servers import ConsulServer, EtcdServer, ServerProcess, free_port

_T = TypeVar("_T")

TTL = 3.0
TIMEOUT = 2.0
RETRY = RetryPolicy(initial=0.1, cap=2.0)
CHECK_INTERVAL = 0.5
CONSUL_WAIT = 5.0
ETCD_KEEPALIVE = (5.0, 2.0)
AGENT_RETRY_CAP = RetryPolicy().cap  # the agent runs with the default policy
# How long a watch may sit on a dead connection before it notices.
DEAD_CONNECTION = max(blocking_bound(CONSUL_WAIT, TIMEOUT), sum(ETCD_KEEPALIVE) + 1.0)
# After a heal: a call on a dead connection times out, the backoff sleeps its cap,
# a lost lease is found at the next heartbeat and registered again, a check
# decides within two intervals; the agent has the default (longer) backoff.
REGISTRAR_BOUND = DEAD_CONNECTION + RETRY.cap + 3 * TIMEOUT + TTL / 3 + 2 * CHECK_INTERVAL
AGENT_BOUND = TIMEOUT + AGENT_RETRY_CAP + 3 * TIMEOUT + TTL / 3
SETTLE_BOUND = max(REGISTRAR_BOUND, AGENT_BOUND) + 5.0  # slack for a busy machine
RESOURCE_BOUND = 15.0
STABLE_FOR = TTL + 0.5  # "exact" counts once it has held this long (a TTL)
FD_SLACK, THREAD_SLACK, TASK_SLACK = 16, 1, 2
PROXY_FAULTS = {f"proxy {f.name}": f for f in FAULTS}
SERVER_FAULTS = ("restart empty", "stop/start", "SIGSTOP")
OTHER_FAULTS = ("health flap", "delete entry", "agent reload")
KINDS = (*SERVER_FAULTS, *PROXY_FAULTS, *OTHER_FAULTS)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@dataclass
class Member:
    """One registrar of the soak and what its check answers."""

    instance: ServiceInstance
    on_unhealthy: str
    up: bool = True
    registrar: AsyncRegistrar | None = None

    def answer(self) -> bool:
        """The check: passes while ``up``."""
        return self.up

    def desired(self) -> HealthStatus | None:
        if self.up:
            return HealthStatus.PASSING
        return HealthStatus.CRITICAL if self.on_unhealthy == "critical" else None


class Agent:
    """A ``registry-agent run`` process with one or two services, reloaded by SIGHUP."""

    def __init__(self, workdir: Path, url: str, service: str) -> None:
        self.config = workdir / f"{service}.toml"
        self.log = workdir / f"{service}.log"
        self.url = url
        self.service = service
        self.ids = [f"{service}-1"]
        self.status_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.write()

    def write(self) -> None:
        services = "".join(
            f'[[service]]\nname = "{self.service}"\nid = "{iid}"\naddress = "127.0.0.1"\n'
            f'port = {8000 + n}\nttl = "{TTL:g}s"\n\n'
            for n, iid in enumerate(self.ids, 1)
        )
        self.config.write_text(
            f'[backend]\nurl = "{self.url}"\ntimeout = "{TIMEOUT:g}s"\n\n'
            f'[status]\nlisten = "127.0.0.1:{self.status_port}"\n\n'
            f'[log]\nlevel = "warning"\n\n{services}'
        )

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "registry_agent", "run", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def reload(self) -> str:
        second = f"{self.service}-2"
        if second in self.ids:
            self.ids.remove(second)
            what = f"removed {second}"
        else:
            self.ids.append(second)
            what = f"added {second}"
        self.write()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        return what

    def readyz(self) -> int | None:
        """The status code of the agent's /readyz (None: no answer)."""
        url = f"http://127.0.0.1:{self.status_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


class Side:
    """One backend: its server, proxy, registrars, watchers and agent."""

    def __init__(self, name: str, server: ServerProcess, workdir: Path) -> None:
        self.name = name
        self.server = server
        self.proxy = FaultProxy(*target_of(server.url))
        consul = isinstance(server, ConsulServer)
        self.options: dict[str, Any] = (
            {"wait": CONSUL_WAIT}
            if consul
            else {"keepalive_time": ETCD_KEEPALIVE[0], "keepalive_timeout": ETCD_KEEPALIVE[1]}
        )
        self.url = proxied_url(server.url, self.proxy)
        self.service = f"soak-{name}"
        self.errors: list[RecordedError] = []
        self.surfaced: list[BaseException] = []
        self.members = [
            Member(self._instance(1), "deregister"),
            Member(self._instance(2), "deregister"),
            Member(self._instance(3), "critical"),
        ]
        agent_options = f"?wait={CONSUL_WAIT:g}s" if consul else ""
        self.agent = Agent(workdir, self.url + agent_options, f"soak-agent-{name}")
        self.direct = open_backend(server.url, timeout=TIMEOUT, **self.options)
        self.watchers: list[AsyncWatcher] = []

    def _instance(self, n: int) -> ServiceInstance:
        return ServiceInstance(
            self.service,
            id=f"{self.service}-{n}",
            address="127.0.0.1",
            port=9000 + n,
            meta={"soak": "yes"},
        )

    def backend(self, *, direct: bool = False) -> Backend:
        url = self.server.url if direct else self.url
        return recording(open_backend(url, timeout=TIMEOUT, **self.options), self.errors)

    async def start(self) -> None:
        for n, member in enumerate(self.members):
            checks = []
            if n:
                checks.append(
                    CallableCheck(
                        member.answer,
                        interval=CHECK_INTERVAL,
                        timeout=1.0,
                        name=f"flap {member.instance.id}",
                    )
                )
            member.registrar = AsyncRegistrar(
                self.backend(),
                member.instance,
                ttl=TTL,
                checks=checks,
                fall=1,
                rise=1,
                on_unhealthy=member.on_unhealthy,
                retry=RETRY,
            )
            await member.registrar.start()
        for direct in (False, True):
            watcher = AsyncWatcher(
                self.backend(direct=direct),
                [self.service, self.agent.service],
                retry=RETRY,
                on_error=lambda _, exc: self.surfaced.append(exc),
            )
            await watcher.start()
            self.watchers.append(watcher)
        self.agent.start()

    async def close(self) -> list[str]:
        """Stop everything; returns what stopping left behind in the registry."""
        self.proxy.heal()
        for member in self.members:
            if member.registrar is not None:
                await member.registrar.stop()
                await member.registrar.backend.close()
        for watcher in self.watchers:
            await watcher.close()
            await watcher.backend.close()
        code = await asyncio.to_thread(self.agent.stop)
        left: list[str] = []
        if code != 0:
            left.append(f"{self.name}: agent exited with {code} on SIGTERM")
        try:
            for service in (self.service, self.agent.service):
                snapshot = await self.direct.list(service)
                if snapshot.instances:
                    left.append(
                        f"{self.name}: still registered after stop: {sorted(snapshot.instances)}"
                    )
            leases = await asyncio.to_thread(self.leases)
            if leases:
                left.append(f"{self.name}: leases alive after stop: {leases}")
        except RegistryError as exc:
            left.append(f"{self.name}: registry not readable after stop: {exc}")
        await self.direct.close()
        self.proxy.close()
        return left

    def leases(self) -> list[str]:
        if not isinstance(self.server, EtcdServer):
            return []
        return [str(lease["ID"]) for lease in self.server.api("/v3/lease/leases").get("leases", [])]

    def server_ids(self, service: str) -> list[str]:
        if isinstance(self.server, ConsulServer):
            return consul_ids(self.server, service)
        assert isinstance(self.server, EtcdServer)
        return etcd_ids(self.server, service)

    def orphans(self) -> list[str]:
        return etcd_orphan_leases(self.server) if isinstance(self.server, EtcdServer) else []

    def delete(self, iid: str, service: str) -> None:
        """Remove an entry behind its owner's back."""
        if isinstance(self.server, ConsulServer):
            self.server.api(f"/v1/agent/service/deregister/{iid}", method="PUT")
        else:
            assert isinstance(self.server, EtcdServer)
            self.server.api("/v3/kv/deleterange", {"key": _b64(f"/services/{service}/{iid}")})

    async def problems(self, run: Callable[..., Awaitable[Any]]) -> list[str]:
        """What differs from the desired state now (empty: exact)."""
        want = {
            m.instance.id: (m.instance, status)
            for m in self.members
            if (status := m.desired()) is not None
        }
        agent_want = dict.fromkeys(self.agent.ids, HealthStatus.PASSING)
        found: list[str] = []
        try:
            snapshot = await self.direct.list(self.service)
            agent_snapshot = await self.direct.list(self.agent.service)
            ids = await run(self.server_ids, self.service)
            agent_ids = await run(self.server_ids, self.agent.service)
            orphans = await run(self.orphans)
        except (RegistryError, OSError) as exc:
            return [f"{self.name}: registry not readable: {exc}"]
        held = {i: (h.instance, h.status) for i, h in snapshot.instances.items()}
        agent_held = {i: h.status for i, h in agent_snapshot.instances.items()}
        if held != want:
            found.append(f"{self.name}: registry holds {_show(held)}, want {_show(want)}")
        if sorted(ids) != sorted(want):
            found.append(f"{self.name}: the server lists {sorted(ids)}, want {sorted(want)}")
        if agent_held != agent_want:
            found.append(f"{self.name}: agent entries {agent_held}, want {agent_want}")
        if sorted(agent_ids) != sorted(agent_want):
            found.append(f"{self.name}: the server lists agent {sorted(agent_ids)}")
        for n, watcher in enumerate(self.watchers):
            kind = "direct" if n else "proxied"
            seen = {h.instance.id: (h.instance, h.status) for h in watcher.snapshot(self.service)}
            if seen != held:
                found.append(
                    f"{self.name}: {kind} watcher sees {_show(seen)}, registry {_show(held)}"
                )
            agent_seen = {h.instance.id: h.status for h in watcher.snapshot(self.agent.service)}
            if agent_seen != agent_held:
                found.append(f"{self.name}: {kind} watcher sees agent {agent_seen}")
        if orphans:
            found.append(f"{self.name}: orphan leases {orphans}")
        for member in self.members:
            assert member.registrar is not None
            view = member.registrar.status()
            want_status = member.desired()
            said = (view["registered"], view["registry_status"], view["ready"])
            expected = (
                want_status is not None,
                None if want_status is None else str(want_status),
                want_status is HealthStatus.PASSING,
            )
            if said != expected:
                found.append(
                    f"{self.name}: {member.instance.id} status() says registered/registry "
                    f"status/ready {said}, want {expected}"
                )
        readyz = await run(self.agent.readyz)
        if readyz != 200:
            found.append(f"{self.name}: agent /readyz answers {readyz}, want 200")
        return found


def _show(entries: dict[str, tuple[ServiceInstance, HealthStatus]]) -> str:
    return "{" + ", ".join(f"{i}: {s}" for i, (_, s) in sorted(entries.items())) + "}"


@dataclass
class Resources:
    fds: int
    threads: int
    tasks: int

    @classmethod
    def now(cls) -> Resources:
        return cls(
            len(os.listdir("/proc/self/fd")),
            threading.active_count(),
            len(asyncio.all_tasks()),
        )

    def within(self, base: Resources) -> bool:
        return (
            self.fds <= base.fds + FD_SLACK
            and self.threads <= base.threads + THREAD_SLACK
            and self.tasks <= base.tasks + TASK_SLACK
        )

    def __str__(self) -> str:
        return f"{self.fds} fds, {self.threads} threads, {self.tasks} tasks"


@dataclass
class Report:
    # Keyed by (backend, fault).
    injected: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    survived: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    lapses: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    settle: dict[tuple[str, str], list[float]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    violations: list[str] = field(default_factory=list)
    peak: Resources | None = None


class Soak:
    def __init__(self, minutes: float, seed: int) -> None:
        self.minutes = minutes
        self.seed = seed
        self.rng = random.Random(seed)
        self.report = Report()
        # Blocking server operations run here, not on the loop's default executor
        # (whose threads would count as a leak when it grows).
        self.pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="soak")
        self.sides: list[Side] = []
        self.errors_seen: dict[str, int] = {}
        self.surfaced_seen: dict[str, int] = {}
        self.elapsed = 0.0
        self.end: Resources | None = None

    async def run_blocking(self, func: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, func, *args)

    async def main(self) -> int:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            workdir = Path(tmp)
            consul = ConsulServer(workdir / "consul", persistent=True)
            etcd = EtcdServer(workdir / "etcd")
            try:
                await asyncio.gather(self.run_blocking(consul.start), self.run_blocking(etcd.start))
                self.sides = [Side("consul", consul, workdir), Side("etcd", etcd, workdir)]
                for side in self.sides:
                    await side.start()
                base = await self.rounds()
                ok = base is not None
                for side in self.sides:
                    left = await side.close()
                    self.report.violations += [f"at the end: {v}" for v in left]
                self.sides = []
                if base is not None:
                    self.print_summary(base)
                return 0 if ok and not self.report.violations else 1
            finally:
                for side in self.sides:
                    try:
                        await side.close()
                    except Exception as exc:  # report, and still stop the servers
                        print(f"closing {side.name} failed: {exc!r}", file=sys.stderr)
                consul.close()
                etcd.close()
                self.pool.shutdown()

    async def settle(self, within: float) -> tuple[float, list[str], list[str]]:
        """Wait for a state that is exact and stays so for :data:`STABLE_FOR`.

        Returns (seconds until that stable stretch began, the problems left when
        none began within ``within`` seconds, the problems of every time an
        exact state lapsed before holding long enough).
        """
        started = time.monotonic()
        exact_since: float | None = None
        lapses: list[str] = []
        while True:
            problems = [p for side in self.sides for p in await side.problems(self.run_blocking)]
            now = time.monotonic()
            if problems:
                if exact_since is not None:
                    lapses.append(
                        f"exact at {exact_since - started:.1f}s, lapsed at "
                        f"{now - started:.1f}s: {problems}"
                    )
                exact_since = None
                if now - started > within:
                    return now - started, problems, lapses
            else:
                if exact_since is None:
                    exact_since = now
                if now - exact_since >= STABLE_FOR:
                    return exact_since - started, [], lapses
            await asyncio.sleep(0.2)

    async def resources_back(self, base: Resources) -> Resources:
        deadline = time.monotonic() + RESOURCE_BOUND
        while True:
            current = Resources.now()
            peak = self.report.peak
            self.report.peak = Resources(
                max(current.fds, peak.fds if peak else 0),
                max(current.threads, peak.threads if peak else 0),
                max(current.tasks, peak.tasks if peak else 0),
            )
            if current.within(base) or time.monotonic() > deadline:
                return current
            await asyncio.sleep(0.5)

    async def rounds(self) -> Resources | None:
        """Fault after fault until the time is up; the resource baseline (None: never settled)."""
        loop = asyncio.get_running_loop()
        # Fill the default executor to its size now, so its threads are part of the baseline.
        await asyncio.gather(*(loop.run_in_executor(None, time.sleep, 0.2) for _ in range(32)))
        took, problems, _ = await self.settle(60.0)
        if problems:
            print("never reached the desired state at start:\n  " + "\n  ".join(problems))
            for side in self.sides:
                print(f"{side.name} agent log:\n{side.agent.log.read_text()[-2000:]}")
            return None
        await asyncio.sleep(2 * TTL)
        base = Resources.now()
        log(f"settled in {took:.1f}s; baseline {base}; settle bound {SETTLE_BOUND:.1f}s")
        started = time.monotonic()
        end = started + self.minutes * 60
        n = 0
        while time.monotonic() < end:
            n += 1
            side = self.rng.choice(self.sides)
            kind = self.rng.choice(KINDS)
            detail = await self.inject(side, kind)
            label = f"round {n} ({time.monotonic() - started:.0f}s): {side.name} {kind} {detail}"
            key = (side.name, kind)
            self.report.injected[key] += 1
            took, problems, lapses = await self.settle(SETTLE_BOUND)
            self.report.lapses[key] += len(lapses)
            for lapse in lapses:
                log(f"{label}: lapse {lapse}")
            violations = [f"{label}: not exact after {took:.1f}s: {p}" for p in problems]
            if problems:  # let it finish healing, so the next round starts clean
                late, still, _ = await self.settle(60.0)
                violations.append(
                    f"{label}: exact {late:.1f}s later"
                    if not still
                    else f"{label}: still not exact 60s later: {still}"
                )
            else:
                self.report.settle[key].append(took)
            current = await self.resources_back(base)
            if not current.within(base):
                violations.append(f"{label}: resources {current}, baseline {base}")
            violations += self.error_violations(label)
            for s in self.sides:
                if not s.agent.alive():
                    violations.append(f"{label}: {s.name} agent exited ({s.agent.log})")
            if violations:
                self.report.violations += violations
                for v in violations:
                    log("VIOLATION " + v)
            else:
                self.report.survived[key] += 1
            log(f"{label}: settled {took:.2f}s, {current}")
            await asyncio.sleep(self.rng.uniform(0.0, 1.0))
        self.elapsed = time.monotonic() - started
        self.end = Resources.now()
        return base

    def error_violations(self, label: str) -> list[str]:
        found = []
        for side in self.sides:
            new = side.errors[self.errors_seen.get(side.name, 0) :]
            self.errors_seen[side.name] = len(side.errors)
            found += [
                f"{label}: {side.name} {e.method} raised "
                f"{type(e.error).__module__}.{type(e.error).__name__}: {e.error}"
                for e in new
                if not isinstance(e.error, RegistryError)
            ]
            seen = side.surfaced[self.surfaced_seen.get(side.name, 0) :]
            self.surfaced_seen[side.name] = len(side.surfaced)
            found += [
                f"{label}: {side.name} on_error got {e!r}"
                for e in seen
                if not isinstance(e, RegistryError)
            ]
        return found

    async def inject(self, side: Side, kind: str) -> str:
        """Inject one fault and heal it; returns what was done."""
        hold = round(self.rng.uniform(1.0, 2 * TTL), 1)
        server = side.server
        if kind == "restart empty":
            await self.run_blocking(lambda: server.restart(wipe=True))
            return ""
        if kind == "stop/start":
            await self.run_blocking(server.stop)
            await asyncio.sleep(hold)
            await self.run_blocking(server.start)
            return f"{hold}s"
        if kind == "SIGSTOP":
            server.pause()
            await asyncio.sleep(hold)
            server.resume()
            return f"{hold}s"
        if kind in PROXY_FAULTS:
            PROXY_FAULTS[kind].inject(side.proxy)
            await asyncio.sleep(hold)
            side.proxy.heal()
            return f"{hold}s"
        if kind == "health flap":
            member = self.rng.choice(side.members[1:])
            member.up = not member.up
            return f"{member.instance.id} {'up' if member.up else 'down'}"
        if kind == "delete entry":
            present = [
                (m.instance.id, side.service) for m in side.members if m.desired() is not None
            ] + [(iid, side.agent.service) for iid in side.agent.ids]
            iid, service = self.rng.choice(present)
            await self.run_blocking(side.delete, iid, service)
            return iid
        if kind == "agent reload":
            return side.agent.reload()
        raise AssertionError(kind)

    def print_summary(self, base: Resources) -> None:
        r = self.report
        seconds = self.elapsed
        injected = sum(r.injected.values())
        print(f"## Chaos soak: {seconds / 60:.1f} min, seed {self.seed}\n")
        print(
            f"faults injected: {injected}; survived: {sum(r.survived.values())}; "
            f"invariant violations: {len(r.violations)}; "
            f"exact states that lapsed before holding {STABLE_FOR:g} s: {sum(r.lapses.values())}\n"
        )
        rows = []
        for kind in KINDS:
            row = [kind]
            for counter in (r.injected, r.survived, r.lapses):
                row.append(" / ".join(str(counter[(name, kind)]) for name in ("consul", "etcd")))
            for name in ("consul", "etcd"):
                times = r.settle.get((name, kind), [])
                row.append(f"{statistics.median(times):.2f} / {max(times):.2f} s" if times else "-")
            rows.append(row)
        header = ["fault", "injected", "survived", "lapsed after heal"]
        header += ["consul settle (median / max)", "etcd settle (median / max)"]
        print("counts are consul / etcd\n")
        print(table(rows, header))
        print(
            f"\nsettle bound {SETTLE_BOUND:.1f} s (TTL {TTL:g} s, timeout {TIMEOUT:g} s, "
            f"retry cap {RETRY.cap:g} s, dead connection {DEAD_CONNECTION:.1f} s)"
        )
        print(f"resources: baseline {base}; peak {r.peak}; end {self.end}")
        if r.violations:
            print("\nviolations:")
            for v in r.violations:
                print(f"- {v}")


def log(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    # The registrars' own warnings (faults are the point here) would drown the report.
    logging.basicConfig(level=logging.ERROR)
    return asyncio.run(Soak(args.minutes, seed).main())
