"""One heartbeat service per (backend, TTL): the liveness many Consul registrations share.

The group registers a service (``registry-agent-heartbeat``) carrying one TTL
check and renews it with one ``check/pass`` every ttl/3; each member service
carries an alias check to it. Once per TTL the group reads the agent's
services and checks back in two requests and tells only the members whose
entry differs from what was written (:attr:`LivenessNews.VERIFY`). A heartbeat
the agent no longer knows (restarted empty), or renewals failing for a whole
TTL, count the group's liveness lost: every member is told
(:attr:`LivenessNews.RENEWAL`) and registers again on a new generation.

Each renewal (passed or failed) and each read-back is credited to every member
it covered, through its listener's ``tally`` (the registrar's counters
``heartbeats_ok``, ``heartbeats_failed``, ``verifications``): one call per member,
no request, no wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from registry_agent import (
    BackendError,
    BackendUnavailable,
    HealthStatus,
    Lease,
    LeaseLost,
    RetryPolicy,
    ServiceInstance,
    Throttled,
)
from registry_agent.backend import LivenessNews, error_context

__all__ = [
    "HEARTBEAT_NAME",
    "HeartbeatCalls",
    "HeartbeatGroup",
    "Member",
    "ReadBack",
    "alias_id",
    "entry_differs",
    "foreign_status",
    "health_id",
]

log = logging.getLogger("registry_agent.consul")

_RETRY_CAP = 1.0  # seconds between renewal attempts while they fail, at most

#: Service name and tag of the heartbeat services: operators recognise them, listings skip them.
HEARTBEAT_NAME = "registry-agent-heartbeat"


def alias_id(instance_id: str) -> str:
    """The member's liveness check: an alias of the heartbeat service."""
    return f"service:{instance_id}"


def health_id(instance_id: str) -> str:
    """The member's own health check, present only while not plainly passing."""
    return f"service:{instance_id}:health"


@dataclass(slots=True)
class Member:
    """One registration on the shared heartbeat, as written."""

    lease: Lease
    generation: int
    status: HealthStatus
    note: str
    written_at: float  # time.monotonic() when the entry was last written
    #: Worst status of the entry's checks that are not ours (maintenance mode…), as last seen.
    foreign: str = "passing"
    #: The service fields written (``_flavors.write_entry``); None: the instance's own.
    payload: Mapping[str, Any] | None = None
    listeners: list[Callable[[LivenessNews], None]] = field(default_factory=list)
    #: The listeners' ``tally`` (those that have one): credited with what covered the member.
    tallies: list[Callable[[str], None]] = field(default_factory=list)

    @property
    def has_health(self) -> bool:
        """Whether a health check of its own is written (held unhealthy, or a note)."""
        return self.status is not HealthStatus.PASSING or bool(self.note)


@dataclass(frozen=True, slots=True)
class HeartbeatCalls:
    """The Consul requests a group makes (given by the backend, which maps their errors)."""

    #: Register (or replace) the heartbeat service, its TTL check passing.
    register: Callable[[str], Awaitable[None]]
    #: ``PUT /v1/agent/check/pass/<id>``: LeaseLost when the agent no longer knows it.
    renew: Callable[[str], Awaitable[None]]
    #: Deregister the heartbeat service (gone already is fine).
    deregister: Callable[[str], Awaitable[None]]
    #: The agent's services and checks, keyed by id (``/v1/agent/services``, ``/v1/agent/checks``).
    read_back: Callable[[], Awaitable[tuple[Mapping[str, Any], Mapping[str, Any]]]]


@dataclass(frozen=True, slots=True)
class ReadBack:
    """One verification's read: the agent's services and checks by id, checks by service."""

    services: Mapping[str, Any]
    checks: Mapping[str, Any]
    #: Checks per ServiceID ("" for the node's own checks).
    by_service: Mapping[str, list[Mapping[str, Any]]]

    @classmethod
    def of(cls, services: Mapping[str, Any], checks: Mapping[str, Any]) -> ReadBack:
        """Index ``checks`` by service once (not once per member)."""
        by_service: dict[str, list[Mapping[str, Any]]] = {}
        for check in checks.values():
            if isinstance(check, Mapping):
                by_service.setdefault(str(check.get("ServiceID") or ""), []).append(check)
        return cls(services, checks, by_service)


def foreign_status(instance_id: str, read: ReadBack) -> str:
    """Worst status of the checks on ``instance_id`` (or its node) that are not ours.

    An operator's maintenance mode (``_service_maintenance:<id>``, ``_node_maintenance``)
    or checks someone added: the registrar reads them back once when they change.
    """
    ours = (alias_id(instance_id), health_id(instance_id), "serfHealth")
    statuses = {
        str(c.get("Status"))
        for c in (*read.by_service.get(instance_id, ()), *read.by_service.get("", ()))
        if c.get("CheckID") not in ours
    }
    for status in ("critical", "warning"):
        if status in statuses:
            return status
    return "passing"


def entry_differs(member: Member, heartbeat_check: str, read: ReadBack, foreign: str) -> bool:
    """Whether the agent holds something else than what ``member`` wrote.

    Compared: the service's name, address, port, tags, meta and tagged addresses
    as written (the flavor's, :attr:`Member.payload`); our alias check
    present (and passing while the heartbeat and the checks that are not ours
    pass: an alias also follows node checks); our health check present (with
    the status written) exactly when one was written. Other checks (an
    operator's maintenance mode) are not ours to repair.
    """
    instance = member.lease.instance
    svc = read.services.get(instance.id)
    if not isinstance(svc, Mapping):
        return True
    written = member.payload
    tags = written["Tags"] if written is not None else instance.tags
    meta = written["Meta"] if written is not None else instance.meta
    if (
        svc.get("Service") != instance.service
        or (svc.get("Address") or "") != instance.address
        or (svc.get("Port") or 0) != (instance.port or 0)
        or tuple(svc.get("Tags") or ()) != tuple(tags)
        or dict(svc.get("Meta") or {}) != dict(meta)
    ):
        return True
    tagged = written.get("TaggedAddresses") if written is not None else None
    if tagged:
        held = svc.get("TaggedAddresses")
        # Consul adds its own (lan_ipv4, wan_ipv4): only ours are compared.
        if not isinstance(held, Mapping) or any(held.get(k) != v for k, v in tagged.items()):
            return True
    alias = read.checks.get(alias_id(instance.id))
    if not isinstance(alias, Mapping) or alias.get("ServiceID") != instance.id:
        return True
    beat = read.checks.get(heartbeat_check)
    passing = str(HealthStatus.PASSING)
    if (
        alias.get("Status") != passing
        and foreign == passing
        and isinstance(beat, Mapping)
        and beat.get("Status") == passing
    ):
        return True  # the heartbeat passes but the alias does not: not aliasing ours
    health = read.checks.get(health_id(instance.id))
    if not member.has_health:
        return health is not None
    return not isinstance(health, Mapping) or health.get("Status") != str(member.status)


class HeartbeatGroup:
    """The shared liveness of one TTL on one backend (see the module docstring)."""

    def __init__(
        self,
        calls: HeartbeatCalls,
        *,
        ttl: float,
        service_id: str,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.calls = calls
        self.ttl = ttl
        self.service_id = service_id
        self.check_id = alias_id(service_id)  # the heartbeat's TTL check
        self.members: dict[str, Member] = {}
        #: Deregistrations in flight: the heartbeat is removed only after the last one.
        self.leaving = 0
        #: Bumped each time the liveness is lost: members of an older one are lost.
        self.generation = 0
        self.last_renewal: float | None = None  # time.time() of the last renewal that worked
        self._retry = retry or RetryPolicy(initial=min(0.2, ttl / 10), cap=max(0.2, ttl / 3))
        self._registered = False
        self._error: BackendError | None = None  # the failing renewal's error, while it fails
        self._since_ok = 0.0  # time.monotonic() of the last renewal (or registration) that worked
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._verify_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._lost_why = ""  # why the last generation was lost (the server's words)

    # -- state the registrar reads (no I/O) --

    def check(self, lease: Lease) -> None:
        """Answer a member's heartbeat from memory (see ``SharedLiveness``)."""
        member = self.members.get(lease.instance.id)
        if member is None or member.generation != self.generation or not self._registered:
            raise LeaseLost(
                f"the shared heartbeat {self.service_id} of this registration was lost: "
                f"{self._lost_why or 'removed'}",
                **error_context("consul", instance=lease.instance),
            )
        if self._error is not None:
            raise self._error

    def follow(
        self, instance_id: str, notify: Callable[[LivenessNews], None]
    ) -> Callable[[], None]:
        """Send news about ``instance_id`` to ``notify`` until the returned function is called."""
        member = self.members.get(instance_id)
        if member is None:
            return lambda: None
        member.listeners.append(notify)
        tally: Callable[[str], None] | None = getattr(notify, "tally", None)
        if tally is not None:
            member.tallies.append(tally)

        def unfollow() -> None:
            with contextlib.suppress(ValueError):
                member.listeners.remove(notify)
            if tally is not None:
                with contextlib.suppress(ValueError):
                    member.tallies.remove(tally)

        return unfollow

    # -- membership --

    async def ensure(self) -> int:
        """Register the heartbeat service unless it is (single-flight); the generation to join."""
        if self._registered:
            return self.generation
        async with self._lock:
            if self._closed:  # removed (its last member left) while this waited
                raise BackendUnavailable(
                    f"the heartbeat {self.service_id} was just removed: register again",
                    backend="consul",
                )
            if not self._registered:
                await self.calls.register(self.service_id)
                self._registered = True
                self._error = None
                self._since_ok = time.monotonic()
                self.last_renewal = time.time()
                self._start()
        return self.generation

    def join(self, member: Member) -> None:
        """Record a member written on ``member.generation`` (keeping its listeners)."""
        old = self.members.get(member.lease.instance.id)
        if old is not None:
            member.listeners = old.listeners
            member.tallies = old.tallies
        self.members[member.lease.instance.id] = member

    def leave(self, instance: ServiceInstance) -> bool:
        """Forget ``instance``; True when the group is now empty."""
        self.members.pop(instance.id, None)
        return not self.members

    async def close(self, *, deregister: bool = True) -> None:
        """Stop renewing; deregister the heartbeat service (its members turn critical)."""
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if deregister and self._registered:
            self._registered = False
            await self.calls.deregister(self.service_id)

    # -- the loops --

    def renew_now(self) -> None:
        """Renew at once (the agent came back: a restored TTL check is critical until then),
        then read every entry back: Consul 1.8 may leave some alias checks critical."""
        self._wake.set()
        self._verify_wake.set()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    def _start(self) -> None:
        if self._tasks or self._closed:
            return
        self._tasks = [
            asyncio.create_task(self._renew_loop(), name=f"consul heartbeat {self.service_id}"),
            asyncio.create_task(self._verify_loop(), name=f"consul verify {self.service_id}"),
        ]

    def _tell(self, news: LivenessNews, members: list[Member]) -> None:
        for member in members:
            for notify in list(member.listeners):
                try:
                    notify(news)
                except Exception:  # a listener's bug must not stop the heartbeat
                    log.exception("a liveness listener failed", extra={"backend": "consul"})

    def _credit(self, counter: str, members: list[Member]) -> None:
        """Count ``counter`` once for each of ``members`` (see the module docstring)."""
        for member in members:
            for tally in member.tallies:
                try:
                    tally(counter)
                except Exception:  # a listener's bug must not stop the heartbeat
                    log.exception("a liveness tally failed", extra={"backend": "consul"})

    def _current(self) -> list[Member]:
        """The members written on the live generation (those a renewal keeps alive)."""
        generation = self.generation
        return [m for m in self.members.values() if m.generation == generation]

    def _lose(self, why: str) -> None:
        """Count the liveness lost: a new generation, every member told."""
        self._registered = False
        self._error = None
        self._lost_why = why
        self.generation += 1
        log.warning(
            "Consul heartbeat %s lost (%s): re-registering %d services",
            self.service_id,
            why,
            len(self.members),
            extra={"event": "heartbeat_lost", "backend": "consul"},
        )
        self._tell(LivenessNews.RENEWAL, list(self.members.values()))

    async def _renew_within_ttl(self) -> None:
        """Renew, waiting no longer than the TTL's end: a renewal still unanswered then
        (a stalled or blackholed agent) counts the heartbeat lost now, not when the
        call's own timeout ends (members said "registered" up to 5 s past the TTL)."""
        left = self.ttl - (time.monotonic() - self._since_ok)
        try:
            async with asyncio.timeout(max(0.1, left)) as bound:
                await self.calls.renew(self.service_id)
        except TimeoutError:
            if not bound.expired():
                raise
            raise BackendUnavailable(
                f"no answer before the TTL ran out ({self.ttl:g}s since the last renewal)",
                backend="consul",
            ) from None

    async def _renew_loop(self) -> None:
        attempt = 0
        while True:
            back = False
            renewing = self._registered
            try:
                if renewing:
                    await self._renew_within_ttl()
                else:
                    back = bool(self._lost_why)  # a new heartbeat after a loss
                    await self.ensure()
            except LeaseLost as exc:
                self._lose(str(exc))
                attempt += 1
                await self._pause(self._retry.delay(attempt))
                continue
            except BackendError as exc:
                attempt += 1
                if renewing:
                    self._credit("heartbeats_failed", self._current())
                if self._registered and time.monotonic() - self._since_ok >= self.ttl:
                    self._lose(f"no renewal for {self.ttl:g}s: {exc}")
                elif self._registered and self._error is None:
                    self._error = exc
                    self._tell(LivenessNews.RENEWAL, list(self.members.values()))
                else:
                    self._error = exc if self._registered else None
                if isinstance(exc, Throttled):
                    delay = self._retry.answered(attempt, exc.retry_after)
                else:  # one request a second at most: back soon after the registry is
                    delay = min(self._retry.delay(attempt), _RETRY_CAP)
                # Never sleep past the TTL's end: the next try decides lost or not.
                left = self.ttl - (time.monotonic() - self._since_ok)
                await self._pause(max(0.05, min(delay, left)) if self._registered else delay)
                continue
            attempt = 0
            self._since_ok = time.monotonic()
            self.last_renewal = time.time()
            if renewing:
                self._credit("heartbeats_ok", self._current())
            if self._error is not None or back:
                # Renewing again, or a new heartbeat after a loss: members in a backoff
                # (registering again on the new one) go now, not after their own delay.
                self._error = None
                self._tell(LivenessNews.RENEWAL, list(self.members.values()))
            await self._pause(self.ttl / 3)

    async def _verify_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._verify_wake.wait(), self.ttl)
            if self._verify_wake.is_set():
                self._verify_wake.clear()
                await asyncio.sleep(min(1.0, self.ttl / 3))  # once the renewal asked for is done
            if not self._registered or not self.members:
                continue
            started = time.monotonic()
            generation = self.generation
            try:
                services, checks = await self.calls.read_back()
            except BackendError as exc:  # the renewal loop owns failures; verify next time
                log.debug("Consul verification read failed: %s", exc, extra={"backend": "consul"})
                continue
            if generation != self.generation:
                continue
            read = ReadBack.of(services, checks)
            stale = []
            checked = []
            for m in list(self.members.values()):
                if m.generation != generation or m.written_at >= started:
                    continue
                checked.append(m)
                foreign = foreign_status(m.lease.instance.id, read)
                moved, m.foreign = foreign != m.foreign, foreign
                if moved or entry_differs(m, self.check_id, read, foreign):
                    stale.append(m)
            self._credit("verifications", checked)
            if stale:
                log.debug(
                    "Consul verification: %d of %d entries differ",
                    len(stale),
                    len(self.members),
                    extra={"backend": "consul"},
                )
                self._tell(LivenessNews.VERIFY, stale)
