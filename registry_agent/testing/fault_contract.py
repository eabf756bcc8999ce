"""The fault section of the backend contract: a misbehaving network, then a heal.

Subclass :class:`FaultContract` in a test module and provide the ``server``
fixture (as for :class:`~registry_agent.testing.contract.BackendContract`)::

    class TestMyBackendFaults(FaultContract):
        @pytest.fixture
        def server(self):
            with MyServer() as server:
                yield server

For every fault of :data:`FAULTS`, two :class:`~registry_agent.AsyncRegistrar`
and one :class:`~registry_agent.AsyncWatcher` talk to the real server through a
:class:`~registry_agent.testing.faultproxy.FaultProxy`; the fault lasts longer
than the TTL, then the proxy heals. Within :meth:`FaultContract.heal_bound`
(derived from the TTL, heartbeat, retry cap, backend timeout and how soon a
dead connection is noticed) the registry, read directly, must hold exactly
the two entries, passing, with no duplicates and no orphan leases, the
watcher's snapshot must equal it, each registrar's ``status()`` must say
so (ready, passing), and all that must then hold for
:attr:`FaultContract.stable_for`. During the fault the process may not spin
(CPU under :attr:`FaultContract.max_cpu` of wall time); every error a
backend raised to the registrars or the watcher must be a
:class:`~registry_agent.RegistryError` that carries the server's own words
where it sent some; and once calls stuck on dead connections have timed out,
registrar calls on the healed network must get through (a "blip", a
blackhole shorter than the TTL, checks that a dead connection is not reused).

Override :meth:`FaultContract.registry_ids` and
:meth:`FaultContract.orphan_leases` to read the server's own view (the
defaults read through a direct backend and know of no leases).
"""

from __future__ import annotations

import asyncio
import base64
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import pytest

from registry_agent import (
    AsyncRegistrar,
    AsyncWatcher,
    Backend,
    BackendError,
    BackendUnavailable,
    HealthStatus,
    RegistryError,
    RetryPolicy,
    ServiceInstance,
    open_backend,
)
from registry_agent.testing.contract import ServerControl, _ContractFixtures
from registry_agent.testing.faultproxy import FaultProxy
from registry_agent.testing.servers import ConsulServer, EtcdServer

__all__ = [
    "FAULTS",
    "Fault",
    "FaultContract",
    "RecordedError",
    "consul_ids",
    "etcd_ids",
    "etcd_keys",
    "etcd_orphan_leases",
    "recording",
]


@dataclass(frozen=True)
class Fault:
    """One way the network misbehaves: how to inject it, what the server says meanwhile."""

    name: str
    inject: Callable[[FaultProxy], None]
    #: Text the server's answer carries during the fault (HTTP backends only).
    words: str | None = None
    #: Seconds a ``Retry-After`` asks for (part of the heal bound).
    retry_after: float = 0.0
    #: True when the fault breaks requests (some error must be surfaced).
    breaks: bool = True
    #: How long it lasts, in TTLs (None: :attr:`FaultContract.fault_for`).
    hold_ttls: float | None = None


FAULTS: tuple[Fault, ...] = (
    Fault("latency", lambda p: p.latency(0.2), breaks=False),
    Fault("stall", lambda p: p.stall()),
    Fault("blackhole", lambda p: p.blackhole()),
    # Shorter than the TTL: a heartbeat is caught on a connection that stays dead
    # after the heal; the next call must not be sent down it again.
    Fault("blip", lambda p: p.blackhole(), hold_ttls=0.4),
    Fault("reset", lambda p: p.reset_after(64)),
    Fault("refuse", lambda p: p.refuse()),
    Fault(
        "http-429",
        lambda p: p.http(429, "Too many requests, slow down", {"Retry-After": "1"}),
        words="slow down",
        retry_after=1.0,
    ),
    Fault("http-500", lambda p: p.http(500, "No cluster leader"), words="No cluster leader"),
    Fault(
        "http-503",
        lambda p: p.http(503, "Service Unavailable: in maintenance", {"Retry-After": "1"}),
        words="in maintenance",
        retry_after=1.0,
    ),
    Fault("http-404", lambda p: p.http(404, "404 page not found"), words="404 page not found"),
    Fault("garbage", lambda p: p.garbage(512)),
)


@dataclass(frozen=True)
class RecordedError:
    """An exception a backend method raised, and when."""

    at: float
    method: str
    error: BaseException
    #: When the failed call (or watch) began.
    started: float = 0.0


_CALLS = frozenset({"register", "heartbeat", "lookup", "set_status", "deregister", "list"})


class _Recorder:
    """Delegates to a backend and records every exception its calls and watches raise."""

    def __init__(self, backend: Backend, errors: list[RecordedError]) -> None:
        self._backend = backend
        self._errors = errors

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._backend, name)
        if name in _CALLS:

            async def call(*args: Any, **kwargs: Any) -> Any:
                started = time.monotonic()
                try:
                    return await attr(*args, **kwargs)
                except Exception as exc:
                    self._errors.append(RecordedError(time.monotonic(), name, exc, started))
                    raise

            return call
        if name == "watch":
            return lambda *args, **kwargs: self._watch(attr(*args, **kwargs))
        return attr

    async def _watch(self, stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
        started = time.monotonic()
        try:
            async for item in stream:
                yield item
        except Exception as exc:
            self._errors.append(RecordedError(time.monotonic(), "watch", exc, started))
            raise
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()


def recording(backend: Backend, errors: list[RecordedError]) -> Backend:
    """``backend``, with every exception its methods raise appended to ``errors``."""
    cls = type("Recorded", (_Recorder,), {"scheme": getattr(type(backend), "scheme", "?")})
    return cast(Backend, cls(backend, errors))


def _reports_passing(status: dict[str, Any]) -> bool:
    return bool(status.get("ready")) and status.get("registry_status") == "passing"


def proxied_url(url: str, proxy: FaultProxy) -> str:
    """``url`` with its host:port replaced by the proxy's."""
    parts = urllib.parse.urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@" if auth else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{netloc}{proxy.host}:{proxy.port}"))


def target_of(url: str) -> tuple[str, int]:
    """(host, port) of a one-endpoint backend URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"expected host:port in {url}")
    return parts.hostname, parts.port


def consul_ids(server: ConsulServer, service: str) -> list[str]:
    """Service ids of ``service`` in Consul's catalog, duplicates kept."""
    return [entry["ServiceID"] for entry in server.api(f"/v1/catalog/service/{service}")]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def etcd_keys(server: EtcdServer, prefix: bytes) -> list[dict[str, Any]]:
    """Every key-value under ``prefix`` as etcd's JSON gateway returns it (base64 keys)."""
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    reply = server.api("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(end)})
    return list(reply.get("kvs", []))


def etcd_ids(server: EtcdServer, service: str, prefix: str = "/services") -> list[str]:
    """Instance ids under ``<prefix>/<service>/`` in etcd."""
    start = f"{prefix}/{service}/".encode()
    return [base64.b64decode(kv["key"])[len(start) :].decode() for kv in etcd_keys(server, start)]


def etcd_orphan_leases(server: EtcdServer) -> list[str]:
    """Leases alive on the server that no key is attached to."""
    used = {int(kv.get("lease", 0)) for kv in etcd_keys(server, b"/")}
    return sorted(str(lease) for lease in server.leases() - used)


class FaultContract(_ContractFixtures):
    """Every backend heals from every fault of :data:`FAULTS`. Provide ``server``."""

    ttl: ClassVar[float] = 3.0
    timeout: ClassVar[float] = 2.0
    #: Registrars' and watcher's backoff.
    retry: ClassVar[RetryPolicy] = RetryPolicy(initial=0.1, cap=2.0)
    #: How long the fault lasts: longer than the TTL, so entries are lost.
    fault_for: ClassVar[float] = 4.0
    #: Longest a watch may sit on a silent connection before noticing (backend option).
    dead_connection: ClassVar[float] = 10.0
    #: The backend speaks HTTP/1.1 (the proxy's HTTP answers reach it as such).
    speaks_http: ClassVar[bool] = True
    #: Share of wall time the process may spend on CPU during a fault.
    max_cpu: ClassVar[float] = 0.2
    #: An exact state counts once it has held this long (what a fault set in
    #: motion, e.g. a lease expiring after the heal, has played out by then).
    stable_for: ClassVar[float] = 3.0

    def heal_bound(self, fault: Fault) -> float:
        """Seconds from the heal until registry and watcher are exact again.

        A request on a dead connection runs to its timeout, the backoff sleep
        is at most the retry cap (or the server's ``Retry-After``), a watch
        notices a silent connection within :attr:`dead_connection`; then a lease
        may be found lost at the next heartbeat and the entry registered again.
        """
        registrar = (
            self.timeout + max(self.retry.cap, fault.retry_after) + self.ttl / 3 + 2 * self.timeout
        )
        watcher = self.dead_connection + self.retry.cap + self.timeout
        return max(registrar, watcher) + 3.0  # slack for a busy machine

    def registry_ids(self, server: ServerControl, service: str) -> list[str] | None:
        """The ids of ``service``'s entries as the server lists them, duplicates kept
        (None: only what a direct backend lists is checked)."""
        return None

    def orphan_leases(self, server: ServerControl) -> list[str]:
        """Leases on the server that no key uses (backends without leases: none)."""
        return []

    @pytest.fixture
    def measure(self) -> Callable[[str, float, float], None]:
        """Record and check a duration: ``measure(what, seconds, bound)``."""

        def record(what: str, seconds: float, bound: float) -> None:
            print(f"{what}: {seconds:.2f}s (bound {bound:.1f}s)")
            assert seconds <= bound, f"{what} took {seconds:.2f}s, bound {bound:.2f}s"

        return record

    @pytest.fixture(params=FAULTS, ids=[f.name for f in FAULTS])
    def fault(self, request: pytest.FixtureRequest) -> Fault:
        return cast(Fault, request.param)

    @pytest.fixture
    def proxy(self, server: ServerControl) -> Iterator[FaultProxy]:
        with FaultProxy(*target_of(server.url)) as proxy:
            yield proxy

    async def test_heals_exactly_after_the_fault(
        self,
        server: ServerControl,
        proxy: FaultProxy,
        fault: Fault,
        measure: Callable[[str, float, float], None],
    ) -> None:
        service = f"svc-{uuid.uuid4().hex[:8]}"
        desired = {inst.id: inst for inst in (self.instance(service, 1), self.instance(service, 2))}
        errors: list[RecordedError] = []  # raised to the registrars
        watch_errors: list[RecordedError] = []  # raised to the watcher
        surfaced: list[BaseException] = []
        url = proxied_url(server.url, proxy)

        def backend(record: list[RecordedError]) -> Backend:
            return recording(
                open_backend(url, timeout=self.timeout, **self.backend_options), record
            )

        direct = open_backend(server.url, timeout=self.timeout, **self.backend_options)
        registrars = [
            AsyncRegistrar(backend(errors), inst, ttl=self.ttl, retry=self.retry)
            for inst in desired.values()
        ]
        watcher = AsyncWatcher(
            backend(watch_errors),
            service,
            retry=self.retry,
            on_error=lambda _, exc: surfaced.append(exc),
        )
        try:
            for registrar in registrars:
                await registrar.start()
            await watcher.start()
            await self._converged(server, direct, watcher, registrars, desired, within=15.0)
            losses = sum(r.counters.lease_losses for r in registrars)

            fault.inject(proxy)
            started, cpu = time.monotonic(), time.process_time()
            hold = self.fault_for if fault.hold_ttls is None else fault.hold_ttls * self.ttl
            await asyncio.sleep(hold)
            wall, used = time.monotonic() - started, time.process_time() - cpu
            last_errors = [r.status()["last_error"] for r in registrars]
            proxy.heal()
            healed = time.monotonic()
            fault_errors = [e for e in errors + watch_errors if started <= e.at < healed]

            took = await self._converged(
                server, direct, watcher, registrars, desired, within=self.heal_bound(fault)
            )
            measure(f"{fault.name}: healed", took, self.heal_bound(fault))
            print(f"{fault.name}: CPU {used:.2f}s in {wall:.1f}s of fault")
            assert used < self.max_cpu * wall, (
                f"CPU spin: {used:.2f}s of CPU in {wall:.1f}s of {fault.name}"
            )
            self._check_errors(fault, errors + watch_errors, fault_errors, surfaced, last_errors)
            # A call stuck on a dead connection ends by its timeout; a registrar call
            # that starts after that, on a healed network, must get through.
            after = healed + self.timeout + 0.5
            dead = [
                f"{e.method} started {e.started - healed:.1f}s after the heal, failed "
                f"{e.at - e.started:.1f}s later: {e.error}"
                for e in errors
                if e.started > after and isinstance(e.error, BackendUnavailable)
            ]
            assert not dead, "calls failed on a healed network (a dead connection reused?): " + (
                "; ".join(dead)
            )
            if not fault.breaks:
                assert sum(r.counters.lease_losses for r in registrars) == losses, (
                    f"{fault.name} cost an entry: {[r.status() for r in registrars]}"
                )
        finally:
            proxy.heal()
            for registrar in registrars:
                await registrar.stop()
            await watcher.close()
            for registrar in registrars:
                await registrar.backend.close()
            await watcher.backend.close()
            await direct.close()

    async def test_a_call_after_a_timed_out_one_gets_through(
        self,
        server: ServerControl,
        proxy: FaultProxy,
        measure: Callable[[str, float, float], None],
    ) -> None:
        """A call that timed out on a blackholed connection is not followed down it.

        The connection stays dead after the heal (as a real half-open one does);
        the next call must dial afresh instead of waiting for keepalive to give up.
        """
        backend = open_backend(
            proxied_url(server.url, proxy), timeout=self.timeout, **self.backend_options
        )
        inst = self.instance(f"svc-{uuid.uuid4().hex[:8]}")
        try:
            lease = await backend.register(inst, ttl=30 * self.ttl)
            await backend.heartbeat(lease)
            proxy.blackhole()
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await backend.heartbeat(lease)
            measure("stuck call timed out", time.monotonic() - started, self.timeout + 1.5)
            proxy.heal()
            started = time.monotonic()
            try:
                await backend.heartbeat(lease)
            except BackendUnavailable as exc:
                pytest.fail(
                    f"the call after the timed-out one failed too, after "
                    f"{time.monotonic() - started:.1f}s (the dead connection was reused): {exc}"
                )
            measure("next call, healed network", time.monotonic() - started, self.timeout)
        finally:
            proxy.heal()
            await backend.close()

    def _check_errors(
        self,
        fault: Fault,
        errors: list[RecordedError],
        fault_errors: list[RecordedError],
        surfaced: list[BaseException],
        last_errors: list[str | None],
    ) -> None:
        strays = [e for e in errors if not isinstance(e.error, RegistryError)]
        assert not strays, "backends raised errors outside the RegistryError tree: " + "; ".join(
            f"{e.method}: {type(e.error).__module__}.{type(e.error).__name__}: {e.error}"
            for e in strays
        )
        strays_seen = [e for e in surfaced if not isinstance(e, RegistryError)]
        assert not strays_seen, f"on_error got non-RegistryError errors: {strays_seen!r}"
        if fault.breaks:  # (a short fault may be noticed only after its heal)
            assert errors or surfaced, f"{fault.name} was not noticed by anyone"
        if fault.words is None or not self.speaks_http:
            return
        wordless = [
            f"{e.method}: {type(e.error).__name__}: {e.error}"
            for e in fault_errors
            if isinstance(e.error, BackendError) and fault.words not in str(e.error)
        ]
        assert not wordless, f"errors without the server's words {fault.words!r}: " + "; ".join(
            wordless
        )
        for text in last_errors:
            assert text is None or fault.words in text, (
                f"registrar last_error lost the server's words {fault.words!r}: {text!r}"
            )

    async def _converged(
        self,
        server: ServerControl,
        direct: Backend,
        watcher: AsyncWatcher,
        registrars: list[AsyncRegistrar],
        desired: dict[str, ServiceInstance],
        *,
        within: float,
    ) -> float:
        """Seconds until registry, server view and watcher are exactly ``desired``
        and stay so for :attr:`stable_for` (the stretch must begin within ``within``)."""
        started = time.monotonic()
        service = next(iter(desired.values())).service
        want = {i: (inst, HealthStatus.PASSING) for i, inst in desired.items()}
        problem = "never read"
        exact_since: float | None = None
        lapses: list[str] = []
        while True:
            exact = False
            try:
                snapshot = await direct.list(service)
                held = {i: (h.instance, h.status) for i, h in snapshot.instances.items()}
                seen = {h.instance.id: (h.instance, h.status) for h in watcher.snapshot()}
                ids = await asyncio.to_thread(self.registry_ids, server, service)
                orphans = await asyncio.to_thread(self.orphan_leases, server)
            except RegistryError as exc:
                problem = f"registry not readable: {exc}"
            else:
                if held != want:
                    problem = f"registry holds {held}, want {want}"
                elif ids is not None and sorted(ids) != sorted(desired):
                    problem = f"the server lists {ids}, want {sorted(desired)}"
                elif seen != held:
                    problem = f"watcher sees {seen}, registry holds {held}"
                elif orphans:
                    problem = f"orphan leases {orphans}"
                elif untruthful := [
                    r.status() for r in registrars if not _reports_passing(r.status())
                ]:
                    problem = f"registrars say otherwise: {untruthful}"
                else:
                    exact = True
            now = time.monotonic()
            if exact:
                exact_since = now if exact_since is None else exact_since
                if now - exact_since >= self.stable_for:
                    if lapses:
                        print("exact, then lapsed: " + "; ".join(lapses))
                    return exact_since - started
            else:
                if exact_since is not None:
                    lapses.append(f"at {now - started:.1f}s: {problem}")
                exact_since = None
                if now - started > within:
                    states = [r.status() for r in registrars]
                    pytest.fail(
                        f"not exact within {within:.1f}s: {problem}; registrars: {states}"
                        + (f"; earlier lapses: {lapses}" if lapses else "")
                    )
            await asyncio.sleep(0.1)
