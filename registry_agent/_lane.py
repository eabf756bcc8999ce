"""One backend of a registrar: its healing machine, reconcile loop, lease and follows."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from registry_agent._backend import Backend, Lease, LivenessNews, SharedLiveness
from registry_agent._connection import follow_connection
from registry_agent._errors import (
    BackendUnavailable,
    RegistryError,
    Throttled,
)
from registry_agent._health.gate import Desired, desired_registration
from registry_agent._models import HealthStatus, InstanceHealth, ServiceInstance
from registry_agent._probe import ConnectionAware
from registry_agent._reconcile import Step
from registry_agent._registration import (
    Change,
    Event,
    Failed,
    HeldElsewhere,
    Registration,
    Renewed,
    Sleep,
    failure_kind,
    scrub_credentials,
)
from registry_agent._status import (
    BackendStatus,
    frozen_mapping,
)

if TYPE_CHECKING:
    from registry_agent._registrar import AsyncRegistrar

__all__ = ["BackendLane", "close_owned"]

# The registrar's logger: a lane's lines are the registrar's.
log = logging.getLogger("registry_agent.registrar")

# Releasing a lease we abandoned is best effort: never wait longer than this for it.
_RELEASE_TIMEOUT = 2.0
# Stopping: a deregistration that failed in a way a retry can fix is retried at most
# this far apart (a registry back within milliseconds is retried within this much),
_STOP_RETRY_CAP = 0.5
# keeping this much of the stop budget (at most a fifth of it) for the last resort,
_LAST_RESORT = 0.5
# and giving each try at least this long.
_MIN_TRY = 0.05


def _accepts(function: Callable[..., Any], keyword: str) -> bool:
    """Whether ``function`` takes ``keyword`` (older backends' hooks may not)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == keyword or p.kind is p.VAR_KEYWORD for p in parameters)


class _Listener:
    """What a lane gives a backend that shares liveness (``SharedLiveness.follow``).

    Called with :class:`LivenessNews` (act on it now); ``tally(counter)`` is the
    backend crediting a shared renewal or read-back that covered this lane
    (``heartbeats_ok``, ``heartbeats_failed``, ``verifications``): counted, nothing
    woken. A backend finds ``tally`` with ``getattr``; one without it credits nothing.
    """

    __slots__ = ("lane",)

    def __init__(self, lane: BackendLane) -> None:
        self.lane = lane

    def __call__(self, news: LivenessNews) -> None:
        self.lane._on_news(news)

    def tally(self, counter: str) -> None:
        """Count a shared renewal (failed or not) or read-back for this lane."""
        self.lane.reg.credit(counter)


class BackendLane:
    """One backend of a registrar: its healing machine (:class:`Registration`), reconcile
    loop, lease, shared-liveness and connection follows, retries and backoff.

    Lanes share their registrar's checks, health gate and events, nothing else: what
    one backend does (down, throttling, refusing) never delays another.
    """

    def __init__(
        self,
        owner: AsyncRegistrar,
        index: int,
        name: str,
        backend: Backend,
        *,
        owned: bool,
        shared_liveness: bool,
        many: bool,
    ) -> None:
        self.owner = owner
        self.index = index
        #: How events, logs and status name this backend.
        self.name = name
        self.backend = backend
        self.owned = owned
        self.scheme: str = getattr(type(backend), "scheme", type(backend).__name__)
        self.shares_liveness = shared_liveness and isinstance(backend, SharedLiveness)
        # Log lines name the backend only when there are several.
        self.who = f"{owner.instance.id} [{name}]" if many else owner.instance.id
        self.log_name = name if many else self.scheme
        #: The healing decisions and what the registry holds (no I/O).
        self.reg = Registration(owner.options, owner.instance, self.scheme)
        self.last_heartbeat: float | None = None
        self.task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        # Set while a backend that shares liveness tells us about our lease.
        self._unfollow: Callable[[], None] | None = None
        self._followed: Lease | None = None
        self._listener = _Listener(self)
        self._unfollow_connection: Callable[[], None] = lambda: None
        #: Set when the registrar let this backend go (``set_backends``): it stops alone.
        self.dropped = False

    @property
    def halted(self) -> bool:
        """The registrar is stopping, or has let this backend go."""
        return self.owner._stopping or self.dropped

    def take_place_of(self, other: BackendLane) -> None:
        """Take ``other``'s place in a new list of backends (its index and names)."""
        self.index, self.name = other.index, other.name
        self.who, self.log_name = other.who, other.log_name

    async def validate(self) -> None:
        """The backend's own checks of the instance and the options (see AsyncRegistrar)."""
        backend, options = self.backend, self.owner.options
        validate = getattr(backend, "validate", None)
        if validate is not None:
            result = validate(self.owner.instance)
            if inspect.isawaitable(result):
                await result
        validate_options = getattr(backend, "validate_options", None)
        if validate_options is not None:
            given: dict[str, Any] = {
                "ttl": options.ttl,
                "deregister_critical_after": options.deregister_critical_after,
            }
            if _accepts(validate_options, "on_unhealthy"):
                given["on_unhealthy"] = str(options.on_unhealthy)
            result = validate_options(**given)
            if inspect.isawaitable(result):
                await result

    def start(self) -> None:
        """Run the reconcile loop and follow the connection (on the running loop)."""
        self._wake = asyncio.Event()
        self.task = asyncio.create_task(self._reconcile(), name="registrar")
        if isinstance(self.backend, ConnectionAware):
            self._unfollow_connection = follow_connection(self.backend, self._connection_changed)

    async def shut_down(self, timeout: float, deadline: float) -> None:
        """Let the step in flight finish (half of ``timeout`` at most), deregister by
        ``deadline``, and close the backend if the registrar opened it."""
        clock = self.owner._clock

        def left() -> float:
            return max(0.1, deadline - clock())

        self._unfollow_connection()
        self._stop_following()
        if self.task is not None:
            self.wake_up()
            # Let an operation in flight finish, so we know what the registry holds.
            done, _ = await asyncio.wait({self.task}, timeout=timeout / 2)
            if not done:
                self.task.cancel()
                await asyncio.wait({self.task}, timeout=left())
        if self.owner._stopping:  # not when only this backend was let go
            self.owner.gate_stopped()
        reg = self.reg
        if reg.stale is not None and reg.stale != reg.lease:
            await self._release()
        if reg.lease is not None:
            error = await self._deregister_by(reg.lease, deadline)
            if error is None:
                self._publish(reg.deregistered_on_stop())
            else:
                await self._not_deregistered(reg.lease, error, deadline)
        self._stop_following()  # a registration that finished while stopping
        if self.owned:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(left()):
                    await self.backend.close()

    async def _deregister_by(self, lease: Lease, deadline: float) -> RegistryError | None:
        """Deregister ``lease``, retrying what a retry can fix (``BackendUnavailable``,
        ``Throttled``: a 503, a reset, a refused connection) with a short jittered
        backoff (a ``Retry-After`` honoured up to the deadline) until a little before
        ``deadline`` (the rest is kept for :meth:`_not_deregistered`). None when
        deregistered, else the last error (a ``Rejected`` one at once)."""
        clock, retry = self.owner._clock, self.owner.retry
        until = deadline - min(_LAST_RESORT, max(0.0, deadline - clock()) / 5)
        attempt = 0
        while True:
            attempt += 1
            budget = max(_MIN_TRY, until - clock())
            error: RegistryError
            try:
                async with asyncio.timeout(budget):
                    await self.backend.deregister(lease)
            except TimeoutError:  # ours: the registry said nothing before the stop's deadline
                error = BackendUnavailable(
                    f"no answer within {budget:.1f}s, the time stop() had left",
                    service=self.owner.instance.service,
                    instance=self.owner.instance.id,
                    backend=self.scheme,
                )
            except Exception as exc:
                error = self.registry_error(exc)
            else:
                if attempt > 1:
                    log.info(
                        "%s: deregistered at attempt %d",
                        self.who,
                        attempt,
                        extra=self.extra("deregister_retried", attempts=attempt),
                    )
                return None
            if not isinstance(error, BackendUnavailable):
                return error  # Rejected, ConfigError: no retry fixes it as is
            if isinstance(error, Throttled):
                delay = retry.answered(attempt, error.retry_after)
            else:
                delay = min(retry.delay(attempt), _STOP_RETRY_CAP)
            wait = min(delay, until - clock() - _MIN_TRY)
            if wait < 0:
                return error
            log.debug(
                "%s: deregistration failed (attempt %d), retrying in %.2fs: %s",
                self.who,
                attempt,
                wait,
                scrub_credentials(str(error)),
                extra=self.extra("deregister_failed", error=str(error), attempts=attempt),
            )
            await asyncio.sleep(wait)

    async def _not_deregistered(self, lease: Lease, error: RegistryError, deadline: float) -> None:
        """The entry could not be removed: as a last resort, with the time left, mark it
        critical (one cheap write: Consul's TTL check, etcd's entry; discovery that
        filters on health stops sending traffic), then log the truth at WARNING."""
        clock = self.owner._clock
        marked = False
        if deadline - clock() >= _MIN_TRY and not lease.shared:
            # A shared lease's entry turns critical with the heartbeat the backend
            # drops when its last member leaves (Consul), or expires with it (etcd).
            note = "stopping: not deregistered: " + scrub_credentials(error.message)
            try:
                async with asyncio.timeout(deadline - clock()):
                    await self.backend.set_status(lease, HealthStatus.CRITICAL, note)
            except Exception as exc:  # the registry is down: the TTL removes the entry
                log.debug(
                    "%s: marking the entry critical failed too: %s",
                    self.who,
                    self.registry_error(exc),
                    extra=self.extra("set_status_failed"),
                )
            else:
                marked = True
        self.reg.last_error = scrub_credentials(str(error))
        what = (
            "marked critical instead"
            if marked
            else f"it stays until its TTL ({lease.ttl:g}s) runs out"
        )
        log.warning(
            "%s not deregistered: %s (%s)",
            self.who,
            scrub_credentials(str(error)),
            what,
            extra=self.extra(
                "not_deregistered", error=scrub_credentials(str(error)), marked_critical=marked
            ),
        )

    def _stop_following(self) -> None:
        unfollow, self._unfollow = self._unfollow, None
        if unfollow is not None:
            unfollow()

    def observe(self) -> None:
        """Before reading the entry's state: a shared lease's last renewal, from the
        backend's memory (no I/O)."""
        lease = self.reg.lease
        if lease is not None and lease.shared and isinstance(self.backend, SharedLiveness):
            renewed = self.backend.last_renewal(lease)  # wall clock
            if renewed is not None:
                self.reg.shared_renewed(self.owner._clock() - (time.time() - renewed))

    def status(self) -> BackendStatus:
        """This backend's part of ``status()``."""
        reg = self.reg
        ready, reason = self.owner.readiness(self)  # observes the shared renewal first
        registered = reg.registered(self.owner._clock())
        seen = reg.seen
        shown = seen.status if seen is not None else reg.actual
        return BackendStatus(
            index=self.index,
            name=self.name,
            backend=self.scheme,
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
            last_error=reg.last_error,
            counters=frozen_mapping(reg.counters.to_dict()),
        )

    def _heartbeat_time(self) -> float | None:
        lease = self.reg.lease
        if lease is not None and lease.shared and isinstance(self.backend, SharedLiveness):
            self.last_heartbeat = self.backend.last_renewal(lease) or self.last_heartbeat
        return self.last_heartbeat

    # -- reconciliation ----------------------------------------------------------------

    def wake_up(self) -> None:
        """Cut a sleep short: something changed (the gate, the connection, news)."""
        if self._wake is not None:
            self._wake.set()

    async def _sleep(self, seconds: float | None) -> None:
        assert self._wake is not None
        if self.halted:
            return
        clock = self.owner._clock
        started = clock()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        self._wake.clear()
        if seconds is not None:
            self._notice_blocked_loop(clock() - started - seconds)

    def _notice_blocked_loop(self, late: float) -> None:
        # Woken this late, the loop (or the whole process) was stalled at least
        # that long; add the up-to-one heartbeat since the last renewal and the
        # TTL may have run out in the registry.
        owner = self.owner
        if late >= owner.ttl - owner.heartbeat_interval:
            log.warning(
                "%s: the event loop was blocked (or the process frozen) for at least %.1fs "
                "(TTL %gs): the registry may have dropped our entry; something is "
                "blocking the event loop",
                self.who,
                late,
                owner.ttl,
                extra=self.extra("loop_blocked", blocked=round(late, 3)),
            )

    async def _reconcile(self) -> None:
        owner, reg = self.owner, self.reg
        run = {
            Step.REGISTER: self._register,
            Step.DEREGISTER: self._deregister,
            Step.SET_STATUS: self._set_status,
            Step.UPDATE: self._update,
            Step.VERIFY: self._verify,
            Step.HEARTBEAT: self._heartbeat,
            Step.RELEASE: self._release,
            Step.EXPIRED: self._nothing,
        }
        while not self.halted:
            desired = desired_registration(owner.gate.state, owner.on_unhealthy)
            note = "" if desired is Desired.PASSING else "unhealthy: " + owner.failing_checks()
            action = reg.next(desired, owner._clock(), note)
            if isinstance(action, Sleep):
                await self._sleep(action.seconds)
                continue
            try:
                result = await run[action]()
            except Exception as exc:  # never give up: every error is retried
                changes, pause = reg.failed(action, self.registry_error(exc), owner._clock())
            else:
                changes, pause = reg.succeeded(action, owner._clock(), result)
            self._publish(changes)
            if pause is not None:
                await self._sleep(pause)

    # One coroutine per step, each one call to the backend.

    async def _register(self) -> Lease:
        reg, backend, owner = self.reg, self.backend, self.owner
        assert reg.wanted is not None
        register = backend.register
        if self.shares_liveness and isinstance(backend, SharedLiveness):
            register = backend.register_shared
        return await register(
            reg.writing,
            ttl=owner.ttl,
            status=reg.wanted,
            note=reg.note,
            deregister_critical_after=owner.deregister_critical_after,
        )

    async def _update(self) -> Lease:
        """Write the entry again in place with new tags, meta or weight: the backend's
        ``update`` hook (etcd: a put of the same key on the same lease), else a register
        of the same id, which replaces the entry in place (Consul keeps its checks'
        statuses)."""
        reg, backend = self.reg, self.backend
        assert reg.lease is not None
        assert reg.wanted is not None
        update = getattr(backend, "update", None)
        if update is None:
            return await self._register()
        lease: Lease = await update(reg.lease, reg.writing, status=reg.wanted, note=reg.note)
        return lease

    async def validate_instance(self, instance: ServiceInstance) -> None:
        """The backend's own check of ``instance`` (``validate``), if it has one."""
        validate = getattr(self.backend, "validate", None)
        if validate is not None:
            result = validate(instance)
            if inspect.isawaitable(result):
                await result

    async def _deregister(self) -> None:
        assert self.reg.lease is not None
        await self.backend.deregister(self.reg.lease)

    async def _set_status(self) -> None:
        reg = self.reg
        assert reg.lease is not None
        assert reg.wanted is not None
        await self.backend.set_status(reg.lease, reg.wanted, reg.note)

    async def _verify(self) -> InstanceHealth | None:
        assert self.reg.lease is not None
        return await self.backend.lookup(self.reg.lease)

    async def _heartbeat(self) -> None:
        assert self.reg.lease is not None
        await self.backend.heartbeat(self.reg.lease)

    async def _nothing(self) -> None:
        return None

    def _publish(self, changes: list[Change]) -> None:
        """Act on what the decisions changed: events, logs, and the driver's own state."""
        for change in changes:
            if isinstance(change, Event):
                self.owner._emit(change.kind, change.detail, self)
            elif isinstance(change, Renewed):
                self.last_heartbeat = time.time()
            elif isinstance(change, Failed):
                self.log_failure(change.step.value, change.error, loud=change.loud)
            elif isinstance(change, HeldElsewhere):
                log.warning(
                    "%s: the registry holds our entry as %s although we set it %s: %s",
                    self.who,
                    change.status,
                    change.ours,
                    change.note or "no note",
                    extra=self.extra("registry_status", status=str(change.status)),
                )
            else:
                log.info(
                    "%s: the registry holds our entry as %s again",
                    self.who,
                    change.status,
                    extra=self.extra("registry_status", status=str(change.status)),
                )
        self.owner.lanes_changed()
        if self.reg.lease is not self._followed:
            self._follow(self.reg.lease)

    def _follow(self, lease: Lease | None) -> None:
        self._followed = lease
        if lease is None and not self.halted:
            # Lost: keep hearing the old lease's news until registered again, so the
            # shared liveness coming back cuts our backoff short.
            return
        self._stop_following()
        if lease is not None and lease.shared and isinstance(self.backend, SharedLiveness):
            self._unfollow = self.backend.follow(lease, self._listener)

    def _on_news(self, news: LivenessNews) -> None:
        # The shared renewal or verification concerns us: act on it now.
        clock = self.owner._clock
        if news is LivenessNews.RENEWAL:
            self.reg.heartbeat_now(clock())
        else:
            self.reg.verify_now(clock())
        self.wake_up()

    async def _release(self) -> None:
        lease = self.reg.stale
        self.reg.succeeded(Step.RELEASE, self.owner._clock())
        if lease is None:
            return
        try:
            wait = min(_RELEASE_TIMEOUT, max(0.5, self.owner.heartbeat_interval))
            async with asyncio.timeout(wait):
                await self.backend.deregister(lease)
        except Exception as exc:  # best effort: an unreleased lease expires with its TTL
            log.debug(
                "%s: releasing the abandoned lease failed: %s",
                self.who,
                self.registry_error(exc),
                extra=self.extra("release_failed"),
            )

    def _connection_changed(self) -> None:
        # The registry went away or came back: check our entry now, not at the
        # next heartbeat, and cut short any backoff sleep.
        if self.halted:
            return
        lease = self.reg.lease
        if lease is None or not lease.shared:  # a shared lease: the backend reads back
            self.reg.verify_now(self.owner._clock())
        self.wake_up()

    def registry_error(self, exc: BaseException) -> RegistryError:
        """``exc`` itself when it is a RegistryError, else wrapped as BackendUnavailable."""
        if isinstance(exc, RegistryError):
            return exc
        said = str(exc) or ("no answer in time" if isinstance(exc, TimeoutError) else "no message")
        wrapped = BackendUnavailable(
            f"unexpected {type(exc).__name__}: {said}",
            service=self.owner.instance.service,
            instance=self.owner.instance.id,
            backend=self.scheme,
        )
        wrapped.__cause__ = exc
        return wrapped

    # -- logs ------------------------------------------------------------------------------

    def extra(self, event: str, **more: Any) -> dict[str, Any]:
        """The structured fields of a log line about this backend."""
        instance = self.owner.instance
        return {
            "event": event,
            "service": instance.service,
            "instance": instance.id,
            "backend": self.log_name,
            "error": None,  # always present (a formatter may read record.error)
            **more,
        }

    def log_failure(
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
            self.reg.last_error = scrub_credentials(str(error))
        how = {
            "rejected": "no retry can fix this as is; retrying every "
            f"{self.owner.retry.cap:g}s in case it is fixed",
            "throttled": "the registry is shedding load; retrying when it says",
            "unavailable": "retrying with backoff",
        }[kind]
        failures = self.reg.failures
        repeat = f" (failure {failures}, {how})" if not force else ""
        log.log(
            level,
            "%s %s failed: %s%s",
            self.who,
            action,
            scrub_credentials(str(error)),
            repeat,
            extra=self.extra(f"{action}_failed", error=str(error), failures=failures),
            exc_info=error.__cause__ if level == logging.DEBUG and error.__cause__ else None,
        )


async def close_owned(lanes: Iterable[BackendLane]) -> None:
    """Close the backends the registrar opened itself (from a URL) in ``lanes``."""
    for lane in lanes:
        if lane.owned:
            with contextlib.suppress(Exception):
                await lane.backend.close()
