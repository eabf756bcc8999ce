"""Healing decisions: one registration as a pure state machine.

No asyncio, no clock, no backend: :class:`Registration` is told the time and
what each step did, and answers what to do next and what changed. The
registrar (``_registrar.py``) is the driver that performs the I/O, sleeps,
emits the events and writes the logs. Its rules:

- fix a wrong entry before keeping a right one alive; verify before a heartbeat;
- a lost entry is registered again at once; only losses that repeat back off;
- "unavailable" is announced once per run of failures, "recovered" once after it;
- a throttled call comes back when the server says, a rejected one at the slow cap,
  anything else with a growing jittered backoff (never past our entry's expiry);
- no renewal for a TTL counts the entry lost; a failed read retries within a heartbeat;
- a shared lease (the backend renews and verifies for many registrations) runs no
  timers: its news asks for a heartbeat (answered from memory) or a read now, and the
  backend credits each shared renewal and read-back to every registration it covers
  (:meth:`Registration.credit`), so the counters count as they do without it.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

from registry_agent._backend import Lease
from registry_agent._errors import ConfigError, LeaseLost, RegistryError, Rejected, Throttled
from registry_agent._health.gate import Desired, GateState
from registry_agent._models import HealthStatus, InstanceHealth, ServiceInstance
from registry_agent._options import RegistrationOptions
from registry_agent._reconcile import Step, next_step
from registry_agent._status import RegistrationCounters

__all__ = [
    "CREDITED",
    "Change",
    "Event",
    "Failed",
    "HeldAgain",
    "HeldElsewhere",
    "Outcome",
    "RegistrarEventKind",
    "Registration",
    "Renewed",
    "Sleep",
    "scrub_credentials",
]

# A registry that cannot be reached is logged again at most this often.
_REPEAT_LOG_EVERY = 30.0

#: The counters a backend that shares liveness credits (see :meth:`Registration.credit`).
CREDITED = ("heartbeats_ok", "heartbeats_failed", "verifications")

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")


def scrub_credentials(text: str) -> str:
    """``text`` with the user and password of every ``scheme://user:pass@`` URL masked."""
    return _USERINFO.sub(r"\1***@", text)


class RegistrarEventKind(enum.StrEnum):
    """What happened to a registration."""

    STATE_CHANGED = "state_changed"  # the health gate moved (see ``state``)
    REGISTERED = "registered"  # entered the registry
    REREGISTERED = "reregistered"  # entered it again after the entry was lost
    DEREGISTERED = "deregistered"  # removed (unhealthy, or stopping)
    STATUS_CHANGED = "status_changed"  # marked passing or critical in the registry
    UPDATED = "updated"  # written again in place with new tags, meta or weight (update())
    LEASE_LOST = "lease_lost"  # the registry lost our entry (restart, expiry, deletion)
    BACKEND_UNAVAILABLE = "backend_unavailable"  # first failure of a run of failures
    BACKEND_RECOVERED = "backend_recovered"  # the registry answers again
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Sleep:
    """Nothing to do until ``seconds`` pass (None: until something changes)."""

    seconds: float | None


@dataclass(frozen=True, slots=True)
class Event:
    """Emit a registrar event."""

    kind: RegistrarEventKind
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Renewed:
    """A registration or our own heartbeat succeeded: stamp the last heartbeat."""


@dataclass(frozen=True, slots=True)
class Failed:
    """A step failed; ``loud``: the first of its kind in a row (or a 30 s reminder)."""

    step: Step
    error: RegistryError
    loud: bool


@dataclass(frozen=True, slots=True)
class HeldElsewhere:
    """The registry holds our entry as ``status`` although we wrote ``ours``."""

    status: HealthStatus
    ours: HealthStatus | None
    note: str


@dataclass(frozen=True, slots=True)
class HeldAgain:
    """The registry holds our entry as we wrote it again."""

    status: HealthStatus


Change = Event | Renewed | Failed | HeldElsewhere | HeldAgain
#: What a step's result changed, and the pause before the next step (None: go on at once).
Outcome = tuple[list[Change], float | None]


def _changed(instance: ServiceInstance) -> str:
    """What an UPDATED event says: the tags and meta now written."""
    meta = ",".join(f"{k}={v}" for k, v in sorted(instance.meta.items()))
    return f"tags=[{','.join(instance.tags)}] meta={{{meta}}}"


def failure_kind(error: RegistryError) -> str:
    """``rejected``, ``throttled`` or ``unavailable``: how a failure is retried and logged."""
    if isinstance(error, Rejected | ConfigError):
        return "rejected"
    if isinstance(error, Throttled):
        return "throttled"
    return "unavailable"


class Registration:
    """What the registry holds for one instance, and the healing rules, with no I/O.

    The driver asks :meth:`next` (a :class:`~registry_agent._reconcile.Step` to
    perform, or a :class:`Sleep`), performs the step, and reports it with
    :meth:`succeeded` or :meth:`failed`, which return the changes to publish and
    the pause before asking again. Times are the driver's monotonic clock.
    """

    def __init__(
        self, options: RegistrationOptions, instance: ServiceInstance, backend: str
    ) -> None:
        self.options = options
        self.instance = instance
        self.backend = backend
        self.counters = RegistrationCounters()
        self.lease: Lease | None = None
        self.actual: HealthStatus | None = None  # the status we last wrote; None: no entry
        self.expires_at: float | None = None  # our entry lapses then unless renewed
        #: A shared lease: when the backend's last shared renewal stops covering our
        #: entry (see :meth:`shared_renewed`); the backend decides the loss itself.
        self.shared_expires_at: float | None = None
        self.stale: Lease | None = None  # a lease we abandoned that may still be alive
        #: The instance our entry holds as we wrote it (None: no entry written yet).
        self.written: ServiceInstance | None = None
        self._writing = instance  # what the REGISTER or UPDATE in flight writes
        self.seen: InstanceHealth | None = None  # our entry as the last read found it
        self.external: HealthStatus | None = None  # status someone else holds our entry at
        self.lost_reason: str | None = None
        self.last_error: str | None = None
        self.rejection: Rejected | ConfigError | None = None
        self.heartbeat_due = 0.0
        self.verify_due = 0.0
        self.failures = 0  # failures in a row
        self.losses_in_row = 0
        self._just_wrote = False  # a status write awaits its read-back
        self._lost_entry = False
        self._unreachable = 0  # failures in a row without an answer: the backoff exponent
        self._registered_at = 0.0
        self._episode: str | None = None  # the kind of failure last logged loudly
        self._last_loud = -math.inf
        self._wanted: HealthStatus | None = None
        self._note = ""
        self._started = 0.0
        # The backend credits its shared renewals: answers from memory are not counted.
        self._credited = False

    # -- questions ---------------------------------------------------------------

    @property
    def wanted(self) -> HealthStatus | None:
        """The status the step :meth:`next` gave writes (REGISTER, SET_STATUS)."""
        return self._wanted

    @property
    def writing(self) -> ServiceInstance:
        """The instance the step :meth:`next` gave writes (REGISTER, UPDATE)."""
        return self._writing

    def update(self, instance: ServiceInstance) -> None:
        """New tags, meta or weight (same service, id, address and port): the entry is
        written again in place (UPDATE) while held, else registered so next time."""
        self.instance = instance

    @property
    def rewrite_due(self) -> bool:
        """The entry we hold carries older tags or meta than the instance now has."""
        return (
            self.actual is not None and self.written is not None and (self.written != self.instance)
        )

    @property
    def note(self) -> str:
        """The note that goes with :attr:`wanted` ("" when passing)."""
        return self._note

    def registered(self, now: float) -> bool:
        """The registry holds our entry: written, and not a TTL without renewal ago."""
        return self.actual is not None and not self._lapsed(now)

    def shared_renewed(self, at: float) -> None:
        """The shared liveness our lease is on was last renewed at ``at`` (this clock):
        a TTL later, with no renewal since, our entry no longer counts as held, even
        while the backend still waits for a call to tell it is lost."""
        if self.lease is not None and self.lease.shared:
            self.shared_expires_at = max(at, self._registered_at) + self.options.ttl

    def _lapsed(self, now: float) -> bool:
        if self.expires_at is not None and now >= self.expires_at:
            return True
        shared = self.lease is not None and self.lease.shared
        return shared and self.shared_expires_at is not None and now >= self.shared_expires_at

    def next(self, desired: Desired, now: float, note: str = "") -> Step | Sleep:
        """The step to perform now, or how long to sleep. ``note`` goes with a
        non-passing status (and names why an instance is deregistered)."""
        step, wake = next_step(
            desired,
            self.actual,
            now=now,
            heartbeat_due=self.heartbeat_due,
            verify_due=self.verify_due,
            expires_at=self.expires_at,
            stale_lease=self.stale is not None,
            rewrite=self.rewrite_due,
        )
        if step is Step.IDLE:
            forever = wake is None or math.isinf(wake)
            return Sleep(None if wake is None or forever else max(0.0, wake - now))
        self._wanted, self._note, self._started = desired.status, note, now
        self._writing = self.instance
        return step

    def readiness(
        self, now: float, state: GateState, *, stopping: bool, failing: str
    ) -> tuple[bool, str | None]:
        """``(ready, why not)``: ready when the registry holds our entry as passing."""
        if stopping or state is GateState.STOPPED:
            return False, "stopped"
        if not self.registered(now):
            if self.rejection is not None:
                return False, f"rejected by the registry: {self.rejection}"
            if state is GateState.STARTING:
                return False, "health checks have not passed yet"
            if state is GateState.WITHDRAWN:
                return False, "withdrawn: " + failing
            if self.actual is not None:  # written, then a TTL without renewal
                return False, f"entry lost ({self._expiry_reason()})"
            if self.lost_reason is not None:
                again = self.last_error
                more = (
                    f"; registering again: {again}" if again and again != self.lost_reason else ""
                )
                return False, f"entry lost ({self.lost_reason}){more}"
            if self.last_error:
                return False, f"not registered: {self.last_error}"
            return False, "not registered yet"
        if state is GateState.WITHDRAWN:
            return False, "held critical: " + failing
        seen = self.seen
        if seen is not None and not seen.healthy:
            note = scrub_credentials(seen.note)
            return False, f"the registry holds our entry as {seen.status}" + (
                f": {note}" if note else ""
            )
        if self.actual is not HealthStatus.PASSING:
            return False, f"the registry holds our entry as {self.actual}"
        return True, None

    # -- news ------------------------------------------------------------------------

    def heartbeat_now(self, now: float) -> None:
        """Renew (or, for a shared lease, ask the backend about it) at once."""
        self.heartbeat_due = now

    def verify_now(self, now: float) -> None:
        """Read our entry back at once (the connection changed, or the backend asked)."""
        self.verify_due = now

    def credit(self, counter: str) -> None:
        """A shared renewal (``heartbeats_ok``, ``heartbeats_failed``) or read-back
        (``verifications``) the backend made covered this registration: count it.

        From the first credit on, the heartbeats a shared lease answers from memory
        are not counted (they renew nothing); our own reads back still are. Another
        name is ignored.
        """
        counters = self.counters
        if counter == "heartbeats_ok":
            counters.heartbeats_ok += 1
        elif counter == "heartbeats_failed":
            counters.heartbeats_failed += 1
        elif counter == "verifications":
            counters.verifications += 1
        else:
            return
        self._credited = True

    def _counts_heartbeat(self) -> bool:
        """Whether a HEARTBEAT step counts as one (not a shared one the backend credits)."""
        return not (self._credited and self.lease is not None and self.lease.shared)

    # -- outcomes --------------------------------------------------------------------

    def succeeded(self, step: Step, now: float, result: object = None) -> Outcome:
        """``step`` (begun at the last :meth:`next`) succeeded with ``result``: a
        :class:`Lease` for REGISTER, the entry read (or None) for VERIFY."""
        changes: list[Change] = []
        if step is Step.EXPIRED:
            return self._expired(), None
        if step is Step.RELEASE:
            self.stale = None
            return changes, None
        if step is Step.REGISTER:
            assert isinstance(result, Lease)
            changes += self._registered(result, now)
        elif step is Step.DEREGISTER:
            self._gone()
            self.counters.deregistrations += 1
            changes.append(Event(RegistrarEventKind.DEREGISTERED, self._note))
        elif step is Step.UPDATE:
            assert isinstance(result, Lease)
            if (
                self.lease is not None
                and not self.lease.shared
                and (result.handle != self.lease.handle)
            ):
                self.stale = self.lease  # written on a new lease: release the old one
            self.lease = result
            self.written = self._writing
            # Read it back soon: what a watcher now sees is what status() says.
            self.verify_due = now
            changes.append(Event(RegistrarEventKind.UPDATED, _changed(self._writing)))
        elif step is Step.SET_STATUS:
            self._set_actual(self._wanted)
            # Read it back at once: the registry may hold it otherwise (Consul
            # maintenance mode, a node check). A status write does not renew an
            # etcd lease, so it does not count as a heartbeat.
            self._just_wrote = True
            self.verify_due = now
            changes.append(Event(RegistrarEventKind.STATUS_CHANGED, str(self._wanted)))
        elif step is Step.VERIFY:
            assert result is None or isinstance(result, InstanceHealth)
            self.counters.verifications += 1
            self.verify_due = self._next_verify(now)
            if result is None or result.instance != (self.written or self.instance):
                why = (
                    "our entry is missing from the registry"
                    if result is None
                    else "our entry was changed by someone else"
                )
                return self.failed(step, self._lease_lost(why), now)
            changes += self._read_back(result)
            self.verify_due = self._next_verify(now)  # held elsewhere: keep reading it back
        elif step is Step.HEARTBEAT:
            if self._counts_heartbeat():
                self.counters.heartbeats_ok += 1
            if self.lease is not None and self.lease.shared:
                self.heartbeat_due = math.inf  # answered from memory: the shared renewal is fine
            else:
                self.expires_at = self._started + self.options.ttl
                self.heartbeat_due = now + self.options.heartbeat_interval
                changes.append(Renewed())
        return changes + self._answered(step), None

    def failed(self, step: Step, error: RegistryError, now: float) -> Outcome:
        """``step`` failed with ``error``: what changed, and how long to wait."""
        if isinstance(error, LeaseLost):
            # Register again at once; only a loss that keeps coming back waits.
            # An entry that verification found missing or changed may still hold
            # a live lease: release it first, so no orphan stays a TTL.
            self._unreachable = 0
            why = str(error)
            if step is Step.HEARTBEAT and self.failures and self.lease and self.lease.shared:
                # The shared renewals failed until the lease ran out: say so as we
                # do for our own, with the error that kept them failing.
                why = self._expiry_reason() + f" [{why}]"
            lost = self._lose(why, stale=step is Step.VERIFY)
            if self._started - self._registered_at > self.options.heartbeat_interval:
                self.losses_in_row = 0  # it held for a while: this loss is news
            self.losses_in_row += 1
            pause = self.options.retry.delay(self.losses_in_row - 1)
            return lost, pause if self.losses_in_row > 1 else None
        self.failures += 1
        self.counters.errors += 1
        if step is Step.HEARTBEAT and self._counts_heartbeat():
            self.counters.heartbeats_failed += 1
        self.last_error = scrub_credentials(str(error))
        changes: list[Change] = []
        if self.failures == 1:
            changes.append(Event(RegistrarEventKind.BACKEND_UNAVAILABLE, self.last_error))
        changes.append(Failed(step, error, self._loud(failure_kind(error), now)))
        if step is Step.VERIFY:
            # A read that fails must not starve the heartbeats that keep the
            # entry alive (e.g. reads refused, keepalives still accepted).
            self.verify_due = now + self.options.heartbeat_interval
        retry = self.options.retry
        if isinstance(error, Rejected | ConfigError):
            # No retry can fix it as is; an operator may (permissions): retry slowly.
            self._unreachable = 0
            self.rejection = error
            delay = retry.slowest()
        elif isinstance(error, Throttled):
            # It answered: it is up. Come back when it says, not after a growing backoff.
            self._unreachable = 0
            delay = retry.answered(self.failures, error.retry_after)
        else:
            self._unreachable += 1
            delay = retry.delay(self._unreachable)
        if self.actual is not None and self.expires_at is not None:
            delay = min(delay, max(0.0, self.expires_at - now))
        return changes, delay

    def deregistered_on_stop(self) -> list[Change]:
        """Stopping removed our entry."""
        self._gone()
        self.counters.deregistrations += 1
        return [Event(RegistrarEventKind.DEREGISTERED, "stopped")]

    # -- rules -------------------------------------------------------------------------

    def _registered(self, lease: Lease, now: float) -> list[Change]:
        shared = lease.shared
        self.lease = lease
        self.written = self._writing
        self.expires_at = None if shared else self._started + self.options.ttl
        self.seen = None
        self._just_wrote = False
        self._set_actual(self._wanted)
        self._registered_at = now
        self.heartbeat_due = math.inf if shared else now + self.options.heartbeat_interval
        # Someone else held our entry critical before: see at once whether they still do.
        self.verify_due = now if self.external else self._next_verify(now)
        self.lost_reason = None
        wanted = str(self._wanted)
        if self._lost_entry:
            self._lost_entry = False
            self.counters.reregistrations += 1
            return [Event(RegistrarEventKind.REREGISTERED, wanted), Renewed()]
        self.counters.registrations += 1
        return [Event(RegistrarEventKind.REGISTERED, wanted), Renewed()]

    def _answered(self, step: Step) -> list[Change]:
        if step in (Step.HEARTBEAT, Step.VERIFY):
            self.losses_in_row = 0  # the entry held: a later loss is news
        changes: list[Change] = []
        if self.failures:
            changes.append(Event(RegistrarEventKind.BACKEND_RECOVERED, f"after {step.value}"))
            self.failures = 0
        self._episode = None
        self._unreachable = 0
        self.last_error = None
        self.rejection = None
        return changes

    def _loud(self, kind: str, now: float) -> bool:
        if kind == self._episode and not (
            kind == "unavailable" and now - self._last_loud >= _REPEAT_LOG_EVERY
        ):
            return False
        self._episode = kind
        self._last_loud = now
        return True

    def _next_verify(self, now: float) -> float:
        # A shared lease is read back by the backend, which tells us when to look; but
        # the backend compares with what we wrote, so it cannot tell us when someone
        # else (Consul maintenance mode) lets go of our entry: we read that back ourselves.
        if self.lease is not None and self.lease.shared and self.external is None:
            return math.inf
        return now + self.options.verify_interval

    def _expired(self) -> list[Change]:
        return self._lose(self._expiry_reason(), stale=True)

    def _expiry_reason(self) -> str:
        why = (
            f"no heartbeat succeeded for {self.options.ttl:g}s (the TTL): the registry no "
            "longer holds our entry as alive"
        )
        if self.last_error:
            why += f"; last error: {self.last_error}"
        return why

    def _lose(self, why: str, *, stale: bool) -> list[Change]:
        self.counters.lease_losses += 1
        self._lost_entry = True
        # A shared lease stays the backend's to keep or revoke: only ours may be orphaned.
        if stale and self.lease is not None and not self.lease.shared:
            self.stale = self.lease
        self._gone()
        self.last_error = self.lost_reason = scrub_credentials(why)
        return [Event(RegistrarEventKind.LEASE_LOST, self.last_error)]

    def _gone(self) -> None:
        self.written = None
        self.lease = None
        self.expires_at = None
        self.seen = None
        self._set_actual(None)

    def _set_actual(self, status: HealthStatus | None) -> None:
        self.actual = status

    def _lease_lost(self, why: str) -> LeaseLost:
        return LeaseLost(
            why, service=self.instance.service, instance=self.instance.id, backend=self.backend
        )

    def _read_back(self, found: InstanceHealth) -> list[Change]:
        """Compare our entry's health in the registry with the status we wrote."""
        just_wrote, self._just_wrote = self._just_wrote, False
        before, self.seen = self.seen, found
        if found.status is self.actual:
            if self.external is not None:
                self.external = None
                return [HeldAgain(found.status)]
            return []
        if not just_wrote and (before is None or before.status is not found.status):
            # e.g. our TTL check turned critical while we were frozen: write our
            # status again (SET_STATUS comes next), then read it back.
            self._set_actual(found.status)
            return []
        # The registry says otherwise right after we wrote our status, or still
        # says what it said last time: someone else holds it so (maintenance
        # mode, a node check, another check). Report it; rewriting won't help.
        if self.external is not found.status:
            self.external = found.status
            return [HeldElsewhere(found.status, self.actual, scrub_credentials(found.note))]
        return []
