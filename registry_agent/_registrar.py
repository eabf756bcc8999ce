"""AsyncRegistrar: keeps one instance registered while it is healthy, whatever happens."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Unpack

from registry_agent._backend import Backend, Lease, LivenessNews, SharedLiveness
from registry_agent._connection import follow_connection
from registry_agent._errors import BackendUnavailable, ConfigError, RegistryError
from registry_agent._fork import ForkGuard
from registry_agent._health.checks import CheckResult, HealthCheck, as_check
from registry_agent._health.gate import Desired, GateState, HealthGate, desired_registration
from registry_agent._models import InstanceHealth, ServiceInstance
from registry_agent._options import HEARTBEAT_FLOOR, TTL_FLOOR, OptionArgs, RegistrationOptions
from registry_agent._plugins import open_backend
from registry_agent._probe import ConnectionAware
from registry_agent._reconcile import Step
from registry_agent._registration import (
    Change,
    Event,
    Failed,
    HeldElsewhere,
    RegistrarEventKind,
    Registration,
    Renewed,
    Sleep,
    failure_kind,
    scrub_credentials,
)
from registry_agent._status import CheckStatus, RegistrationStatus, frozen_mapping

__all__ = [
    "HEARTBEAT_FLOOR",
    "TTL_FLOOR",
    "AsyncRegistrar",
    "RegistrarArgs",
    "RegistrarEvent",
    "RegistrarEventKind",
    "RegistrationTimeout",
    "scrub_credentials",
]

log = logging.getLogger("registry_agent.registrar")

# Releasing a lease we abandoned is best effort: never wait longer than this for it.
_RELEASE_TIMEOUT = 2.0


def _accepts(function: Callable[..., Any], keyword: str) -> bool:
    """Whether ``function`` takes ``keyword`` (older backends' hooks may not)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == keyword or p.kind is p.VAR_KEYWORD for p in parameters)


class RegistrationTimeout(RegistryError, TimeoutError):
    """``start(wait_registered=…)`` ran out of time before the instance was registered."""


@dataclass(frozen=True, slots=True)
class RegistrarEvent:
    """One state change of a registrar, as given to ``on_event``."""

    kind: RegistrarEventKind
    instance: ServiceInstance
    state: GateState
    detail: str = ""
    at: float = field(default_factory=time.time)


class RegistrarArgs(OptionArgs, total=False):
    """Every keyword of :class:`AsyncRegistrar` and :class:`~registry_agent.Registrar`."""

    checks: Iterable[HealthCheck | Callable[[], Any]]
    on_event: Callable[[RegistrarEvent], None] | None
    on_check: Callable[[HealthCheck, CheckResult], None] | None
    install_signal_handlers: bool
    #: True: on a backend that shares liveness, ride its shared heartbeat (see AsyncRegistrar).
    shared_liveness: bool
    #: A prebuilt options value; option keywords given beside it override its fields.
    options: RegistrationOptions


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

    Keywords (:class:`RegistrarArgs`): ``ttl=10.0``, ``heartbeat=None`` (``ttl / 3``),
    ``checks=()``, ``fall=3``, ``rise=2``, ``on_unhealthy="deregister"``,
    ``deregister_critical_after=None`` (the backend's own setting; Consul's floor
    is 60 s), ``retry=None`` (:class:`RetryPolicy` defaults), ``on_event``,
    ``on_check``, ``install_signal_handlers=False``, ``shared_liveness=False``, and ``options``: a
    :class:`RegistrationOptions` holding the option keywords at once (keywords
    given beside it override it). ``ttl`` is at least :data:`TTL_FLOOR` (1 s) and
    ``heartbeat`` at least :data:`HEARTBEAT_FLOOR` (0.25 s), at most ``ttl / 3``.

    With ``shared_liveness=True`` and a backend that has the
    :class:`~registry_agent._backend.SharedLiveness` capability, the entry lives
    on the heartbeat the backend shares among all its registrations of the same
    TTL: one renewal every ``ttl / 3`` and one read per TTL for all of them, so
    this registrar runs no timers of its own and acts on the backend's news
    (a heartbeat answered from memory, or a read of its entry). That is what a process with
    many registrations on one backend object wants (the agent). By default, and
    on other backends, it keeps a lease of its own, renewed and read back here.
    """

    def __init__(
        self,
        backend: str | Backend,
        instance: ServiceInstance,
        **kwargs: Unpack[RegistrarArgs],
    ) -> None:
        if not isinstance(instance, ServiceInstance):
            raise ConfigError(f"expected a ServiceInstance, got {instance!r}", field="instance")
        args: dict[str, Any] = dict(kwargs)
        checks: Iterable[HealthCheck | Callable[[], Any]] = args.pop("checks", ())
        on_event: Callable[[RegistrarEvent], None] | None = args.pop("on_event", None)
        on_check: Callable[[HealthCheck, CheckResult], None] | None = args.pop("on_check", None)
        install_signal_handlers: bool = args.pop("install_signal_handlers", False)
        shared_liveness: bool = args.pop("shared_liveness", False)
        options = RegistrationOptions.build(args, args.pop("options", None))
        self.instance = instance
        #: Every registration option, validated.
        self.options = options
        self.ttl = options.ttl
        self.heartbeat_interval = options.heartbeat_interval
        self.verify_interval = options.verify_interval
        self.on_unhealthy = options.on_unhealthy
        #: None: the backend's own setting (e.g. ``consul://…?deregister_critical_after=5m``).
        self.deregister_critical_after = options.deregister_critical_after
        self.retry = options.retry
        self.on_event = on_event
        self.on_check = on_check
        self.install_signal_handlers = install_signal_handlers
        self.checks = [as_check(c) for c in checks]
        names = [c.name for c in self.checks]
        if len(set(names)) != len(names):
            raise ConfigError(f"check names must be unique, got {names}", field="checks")
        self.gate = HealthGate(names, rise=options.rise, fall=options.fall)
        # Opening a backend creates no connection: clients appear on first use,
        # inside the process that runs start() (after a fork, not before).
        self._owns_backend = isinstance(backend, str)
        self.backend: Backend = open_backend(backend) if isinstance(backend, str) else backend
        self._backend_name = getattr(type(self.backend), "scheme", type(self.backend).__name__)
        self._shares_liveness = shared_liveness and isinstance(self.backend, SharedLiveness)
        # Set while a backend that shares liveness tells us about our lease.
        self._unfollow: Callable[[], None] | None = None
        self._followed: Lease | None = None

        self._fork = ForkGuard(f"AsyncRegistrar({instance.service}/{instance.id})")
        # The running loop's clock once started (time.monotonic for asyncio's own loops).
        self._clock: Callable[[], float] = time.monotonic

        #: The healing decisions and what the registry holds (no I/O).
        self._reg = Registration(options, instance, self._backend_name)
        self.counters = self._reg.counters
        self._last_heartbeat: float | None = None
        self._results: dict[str, CheckResult] = {}
        self._wake: asyncio.Event | None = None
        self._registered: asyncio.Event | None = None
        self._rejected: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reconciler: asyncio.Task[None] | None = None
        self._unfollow_connection: Callable[[], None] = lambda: None
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
        return self._reg.registered(self._clock())

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
        await self.validate()
        # Created in a gunicorn master (preload) and started in a worker: the
        # registration is the worker's, so the worker's stop() must deregister.
        self._fork = ForkGuard(self._fork.what)
        self._started = True
        self._clock = asyncio.get_running_loop().time
        self._wake = asyncio.Event()
        self._registered = asyncio.Event()
        self._rejected = asyncio.Event()
        for check in self.checks:
            self._tasks.append(asyncio.create_task(self._run_check(check), name=check.name))
        self._reconciler = asyncio.create_task(self._reconcile(), name="registrar")
        if isinstance(self.backend, ConnectionAware):
            self._unfollow_connection = follow_connection(self.backend, self._connection_changed)
        if self.install_signal_handlers:
            self._install_signal_handlers()
        if wait_registered is not None:
            await self._wait_started(wait_registered)

    async def validate(self) -> None:
        """Check the instance and the options against what the backend documents it
        accepts, without I/O: the backend's optional ``validate(instance)`` and
        ``validate_options(ttl=…, deregister_critical_after=…[, on_unhealthy=…])``
        (Consul's 60 s floor; an etcd format that carries no health refuses "critical").
        Raises :class:`~registry_agent.Rejected` or :class:`~registry_agent.ConfigError`
        naming the field; :meth:`start` runs it first."""
        validate = getattr(self.backend, "validate", None)
        if validate is not None:
            result = validate(self.instance)
            if inspect.isawaitable(result):
                await result
        validate_options = getattr(self.backend, "validate_options", None)
        if validate_options is not None:
            given: dict[str, Any] = {
                "ttl": self.options.ttl,
                "deregister_critical_after": self.options.deregister_critical_after,
            }
            if _accepts(validate_options, "on_unhealthy"):
                given["on_unhealthy"] = str(self.options.on_unhealthy)
            result = validate_options(**given)
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
        rejection = self._reg.rejection
        why = self._reg.last_error or f"health gate is {self.state}"
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
        self._unfollow_connection()
        if self._unfollow is not None:
            self._unfollow()
            self._unfollow = None
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
        reg = self._reg
        if reg.stale is not None and reg.stale != reg.lease:
            await self._release()
        if reg.lease is not None:
            try:
                async with asyncio.timeout(left()):
                    await self.backend.deregister(reg.lease)
            except Exception as exc:
                self._log_failure("deregister", self._registry_error(exc), force=True)
            else:
                self._publish(reg.deregistered_on_stop())
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

    def snapshot(self) -> RegistrationStatus:
        """This registration's state now, as one typed value (``status()`` is its dict).

        ``registered``: the registry holds our entry (False once renewals have
        failed for a TTL). ``registry_status``: our entry's health as the
        registry reports it (None when not registered), ``registry_note`` its
        note when not passing. ``ready``: the registry holds our entry as
        passing; ``not_ready_reason`` says why not (None when ready).
        """
        ready, reason = self._readiness()
        registered = self.registered
        seen = self._reg.seen
        shown = seen.status if seen is not None else self._reg.actual
        return RegistrationStatus(
            service=self.instance.service,
            instance=self.instance.id,
            backend=self._backend_name,
            state=str(self.state),
            registered=registered,
            registry_status=str(shown) if registered and shown is not None else None,
            registry_note=(
                scrub_credentials(seen.note)
                if registered and seen is not None and not seen.healthy
                else None
            ),
            ready=ready,
            not_ready_reason=reason,
            last_heartbeat=self._heartbeat_time(),
            last_error=self._reg.last_error,
            checks=frozen_mapping(
                {
                    check.name: CheckStatus(
                        self.gate.check_up(check.name), self._results.get(check.name)
                    )
                    for check in self.checks
                }
            ),
            counters=frozen_mapping(self.counters.to_dict()),
        )

    def status(self) -> dict[str, Any]:
        """A JSON-ready view: :meth:`snapshot` as a dict (what the agent's ``/status`` shows)."""
        return self.snapshot().to_dict()

    def _heartbeat_time(self) -> float | None:
        lease = self._reg.lease
        if lease is not None and lease.shared and isinstance(self.backend, SharedLiveness):
            self._last_heartbeat = self.backend.last_renewal(lease) or self._last_heartbeat
        return self._last_heartbeat

    def _readiness(self) -> tuple[bool, str | None]:
        failing = "" if self.gate.healthy else self._failing_checks()
        return self._reg.readiness(
            self._clock(), self.state, stopping=self._stopping, failing=failing
        )

    @property
    def _lease(self) -> Lease | None:
        return self._reg.lease

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
        reg = self._reg
        run = {
            Step.REGISTER: self._register,
            Step.DEREGISTER: self._deregister,
            Step.SET_STATUS: self._set_status,
            Step.VERIFY: self._verify,
            Step.HEARTBEAT: self._heartbeat,
            Step.RELEASE: self._release,
            Step.EXPIRED: self._nothing,
        }
        while not self._stopping:
            desired = desired_registration(self.gate.state, self.on_unhealthy)
            note = "" if desired is Desired.PASSING else "unhealthy: " + self._failing_checks()
            action = reg.next(desired, self._clock(), note)
            if isinstance(action, Sleep):
                await self._sleep(action.seconds)
                continue
            try:
                result = await run[action]()
            except Exception as exc:  # never give up: every error is retried
                changes, pause = reg.failed(action, self._registry_error(exc), self._clock())
            else:
                changes, pause = reg.succeeded(action, self._clock(), result)
            self._publish(changes)
            if pause is not None:
                await self._sleep(pause)

    # One coroutine per step, each one call to the backend.

    async def _register(self) -> Lease:
        reg, backend = self._reg, self.backend
        assert reg.wanted is not None
        register = backend.register
        if self._shares_liveness and isinstance(backend, SharedLiveness):
            register = backend.register_shared
        return await register(
            self.instance,
            ttl=self.ttl,
            status=reg.wanted,
            note=reg.note,
            deregister_critical_after=self.deregister_critical_after,
        )

    async def _deregister(self) -> None:
        assert self._reg.lease is not None
        await self.backend.deregister(self._reg.lease)

    async def _set_status(self) -> None:
        reg = self._reg
        assert reg.lease is not None
        assert reg.wanted is not None
        await self.backend.set_status(reg.lease, reg.wanted, reg.note)

    async def _verify(self) -> InstanceHealth | None:
        assert self._reg.lease is not None
        return await self.backend.lookup(self._reg.lease)

    async def _heartbeat(self) -> None:
        assert self._reg.lease is not None
        await self.backend.heartbeat(self._reg.lease)

    async def _nothing(self) -> None:
        return None

    def _publish(self, changes: list[Change]) -> None:
        """Act on what the decisions changed: events, logs, and the driver's own state."""
        for change in changes:
            if isinstance(change, Event):
                self._emit(change.kind, change.detail)
            elif isinstance(change, Renewed):
                self._last_heartbeat = time.time()
            elif isinstance(change, Failed):
                self._log_failure(change.step.value, change.error, loud=change.loud)
            elif isinstance(change, HeldElsewhere):
                log.warning(
                    "%s: the registry holds our entry as %s although we set it %s: %s",
                    self.instance.id,
                    change.status,
                    change.ours,
                    change.note or "no note",
                    extra=self._extra("registry_status", status=str(change.status)),
                )
            else:
                log.info(
                    "%s: the registry holds our entry as %s again",
                    self.instance.id,
                    change.status,
                    extra=self._extra("registry_status", status=str(change.status)),
                )
        reg = self._reg
        if self._registered is not None:
            if reg.actual is None:
                self._registered.clear()
            else:
                self._registered.set()
        if self._rejected is not None:
            if reg.rejection is None:
                self._rejected.clear()
            else:
                self._rejected.set()
        if reg.lease is not self._followed:
            self._follow(reg.lease)

    def _follow(self, lease: Lease | None) -> None:
        self._followed = lease
        if lease is None and not self._stopping:
            # Lost: keep hearing the old lease's news until registered again, so the
            # shared liveness coming back cuts our backoff short.
            return
        unfollow, self._unfollow = self._unfollow, None
        if unfollow is not None:
            unfollow()
        if lease is not None and lease.shared and isinstance(self.backend, SharedLiveness):
            self._unfollow = self.backend.follow(lease, self._on_news)

    def _on_news(self, news: LivenessNews) -> None:
        # The shared renewal or verification concerns us: act on it now.
        if news is LivenessNews.RENEWAL:
            self._reg.heartbeat_now(self._clock())
        else:
            self._reg.verify_now(self._clock())
        self._wake_up()

    async def _release(self) -> None:
        lease = self._reg.stale
        self._reg.succeeded(Step.RELEASE, self._clock())
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

    def _connection_changed(self) -> None:
        # The registry went away or came back: check our entry now, not at the
        # next heartbeat, and cut short any backoff sleep.
        if self._stopping:
            return
        lease = self._reg.lease
        if lease is None or not lease.shared:  # a shared lease: the backend reads back
            self._reg.verify_now(self._clock())
        self._wake_up()

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
            # A shared lease's loss is logged once by the backend (with the count), not
            # once per registration (10,000 lines after one etcd wipe).
            loud = kind is RegistrarEventKind.LEASE_LOST and not self._shares_liveness
            level = logging.WARNING if loud else logging.INFO
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

    def _log_failure(
        self, action: str, error: RegistryError, *, loud: bool = True, force: bool = False
    ) -> None:
        """Log a failure: ``loud`` (the first of a run of one kind, see Registration) at
        ERROR for Rejected, else WARNING; the rest at DEBUG. ``force``: a failure while
        stopping, outside the healing loop, logged at once and kept as the last error."""
        kind = failure_kind(error)
        level = logging.ERROR if kind == "rejected" else logging.WARNING
        if not (loud or force):
            level = logging.DEBUG
        if force:
            self._reg.last_error = scrub_credentials(str(error))
        how = {
            "rejected": "no retry can fix this as is; retrying every "
            f"{self.retry.cap:g}s in case it is fixed",
            "throttled": "the registry is shedding load; retrying when it says",
            "unavailable": "retrying with backoff",
        }[kind]
        failures = self._reg.failures
        repeat = f" (failure {failures}, {how})" if not force else ""
        log.log(
            level,
            "%s %s failed: %s%s",
            self.instance.id,
            action,
            scrub_credentials(str(error)),
            repeat,
            extra=self._extra(f"{action}_failed", error=str(error), failures=failures),
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
