"""AsyncRegistrar: keeps one instance registered while it is healthy, whatever happens."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from registry_agent._backend import Backend, Lease
from registry_agent._errors import ConfigError, LeaseLost, RegistryError, Rejected
from registry_agent._health.checks import CheckResult, HealthCheck, as_check
from registry_agent._health.gate import (
    GateState,
    HealthGate,
    OnUnhealthy,
    desired_registration,
)
from registry_agent._models import HealthStatus, ServiceInstance
from registry_agent._plugins import open_backend
from registry_agent._reconcile import Step, next_step
from registry_agent._retry import RetryPolicy

__all__ = ["AsyncRegistrar", "RegistrarEvent", "RegistrarEventKind", "RegistrationTimeout"]

log = logging.getLogger("registry_agent.registrar")

# A failure that goes on is logged again at most this often.
_REPEAT_LOG_EVERY = 30.0


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
    jittered backoff, forever. ``on_event`` is called (on the event loop) for
    every :class:`RegistrarEvent`, ``on_check`` for every check result.
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
        deregister_critical_after: float = 60.0,
        retry: RetryPolicy | None = None,
        on_event: Callable[[RegistrarEvent], None] | None = None,
        on_check: Callable[[HealthCheck, CheckResult], None] | None = None,
        install_signal_handlers: bool = False,
    ) -> None:
        if not isinstance(instance, ServiceInstance):
            raise ConfigError(f"expected a ServiceInstance, got {instance!r}", field="instance")
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0:
            raise ConfigError(f"expected seconds above zero, got {ttl!r}", field="ttl")
        beat = ttl / 3 if heartbeat is None else heartbeat
        if isinstance(beat, bool) or not isinstance(beat, int | float) or beat <= 0:
            raise ConfigError(f"expected seconds above zero, got {heartbeat!r}", field="heartbeat")
        if beat > ttl / 3 + 1e-9:
            raise ConfigError(
                f"must be at most ttl/3 ({ttl / 3:g}s) so two heartbeats can fail "
                f"before the TTL runs out, got {beat:g}s",
                field="heartbeat",
            )
        if deregister_critical_after < 60:
            raise ConfigError(
                f"Consul's floor is 60s, got {deregister_critical_after:g}s",
                field="deregister_critical_after",
            )
        self.instance = instance
        self.ttl = float(ttl)
        self.heartbeat_interval = float(beat)
        self.verify_interval = self.ttl
        self.on_unhealthy = _as_on_unhealthy(on_unhealthy)
        self.deregister_critical_after = float(deregister_critical_after)
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

        self._lease: Lease | None = None
        self._actual: HealthStatus | None = None
        self._lost_entry = False
        self._heartbeat_due = 0.0
        self._verify_due = 0.0
        self._failures = 0
        self._losses_in_row = 0
        self._registered_at = 0.0
        self._last_failure_log = 0.0
        self._last_error: str | None = None
        self._last_heartbeat: float | None = None
        self._results: dict[str, CheckResult] = {}
        self.counters = _Counters()
        self._wake: asyncio.Event | None = None
        self._registered: asyncio.Event | None = None
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
        """True while the registry holds our entry (passing or critical)."""
        return self._actual is not None

    async def start(self, *, wait_registered: float | None = None) -> None:
        """Start checks and registration in the background and return at once.

        With ``wait_registered``, wait up to that many seconds for the entry to
        be in the registry; on timeout, stop and raise :class:`RegistrationTimeout`.
        """
        if self._started:
            raise RuntimeError("a registrar can be started once")
        self._started = True
        self._wake = asyncio.Event()
        self._registered = asyncio.Event()
        for check in self.checks:
            self._tasks.append(asyncio.create_task(self._run_check(check), name=check.name))
        self._reconciler = asyncio.create_task(self._reconcile(), name="registrar")
        if hasattr(self.backend, "wait_connection_change"):
            self._tasks.append(asyncio.create_task(self._watch_connection(), name="probe"))
        if self.install_signal_handlers:
            self._install_signal_handlers()
        if wait_registered is not None:
            try:
                async with asyncio.timeout(wait_registered):
                    await self._registered.wait()
            except TimeoutError:
                why = self._last_error or f"health gate is {self.state}"
                await self.stop()
                raise RegistrationTimeout(
                    f"not registered within {wait_registered:g}s: {why}",
                    service=self.instance.service,
                    instance=self.instance.id,
                    backend=self._backend_name,
                ) from None

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

        Hanging checks are abandoned; a registry that does not answer in time
        leaves the entry to expire with its TTL.
        """
        if self._stopping:
            return
        self._stopping = True
        deadline = time.monotonic() + timeout
        self._remove_signal_handlers()
        for task in self._tasks:
            task.cancel()
        if self._reconciler is not None:
            self._wake_up()
            # Let an operation in flight finish, so we know what the registry holds.
            done, _ = await asyncio.wait({self._reconciler}, timeout=timeout / 2)
            if not done:
                self._reconciler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reconciler
        changed = self.gate.stop()
        if changed is not None:
            self._emit(RegistrarEventKind.STATE_CHANGED, "stopping")
        if self._lease is not None:
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    await self.backend.deregister(self._lease)
                self._set_actual(None)
                self.counters.deregistrations += 1
                self._emit(RegistrarEventKind.DEREGISTERED, "stopped")
            except (RegistryError, TimeoutError) as exc:
                self._log_failure("deregister_failed", exc, force=True)
        for check in self.checks:
            with contextlib.suppress(Exception):
                await check.aclose()
        if self._owns_backend:
            with contextlib.suppress(Exception):
                await self.backend.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._emit(RegistrarEventKind.STOPPED, "")

    def status(self) -> dict[str, Any]:
        """A JSON-ready view: state, checks' last results, heartbeat, last error, counters."""
        return {
            "service": self.instance.service,
            "instance": self.instance.id,
            "backend": self._backend_name,
            "state": str(self.state),
            "registered": self.registered,
            "registry_status": str(self._actual) if self._actual else None,
            "last_heartbeat": self._last_heartbeat,
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
                    result.detail,
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

    async def _sleep(self, seconds: float | None) -> None:
        assert self._wake is not None
        if self._stopping:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        self._wake.clear()

    async def _reconcile(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            desired = desired_registration(self.gate.state, self.on_unhealthy)
            step, wake_at = next_step(
                desired,
                self._actual,
                now=loop.time(),
                heartbeat_due=self._heartbeat_due,
                verify_due=self._verify_due,
            )
            if step is Step.IDLE:
                await self._sleep(None if wake_at is None else max(0.0, wake_at - loop.time()))
                continue
            try:
                await self._do(step, desired.status, loop.time)
            except LeaseLost as exc:
                # Register again at once; only a loss that keeps coming back waits.
                self._lost(str(exc))
                if loop.time() - self._registered_at > self.heartbeat_interval:
                    self._losses_in_row = 0  # it held for a while: this loss is news
                self._losses_in_row += 1
                if self._losses_in_row > 1:
                    await self._sleep(self.retry.delay(self._losses_in_row - 1))
            except Exception as exc:  # never give up: every error is retried
                self._failures += 1
                self.counters.errors += 1
                if step is Step.HEARTBEAT:
                    self.counters.heartbeats_failed += 1
                self._last_error = str(exc)
                if self._failures == 1:
                    self._emit(RegistrarEventKind.BACKEND_UNAVAILABLE, str(exc))
                self._log_failure(step.value, exc)
                await self._sleep(self.retry.delay(self._failures))
            else:
                if step in (Step.HEARTBEAT, Step.VERIFY):
                    self._losses_in_row = 0  # the entry held: a later loss is news
                if self._failures:
                    self._emit(RegistrarEventKind.BACKEND_RECOVERED, f"after {step.value}")
                    self._failures = 0
                self._last_error = None

    async def _do(self, step: Step, wanted: HealthStatus | None, now: Callable[[], float]) -> None:
        backend = self.backend
        if step is Step.REGISTER:
            assert wanted is not None
            note = "" if wanted is HealthStatus.PASSING else "unhealthy: " + self._failing_checks()
            self._lease = await backend.register(
                self.instance,
                ttl=self.ttl,
                status=wanted,
                note=note,
                deregister_critical_after=self.deregister_critical_after,
            )
            self._set_actual(wanted)
            self._registered_at = now()
            self._heartbeat_due = now() + self.heartbeat_interval
            self._verify_due = now() + self.verify_interval
            self._last_heartbeat = time.time()
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
            self._lease = None
            self._set_actual(None)
            self.counters.deregistrations += 1
            self._emit(RegistrarEventKind.DEREGISTERED, "unhealthy: " + self._failing_checks())
        elif step is Step.SET_STATUS:
            assert self._lease is not None
            assert wanted is not None
            note = "" if wanted is HealthStatus.PASSING else "unhealthy: " + self._failing_checks()
            await backend.set_status(self._lease, wanted, note)
            self._set_actual(wanted)
            self._heartbeat_due = now() + self.heartbeat_interval
            self._emit(RegistrarEventKind.STATUS_CHANGED, str(wanted))
        elif step is Step.VERIFY:
            assert self._lease is not None
            found = await backend.lookup(self._lease)
            self.counters.verifications += 1
            self._verify_due = now() + self.verify_interval
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
            if found.status is not self._actual:
                # e.g. Consul turned our check critical while we were frozen.
                self._set_actual(found.status)
        elif step is Step.HEARTBEAT:
            assert self._lease is not None
            await backend.heartbeat(self._lease)
            self.counters.heartbeats_ok += 1
            self._last_heartbeat = time.time()
            self._heartbeat_due = now() + self.heartbeat_interval

    async def _watch_connection(self) -> None:
        # The registry went away or came back: check our entry now, not at the
        # next heartbeat, and cut short any backoff sleep.
        wait = self.backend.wait_connection_change  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                await wait()
            except Exception as exc:
                log.debug("connection probe failed: %s", exc, extra=self._extra("probe_failed"))
                await asyncio.sleep(1.0)
                continue
            self._verify_due = loop.time()
            self._wake_up()

    def _lost(self, why: str) -> None:
        self.counters.lease_losses += 1
        self._lost_entry = True
        self._lease = None
        self._set_actual(None)
        self._last_error = why
        self._emit(RegistrarEventKind.LEASE_LOST, why)

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
        return "; ".join(failing) or "checks not passing"

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

    def _log_failure(self, action: str, exc: BaseException, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and self._failures > 1 and now - self._last_failure_log < _REPEAT_LOG_EVERY:
            return
        self._last_failure_log = now
        level = logging.ERROR if isinstance(exc, Rejected) else logging.WARNING
        repeat = f" (failure {self._failures}, retrying with backoff)" if self._failures > 1 else ""
        log.log(
            level,
            "%s %s failed: %s%s",
            self.instance.id,
            action,
            exc,
            repeat,
            extra=self._extra(f"{action}_failed", error=str(exc), failures=self._failures),
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
