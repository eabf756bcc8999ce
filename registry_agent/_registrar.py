"""AsyncRegistrar: keeps one instance registered while it is healthy, whatever happens."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import math
import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from registry_agent._backend import Backend, Lease, LivenessNews, SharedLiveness
from registry_agent._errors import (
    BackendUnavailable,
    ConfigError,
    LeaseLost,
    RegistryError,
    Rejected,
    Throttled,
)
from registry_agent._fork import ForkGuard
from registry_agent._health.checks import CheckResult, HealthCheck, as_check
from registry_agent._health.gate import (
    GateState,
    HealthGate,
    OnUnhealthy,
    desired_registration,
)
from registry_agent._models import HealthStatus, InstanceHealth, ServiceInstance
from registry_agent._plugins import open_backend
from registry_agent._reconcile import Step, next_step
from registry_agent._retry import RetryPolicy

__all__ = [
    "HEARTBEAT_FLOOR",
    "TTL_FLOOR",
    "AsyncRegistrar",
    "RegistrarEvent",
    "RegistrarEventKind",
    "RegistrationTimeout",
    "scrub_credentials",
]

log = logging.getLogger("registry_agent.registrar")

# A registry that cannot be reached is logged again at most this often.
_REPEAT_LOG_EVERY = 30.0
#: Shortest TTL accepted. etcd grants leases in whole seconds (and rounds a short
#: one up to its own minimum, 2 s by default); Consul reaps on a coarse timer.
#: Below a second an entry flaps on any scheduling hiccup.
TTL_FLOOR = 1.0
#: Shortest heartbeat accepted: at most 4 renewals a second per registrar.
HEARTBEAT_FLOOR = 0.25
# Consul never reaps a critical service sooner than this.
_DEREGISTER_CRITICAL_FLOOR = 60.0
# Releasing a lease we abandoned is best effort: never wait longer than this for it.
_RELEASE_TIMEOUT = 2.0

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")


def scrub_credentials(text: str) -> str:
    """``text`` with the user and password of every ``scheme://user:pass@`` URL masked."""
    return _USERINFO.sub(r"\1***@", text)


class RegistrationTimeout(RegistryError, TimeoutError):
    """``start(wait_registered=…)`` ran out of time before the instance was registered."""


class RegistrarEventKind(enum.StrEnum):
    """What happened to a registration."""

    STATE_CHANGED = "state_changed"  # the health gate moved (see ``state``)
    REGISTERED = "registered"  # entered the registry
    REREGISTERED = "reregistered"  # entered it again after the entry was lost
    DEREGISTERED = "deregistered"  # removed (unhealthy, or stopping)
    STATUS_CHANGED = "status_changed"  # marked passing or critical in the registry
    LEASE_LOST = "lease_lost"  # the registry lost our entry (restart, expiry, deletion)
    BACKEND_UNAVAILABLE = "backend_unavailable"  # first failure of a run of failures
    BACKEND_RECOVERED = "backend_recovered"  # the registry answers again
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class RegistrarEvent:
    """One state change of a registrar, as given to ``on_event``."""

    kind: RegistrarEventKind
    instance: ServiceInstance
    state: GateState
    detail: str = ""
    at: float = field(default_factory=time.time)


@dataclass(slots=True)
class _Counters:
    registrations: int = 0
    reregistrations: int = 0
    deregistrations: int = 0
    heartbeats_ok: int = 0
    heartbeats_failed: int = 0
    verifications: int = 0
    lease_losses: int = 0
    errors: int = 0


def _seconds(value: object, name: str, floor: float, why: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"expected a number of seconds, got {value!r}", field=name)
    if value < floor:
        raise ConfigError(f"must be at least {floor:g}s ({why}), got {value:g}s", field=name)
    return float(value)


def _as_on_unhealthy(value: str | OnUnhealthy) -> OnUnhealthy:
    try:
        return OnUnhealthy(value)
    except ValueError:
        raise ConfigError(
            f'expected "deregister" or "critical", got {value!r}', field="on_unhealthy"
        ) from None


class AsyncRegistrar:
    """Registers ``instance`` while its checks pass, heals the entry forever, removes it on stop.

    ``backend`` is a URL (``"consul://127.0.0.1:8500"``, ``"etcd://127.0.0.1:2379"``)
    or a :class:`Backend`. Heartbeats run every ``heartbeat`` seconds (default
    ``ttl / 3``, at most that); our entry is verified at least every ``ttl``
    seconds and repaired if it was deleted or changed. ``checks`` gate the
    registration (``rise`` passes to be ready or to come back, ``fall`` failures
    to be withdrawn); an unhealthy instance is removed, or kept as critical with
    ``on_unhealthy="critical"``. Every failure is retried with ``retry``'s
    jittered backoff, forever: growing while the registry cannot be reached,
    short (or its ``Retry-After``) while it answers but sheds load, and at the
    cap for a :class:`~registry_agent.Rejected` request. ``on_event`` is called
    (on the event loop) for every :class:`RegistrarEvent`, ``on_check`` for
    every check result.

    ``ttl`` is at least :data:`TTL_FLOOR` (1 s) and ``heartbeat`` at least
    :data:`HEARTBEAT_FLOOR` (0.25 s). ``deregister_critical_after`` (at least
    60 s) defaults to the backend's own setting.
    """

    def __init__(
        self,
        backend: str | Backend,
        instance: ServiceInstance,
        *,
        ttl: float = 10.0,
        heartbeat: float | None = None,
        checks: Iterable[HealthCheck | Callable[[], Any]] = (),
        fall: int = 3,
        rise: int = 2,
        on_unhealthy: str | OnUnhealthy = "deregister",
        deregister_critical_after: float | None = None,
        retry: RetryPolicy | None = None,
        on_event: Callable[[RegistrarEvent], None] | None = None,
        on_check: Callable[[HealthCheck, CheckResult], None] | None = None,
        install_signal_handlers: bool = False,
    ) -> None:
        if not isinstance(instance, ServiceInstance):
            raise ConfigError(f"expected a ServiceInstance, got {instance!r}", field="instance")
        ttl = _seconds(ttl, "ttl", TTL_FLOOR, "etcd leases are whole seconds")
        beat = ttl / 3 if heartbeat is None else heartbeat
        beat = _seconds(beat, "heartbeat", HEARTBEAT_FLOOR, "at most 4 renewals a second")
        if beat > ttl / 3 + 1e-9:
            raise ConfigError(
                f"must be at most ttl/3 ({ttl / 3:g}s) so two heartbeats can fail "
                f"before the TTL runs out, got {beat:g}s",
                field="heartbeat",
            )
        if deregister_critical_after is not None:
            deregister_critical_after = _seconds(
                deregister_critical_after,
                "deregister_critical_after",
                _DEREGISTER_CRITICAL_FLOOR,
                "Consul's floor",
            )
        self.instance = instance
        self.ttl = float(ttl)
        self.heartbeat_interval = float(beat)
        self.verify_interval = self.ttl
        self.on_unhealthy = _as_on_unhealthy(on_unhealthy)
        #: None: the backend's own setting (e.g. ``consul://…?deregister_critical_after=5m``).
        self.deregister_critical_after = deregister_critical_after
        self.retry = retry or RetryPolicy()
        self.on_event = on_event
        self.on_check = on_check
        self.install_signal_handlers = install_signal_handlers
        self.checks = [as_check(c) for c in checks]
        names = [c.name for c in self.checks]
        if len(set(names)) != len(names):
            raise ConfigError(f"check names must be unique, got {names}", field="checks")
        self.gate = HealthGate(names, rise=rise, fall=fall)
        # Opening a backend creates no connection: clients appear on first use,
        # inside the process that runs start() (after a fork, not before).
        self._owns_backend = isinstance(backend, str)
        self.backend: Backend = open_backend(backend) if isinstance(backend, str) else backend
        self._backend_name = getattr(type(self.backend), "scheme", type(self.backend).__name__)
        # Set while a backend that shares liveness tells us about our lease.
        self._unfollow: Callable[[], None] | None = None

        self._fork = ForkGuard(f"AsyncRegistrar({instance.service}/{instance.id})")
        self._clock: Callable[[], float] = time.monotonic  # the event loop's clock too

        self._lease: Lease | None = None
        self._actual: HealthStatus | None = None  # the status we last wrote; None: no entry
        self._expires_at: float | None = None  # our entry lapses then unless renewed
        self._stale: Lease | None = None  # a lease we abandoned that may still be alive
        self._seen: InstanceHealth | None = None  # our entry as the last verification read it
        self._just_wrote = False  # a status write awaits its read-back
        self._external: HealthStatus | None = None  # status someone else holds our entry at
        self._lost_entry = False
        self._lost_reason: str | None = None
        self._heartbeat_due = 0.0
        self._verify_due = 0.0
        self._failures = 0
        self._unreachable = 0  # failures in a row without an answer: the backoff exponent
        self._episode: str | None = None  # the kind of failure last logged
        self._rejection: Rejected | None = None
        self._losses_in_row = 0
        self._registered_at = 0.0
        self._last_failure_log = 0.0
        self._last_error: str | None = None
        self._last_heartbeat: float | None = None
        self._results: dict[str, CheckResult] = {}
        self.counters = _Counters()
        self._wake: asyncio.Event | None = None
        self._registered: asyncio.Event | None = None
        self._rejected: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reconciler: asyncio.Task[None] | None = None
        self._stopping = False
        self._started = False
        self._signals: list[tuple[int, Any]] = []

    # -- public API -------------------------------------------------------------------

    @property
    def state(self) -> GateState:
        """The health gate's state: starting, registered, withdrawn or stopped."""
        return self.gate.state

    @property
    def registered(self) -> bool:
        """True while the registry holds our entry (passing or critical).

        False as soon as no registration or heartbeat has succeeded for a TTL:
        by then the registry has dropped the entry (etcd) or failed it (Consul).
        """
        return self._actual is not None and not self._lapsed()

    @property
    def ready(self) -> bool:
        """True while the registry holds our entry as passing (what ``/readyz`` reports)."""
        return self._readiness()[0]

    async def start(self, *, wait_registered: float | None = None) -> None:
        """Start checks and registration in the background and return at once.

        The instance is first checked against what the backend documents it
        accepts (``backend.validate``): a :class:`~registry_agent.Rejected` or
        :class:`~registry_agent.ConfigError` is raised here, before anything runs.

        With ``wait_registered``, wait up to that many seconds for the entry to
        be in the registry; on timeout, stop and raise :class:`RegistrationTimeout`.
        If the registry refuses the registration (:class:`~registry_agent.Rejected`:
        a permission or a value no retry can fix), stop and raise that at once.
        Without it, a refused registration is reported by :meth:`status` and
        the log, and retried slowly (at the backoff cap) in case an operator
        fixes the permission.
        """
        if self._started:
            raise RuntimeError("a registrar can be started once")
        await self._validate()
        # Created in a gunicorn master (preload) and started in a worker: the
        # registration is the worker's, so the worker's stop() must deregister.
        self._fork = ForkGuard(self._fork.what)
        self._started = True
        self._wake = asyncio.Event()
        self._registered = asyncio.Event()
        self._rejected = asyncio.Event()
        for check in self.checks:
            self._tasks.append(asyncio.create_task(self._run_check(check), name=check.name))
        self._reconciler = asyncio.create_task(self._reconcile(), name="registrar")
        if hasattr(self.backend, "wait_connection_change"):
            self._tasks.append(asyncio.create_task(self._watch_connection(), name="probe"))
        if self.install_signal_handlers:
            self._install_signal_handlers()
        if wait_registered is not None:
            await self._wait_started(wait_registered)

    async def _validate(self) -> None:
        validate = getattr(self.backend, "validate", None)
        if validate is None:
            return
        result = validate(self.instance)
        if inspect.isawaitable(result):
            await result

    async def _wait_started(self, timeout: float) -> None:
        assert self._registered is not None
        assert self._rejected is not None
        waits = [
            asyncio.ensure_future(self._registered.wait()),
            asyncio.ensure_future(self._rejected.wait()),
        ]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        if self._registered.is_set():
            return
        rejection = self._rejection
        why = self._last_error or f"health gate is {self.state}"
        await self.stop()
        if rejection is not None:
            raise rejection
        raise RegistrationTimeout(
            f"not registered within {timeout:g}s: {why}",
            service=self.instance.service,
            instance=self.instance.id,
            backend=self._backend_name,
        )

    async def wait_registered(self, timeout: float | None = None) -> bool:
        """Wait until the entry is in the registry; False on timeout."""
        if self._registered is None:
            raise RuntimeError("start() the registrar first")
        try:
            async with asyncio.timeout(timeout):
                await self._registered.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout: float = 10.0) -> None:
        """Deregister (etcd: revoke the lease) and stop, within ``timeout`` seconds.

        Never raises: hanging checks are abandoned, and a registry that fails
        or does not answer in time is logged (and kept in ``status()``'s
        ``last_error``), leaving the entry to expire with its TTL. In a process
        that inherited the registrar through ``fork()`` it returns at once.
        """
        if self._fork.in_child("stop()"):
            return
        if self._stopping:
            return
        self._stopping = True
        try:
            await self._shutdown(timeout)
        except Exception as exc:  # stop() never raises: whatever broke is logged and kept
            self._log_failure("stop", self._registry_error(exc), force=True)

    async def _shutdown(self, timeout: float) -> None:
        deadline = self._clock() + timeout

        def left() -> float:
            return max(0.1, deadline - self._clock())

        self._remove_signal_handlers()
        for task in self._tasks:
            task.cancel()
        if self._reconciler is not None:
            self._wake_up()
            # Let an operation in flight finish, so we know what the registry holds.
            done, _ = await asyncio.wait({self._reconciler}, timeout=timeout / 2)
            if not done:
                self._reconciler.cancel()
                await asyncio.wait({self._reconciler}, timeout=left())
        changed = self.gate.stop()
        if changed is not None:
            self._emit(RegistrarEventKind.STATE_CHANGED, "stopping")
        if self._stale is not None and self._stale != self._lease:
            await self._release()
        if self._lease is not None:
            try:
                async with asyncio.timeout(left()):
                    await self.backend.deregister(self._lease)
            except Exception as exc:
                self._log_failure("deregister", self._registry_error(exc), force=True)
            else:
                self._drop_lease()
                self._set_actual(None)
                self.counters.deregistrations += 1
                self._emit(RegistrarEventKind.DEREGISTERED, "stopped")
        for check in self.checks:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(left()):
                    await check.aclose()
        if self._owns_backend:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(left()):
                    await self.backend.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=left())
        self._emit(RegistrarEventKind.STOPPED, "")

    def status(self) -> dict[str, Any]:
        """A JSON-ready view: state, registry view, checks' last results, last error, counters.

        ``registered``: the registry holds our entry (False once renewals have
        failed for a TTL). ``registry_status``: our entry's health as the
        registry reports it (None when not registered), ``registry_note`` its
        note when not passing. ``ready``: the registry holds our entry as
        passing; ``not_ready_reason`` says why not (None when ready).
        """
        ready, reason = self._readiness()
        registered = self.registered
        seen = self._seen
        shown = seen.status if seen is not None else self._actual
        return {
            "service": self.instance.service,
            "instance": self.instance.id,
            "backend": self._backend_name,
            "state": str(self.state),
            "registered": registered,
            "registry_status": str(shown) if registered and shown is not None else None,
            "registry_note": (
                scrub_credentials(seen.note)
                if registered and seen is not None and not seen.healthy
                else None
            ),
            "ready": ready,
            "not_ready_reason": reason,
            "last_heartbeat": self._heartbeat_time(),
            "last_error": self._last_error,
            "checks": {
                check.name: {
                    "up": self.gate.check_up(check.name),
                    **(self._results[check.name].to_dict() if check.name in self._results else {}),
                }
                for check in self.checks
            },
            "counters": {name: getattr(self.counters, name) for name in self.counters.__slots__},
        }

    def _heartbeat_time(self) -> float | None:
        lease = self._lease
        if lease is not None and lease.shared and isinstance(self.backend, SharedLiveness):
            self._last_heartbeat = self.backend.last_renewal(lease) or self._last_heartbeat
        return self._last_heartbeat

    def _readiness(self) -> tuple[bool, str | None]:
        if self._stopping or self.state is GateState.STOPPED:
            return False, "stopped"
        if not self.registered:
            if self._rejection is not None:
                return False, f"rejected by the registry: {self._rejection}"
            if self.state is GateState.STARTING:
                return False, "health checks have not passed yet"
            if self.state is GateState.WITHDRAWN:
                return False, "withdrawn: " + self._failing_checks()
            if self._lost_reason is not None:
                again = self._last_error
                more = (
                    f"; registering again: {again}" if again and again != self._lost_reason else ""
                )
                return False, f"entry lost ({self._lost_reason}){more}"
            if self._last_error:
                return False, f"not registered: {self._last_error}"
            return False, "not registered yet"
        if self.state is GateState.WITHDRAWN:
            return False, "held critical: " + self._failing_checks()
        seen = self._seen
        if seen is not None and not seen.healthy:
            note = scrub_credentials(seen.note)
            return False, f"the registry holds our entry as {seen.status}" + (
                f": {note}" if note else ""
            )
        if self._actual is not HealthStatus.PASSING:
            return False, f"the registry holds our entry as {self._actual}"
        return True, None

    async def __aenter__(self) -> AsyncRegistrar:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"AsyncRegistrar({self.instance.service}/{self.instance.id}, state={self.state})"

    # -- checks -----------------------------------------------------------------------

    async def _run_check(self, check: HealthCheck) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started = loop.time()
            result = await check.run()
            self._results[check.name] = result
            if self.on_check is not None:
                try:
                    self.on_check(check, result)
                except Exception:
                    log.exception("on_check callback failed", extra=self._extra("callback_failed"))
            was_up = self.gate.check_up(check.name)
            changed = self.gate.observe(check.name, result.ok)
            if was_up != self.gate.check_up(check.name):
                log.info(
                    "check %s is %s: %s",
                    check.name,
                    "up" if result.ok else "down",
                    scrub_credentials(result.detail),
                    extra=self._extra("check_up" if result.ok else "check_down"),
                )
            if changed is not None:
                why = f"check {check.name}: {result.detail}"
                self._emit(RegistrarEventKind.STATE_CHANGED, why)
                self._wake_up()
            await asyncio.sleep(max(0.0, check.interval - (loop.time() - started)))

    # -- reconciliation ----------------------------------------------------------------

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _lapsed(self) -> bool:
        return self._expires_at is not None and self._clock() >= self._expires_at

    async def _sleep(self, seconds: float | None) -> None:
        assert self._wake is not None
        if self._stopping:
            return
        started = self._clock()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        self._wake.clear()
        if seconds is not None:
            self._notice_blocked_loop(self._clock() - started - seconds)

    def _notice_blocked_loop(self, late: float) -> None:
        # Woken this late, the loop (or the whole process) was stalled at least
        # that long; add the up-to-one heartbeat since the last renewal and the
        # TTL may have run out in the registry.
        if late >= self.ttl - self.heartbeat_interval:
            log.warning(
                "%s: the event loop was blocked (or the process frozen) for at least %.1fs "
                "(TTL %gs): the registry may have dropped our entry; something is "
                "blocking the event loop",
                self.instance.id,
                late,
                self.ttl,
                extra=self._extra("loop_blocked", blocked=round(late, 3)),
            )

    async def _reconcile(self) -> None:
        while not self._stopping:
            desired = desired_registration(self.gate.state, self.on_unhealthy)
            now = self._clock()
            step, wake_at = next_step(
                desired,
                self._actual,
                now=now,
                heartbeat_due=self._heartbeat_due,
                verify_due=self._verify_due,
                expires_at=self._expires_at,
                stale_lease=self._stale is not None,
            )
            if step is Step.IDLE:
                forever = wake_at is None or math.isinf(wake_at)
                await self._sleep(None if wake_at is None or forever else max(0.0, wake_at - now))
                continue
            if step is Step.EXPIRED:
                self._expired()
                continue
            if step is Step.RELEASE:
                await self._release()
                continue
            try:
                await self._do(step, desired.status, now)
            except LeaseLost as exc:
                # Register again at once; only a loss that keeps coming back waits.
                # An entry that verification found missing or changed may still
                # hold a live lease: release it first, so no orphan stays a TTL.
                self._unreachable = 0
                self._lost(str(exc), stale=step is Step.VERIFY)
                if now - self._registered_at > self.heartbeat_interval:
                    self._losses_in_row = 0  # it held for a while: this loss is news
                self._losses_in_row += 1
                if self._losses_in_row > 1:
                    await self._sleep(self.retry.delay(self._losses_in_row - 1))
            except Exception as exc:  # never give up: every error is retried
                await self._failed(step, self._registry_error(exc))
            else:
                self._succeeded(step)

    async def _failed(self, step: Step, error: RegistryError) -> None:
        assert self._rejected is not None
        self._failures += 1
        self.counters.errors += 1
        if step is Step.HEARTBEAT:
            self.counters.heartbeats_failed += 1
        self._last_error = scrub_credentials(str(error))
        if self._failures == 1:
            self._emit(RegistrarEventKind.BACKEND_UNAVAILABLE, self._last_error)
        self._log_failure(step.value, error)
        if step is Step.VERIFY:
            # A read that fails must not starve the heartbeats that keep the
            # entry alive (e.g. reads refused, keepalives still accepted).
            self._verify_due = self._clock() + self.heartbeat_interval
        if isinstance(error, Rejected):
            # No retry can fix it as is; an operator may (permissions): retry slowly.
            self._unreachable = 0
            self._rejection = error
            self._rejected.set()
            delay = self.retry.slowest()
        elif isinstance(error, Throttled):
            # It answered: it is up. Come back when it says, not after a growing backoff.
            self._unreachable = 0
            delay = self.retry.answered(self._failures, error.retry_after)
        else:
            self._unreachable += 1
            delay = self.retry.delay(self._unreachable)
        if self._actual is not None and self._expires_at is not None:
            delay = min(delay, max(0.0, self._expires_at - self._clock()))
        await self._sleep(delay)

    def _succeeded(self, step: Step) -> None:
        if step in (Step.HEARTBEAT, Step.VERIFY):
            self._losses_in_row = 0  # the entry held: a later loss is news
        if self._failures:
            self._emit(RegistrarEventKind.BACKEND_RECOVERED, f"after {step.value}")
            self._failures = 0
        self._episode = None
        self._unreachable = 0
        self._last_error = None
        if self._rejection is not None:
            self._rejection = None
            if self._rejected is not None:
                self._rejected.clear()

    async def _do(self, step: Step, wanted: HealthStatus | None, started: float) -> None:
        backend = self.backend
        if step is Step.REGISTER:
            assert wanted is not None
            note = "" if wanted is HealthStatus.PASSING else "unhealthy: " + self._failing_checks()
            register = (
                backend.register_shared if isinstance(backend, SharedLiveness) else backend.register
            )
            self._lease = await register(
                self.instance,
                ttl=self.ttl,
                status=wanted,
                note=note,
                deregister_critical_after=self.deregister_critical_after,
            )
            now = self._clock()
            self._follow(self._lease)
            shared = self._lease.shared
            self._expires_at = None if shared else started + self.ttl
            self._seen = None
            self._just_wrote = False
            self._set_actual(wanted)
            self._registered_at = now
            self._heartbeat_due = math.inf if shared else now + self.heartbeat_interval
            # Someone else held our entry critical before: see at once whether they still do.
            self._verify_due = now if self._external else self._next_verify(now)
            self._last_heartbeat = time.time()
            self._lost_reason = None
            if self._lost_entry:
                self._lost_entry = False
                self.counters.reregistrations += 1
                self._emit(RegistrarEventKind.REREGISTERED, str(wanted))
            else:
                self.counters.registrations += 1
                self._emit(RegistrarEventKind.REGISTERED, str(wanted))
        elif step is Step.DEREGISTER:
            assert self._lease is not None
            await backend.deregister(self._lease)
            self._drop_lease()
            self._expires_at = None
            self._seen = None
            self._set_actual(None)
            self.counters.deregistrations += 1
            self._emit(RegistrarEventKind.DEREGISTERED, "unhealthy: " + self._failing_checks())
        elif step is Step.SET_STATUS:
            assert self._lease is not None
            assert wanted is not None
            note = "" if wanted is HealthStatus.PASSING else "unhealthy: " + self._failing_checks()
            await backend.set_status(self._lease, wanted, note)
            self._set_actual(wanted)
            # Read it back at once: the registry may hold it otherwise (Consul
            # maintenance mode, a node check). A status write does not renew an
            # etcd lease, so it does not count as a heartbeat.
            self._just_wrote = True
            self._verify_due = self._clock()
            self._emit(RegistrarEventKind.STATUS_CHANGED, str(wanted))
        elif step is Step.VERIFY:
            assert self._lease is not None
            found = await backend.lookup(self._lease)
            self.counters.verifications += 1
            self._verify_due = self._next_verify(self._clock())
            if found is None:
                raise LeaseLost(
                    "our entry is missing from the registry",
                    service=self.instance.service,
                    instance=self.instance.id,
                    backend=self._backend_name,
                )
            if found.instance != self.instance:
                raise LeaseLost(
                    "our entry was changed by someone else",
                    service=self.instance.service,
                    instance=self.instance.id,
                    backend=self._backend_name,
                )
            self._read_back(found)
        elif step is Step.HEARTBEAT:
            assert self._lease is not None
            await backend.heartbeat(self._lease)
            self.counters.heartbeats_ok += 1
            if self._lease.shared:
                # Answered from the backend's memory: its shared renewal is fine.
                self._heartbeat_due = math.inf
            else:
                self._expires_at = started + self.ttl
                self._last_heartbeat = time.time()
                self._heartbeat_due = self._clock() + self.heartbeat_interval

    def _next_verify(self, now: float) -> float:
        """When to read our entry back next: never on our own for a shared lease."""
        return (
            math.inf
            if self._lease is not None and self._lease.shared
            else now + self.verify_interval
        )

    def _follow(self, lease: Lease) -> None:
        self._unfollow_lease()
        if lease.shared and isinstance(self.backend, SharedLiveness):
            self._unfollow = self.backend.follow(lease, self._on_news)

    def _unfollow_lease(self) -> None:
        unfollow, self._unfollow = self._unfollow, None
        if unfollow is not None:
            unfollow()

    def _drop_lease(self) -> None:
        self._unfollow_lease()
        self._lease = None

    def _on_news(self, news: LivenessNews) -> None:
        # The shared renewal or verification concerns us: act on it now.
        if news is LivenessNews.RENEWAL:
            self._heartbeat_due = self._clock()
        else:
            self._verify_due = self._clock()
        self._wake_up()

    def _read_back(self, found: InstanceHealth) -> None:
        """Compare our entry's health in the registry with the status we wrote."""
        just_wrote, self._just_wrote = self._just_wrote, False
        before, self._seen = self._seen, found
        if found.status is self._actual:
            if self._external is not None:
                self._external = None
                log.info(
                    "%s: the registry holds our entry as %s again",
                    self.instance.id,
                    found.status,
                    extra=self._extra("registry_status", status=str(found.status)),
                )
            return
        if not just_wrote and (before is None or before.status is not found.status):
            # e.g. our TTL check turned critical while we were frozen: write our
            # status again (SET_STATUS comes next), then read it back.
            self._set_actual(found.status)
            return
        # The registry says otherwise right after we wrote our status, or still
        # says what it said last time: someone else holds it so (maintenance
        # mode, a node check, another check). Report it; rewriting won't help.
        if self._external is not found.status:
            self._external = found.status
            log.warning(
                "%s: the registry holds our entry as %s although we set it %s: %s",
                self.instance.id,
                found.status,
                self._actual,
                scrub_credentials(found.note) or "no note",
                extra=self._extra("registry_status", status=str(found.status)),
            )

    async def _release(self) -> None:
        lease, self._stale = self._stale, None
        if lease is None:
            return
        try:
            async with asyncio.timeout(min(_RELEASE_TIMEOUT, max(0.5, self.heartbeat_interval))):
                await self.backend.deregister(lease)
        except Exception as exc:  # best effort: an unreleased lease expires with its TTL
            log.debug(
                "%s: releasing the abandoned lease failed: %s",
                self.instance.id,
                self._registry_error(exc),
                extra=self._extra("release_failed"),
            )

    async def _watch_connection(self) -> None:
        # The registry went away or came back: check our entry now, not at the
        # next heartbeat, and cut short any backoff sleep.
        wait = self.backend.wait_connection_change  # type: ignore[attr-defined]
        while not self._stopping:
            try:
                await wait()
            except Exception as exc:
                log.debug(
                    "connection probe failed: %s",
                    self._registry_error(exc),
                    extra=self._extra("probe_failed"),
                )
                await asyncio.sleep(1.0)
                continue
            self._verify_due = self._clock()
            self._wake_up()

    def _expired(self) -> None:
        why = (
            f"no heartbeat succeeded for {self.ttl:g}s (the TTL): the registry no longer "
            "holds our entry as alive"
        )
        if self._last_error:
            why += f"; last error: {self._last_error}"
        self._lost(why, stale=True)

    def _lost(self, why: str, *, stale: bool) -> None:
        self.counters.lease_losses += 1
        self._lost_entry = True
        # A shared lease stays the backend's to keep or revoke: only ours may be orphaned.
        if stale and self._lease is not None and not self._lease.shared:
            self._stale = self._lease
        self._drop_lease()
        self._expires_at = None
        self._seen = None
        self._set_actual(None)
        self._last_error = self._lost_reason = scrub_credentials(why)
        self._emit(RegistrarEventKind.LEASE_LOST, self._last_error)

    def _set_actual(self, status: HealthStatus | None) -> None:
        self._actual = status
        if self._registered is not None:
            if status is None:
                self._registered.clear()
            else:
                self._registered.set()

    def _failing_checks(self) -> str:
        failing = [
            f"{name}: {result.detail}"
            for name, result in self._results.items()
            if not self.gate.check_up(name)
        ]
        # This note is written into the registry, readable by anyone who can read it.
        return scrub_credentials("; ".join(failing)) or "checks not passing"

    def _registry_error(self, exc: BaseException) -> RegistryError:
        """``exc`` itself when it is a RegistryError, else wrapped as BackendUnavailable."""
        if isinstance(exc, RegistryError):
            return exc
        wrapped = BackendUnavailable(
            f"unexpected {type(exc).__name__}: {exc}",
            service=self.instance.service,
            instance=self.instance.id,
            backend=self._backend_name,
        )
        wrapped.__cause__ = exc
        return wrapped

    # -- events and logs -----------------------------------------------------------------

    def _extra(self, event: str, **more: Any) -> dict[str, Any]:
        return {
            "event": event,
            "service": self.instance.service,
            "instance": self.instance.id,
            "backend": self._backend_name,
            **more,
        }

    def _emit(self, kind: RegistrarEventKind, detail: str) -> None:
        detail = scrub_credentials(detail)
        event = RegistrarEvent(kind, self.instance, self.state, detail)
        if kind is not RegistrarEventKind.BACKEND_UNAVAILABLE:
            level = logging.WARNING if kind is RegistrarEventKind.LEASE_LOST else logging.INFO
            log.log(
                level,
                "%s %s: %s%s",
                self.instance.id,
                kind.value,
                self.state,
                f" ({detail})" if detail else "",
                extra=self._extra(kind.value, state=str(self.state)),
            )
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("on_event callback failed", extra=self._extra("callback_failed"))

    def _log_failure(self, action: str, error: RegistryError, *, force: bool = False) -> None:
        """Log a failure once per episode (a kind of failure in a row).

        Rejected is logged at ERROR, throttling and an unreachable registry at
        WARNING; an unreachable registry is recalled every 30 s, the rest at DEBUG.
        """
        if isinstance(error, Rejected):
            kind, level = "rejected", logging.ERROR
        elif isinstance(error, Throttled):
            kind, level = "throttled", logging.WARNING
        else:
            kind, level = "unavailable", logging.WARNING
        now = time.monotonic()
        if not force:
            if kind == self._episode and not (
                kind == "unavailable" and now - self._last_failure_log >= _REPEAT_LOG_EVERY
            ):
                level = logging.DEBUG
            else:
                self._episode = kind
                self._last_failure_log = now
        if force:
            self._last_error = scrub_credentials(str(error))
        how = {
            "rejected": "no retry can fix this as is; retrying every "
            f"{self.retry.cap:g}s in case it is fixed",
            "throttled": "the registry is shedding load; retrying when it says",
            "unavailable": "retrying with backoff",
        }[kind]
        repeat = f" (failure {self._failures}, {how})" if not force else ""
        log.log(
            level,
            "%s %s failed: %s%s",
            self.instance.id,
            action,
            scrub_credentials(str(error)),
            repeat,
            extra=self._extra(f"{action}_failed", error=str(error), failures=self._failures),
            exc_info=error.__cause__ if level == logging.DEBUG and error.__cause__ else None,
        )

    # -- signals -----------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, self._on_signal, sig, previous)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread, or no signal support
            self._signals.append((sig, previous))

    def _remove_signal_handlers(self) -> None:
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            for sig, _ in self._signals:
                loop.remove_signal_handler(sig)
        self._signals.clear()

    def _on_signal(self, sig: int, previous: Any) -> None:
        async def stop_then_chain() -> None:
            await self.stop()
            chain_signal(sig, previous)

        asyncio.get_running_loop().create_task(stop_then_chain())


def chain_signal(sig: int, previous: Any) -> None:
    """After our cleanup, hand a signal on as if we had not caught it."""
    if callable(previous):
        previous(sig, None)
    elif previous != signal.SIG_IGN:
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
