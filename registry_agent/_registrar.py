"""AsyncRegistrar: keeps one instance registered while it is healthy, whatever happens.

One registrar runs one set of checks and one health gate, and one lane per backend
(:class:`_BackendLane`): its own healing machine, reconcile loop, lease, follows,
retries and backoff. A registry that is down, throttling or refusing slows only its lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Unpack

from registry_agent._backend import Backend, Lease, LivenessNews, SharedLiveness
from registry_agent._connection import follow_connection
from registry_agent._errors import (
    BackendUnavailable,
    ConfigError,
    RegistryError,
    Rejected,
)
from registry_agent._fork import ForkGuard
from registry_agent._health.checks import CheckResult, HealthCheck, as_check
from registry_agent._health.gate import Desired, GateState, HealthGate, desired_registration
from registry_agent._identity import (
    describe_identity,
    identity_of,
    listed_backends,
    open_listed,
)
from registry_agent._models import InstanceHealth, ServiceInstance
from registry_agent._options import HEARTBEAT_FLOOR, TTL_FLOOR, OptionArgs, RegistrationOptions
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
from registry_agent._status import (
    BackendStatus,
    CheckStatus,
    RegistrationCounters,
    RegistrationStatus,
    frozen_mapping,
)
from registry_agent._urls import parse_backend_url

__all__ = [
    "HEARTBEAT_FLOOR",
    "TTL_FLOOR",
    "AsyncRegistrar",
    "BackendArg",
    "RegistrarArgs",
    "RegistrarEvent",
    "RegistrarEventKind",
    "RegistrationTimeout",
    "scrub_credentials",
]

log = logging.getLogger("registry_agent.registrar")

# The "(backend=…, service=…, instance=…)" a RegistryError's text ends with.
_CONTEXT = re.compile(r" \(backend=[^()]*\)$")

# Releasing a lease we abandoned is best effort: never wait longer than this for it.
_RELEASE_TIMEOUT = 2.0

#: What ``backend`` may be: a URL, a Backend, or a non-empty sequence of them.
BackendArg = str | Backend | Sequence[str | Backend]


def _accepts(function: Callable[..., Any], keyword: str) -> bool:
    """Whether ``function`` takes ``keyword`` (older backends' hooks may not)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == keyword or p.kind is p.VAR_KEYWORD for p in parameters)


def _one_or_many(backend: BackendArg) -> list[str | Backend]:
    """``backend`` as a list: one URL or Backend, or the items of a list or tuple of them
    (anything else is a ConfigError naming ``backend`` or ``backend[i]``)."""
    return listed_backends(backend)


def _open(given: str | Backend, where: str | None) -> Backend:
    """Open a URL (not connecting); ``where`` (``backend[1]``) names it in errors."""
    if not isinstance(given, str):
        return given
    return open_listed(given, where)


def _registry_key(given: str | Backend) -> object:
    """What makes two items one registry: the same URL (credentials aside; options
    such as an etcd prefix make another registry), or the same object."""
    if isinstance(given, str):
        url = parse_backend_url(given, default_port=0)
        hosts = tuple((host.lower(), port) for host, port in url.endpoints)
        return (url.scheme, hosts, url.path.rstrip("/"), tuple(sorted(url.query.items())))
    return id(given)


def _refuse_same_registry(given: list[str | Backend], backends: list[Backend]) -> None:
    """Two lanes writing one entry would take it from each other forever: refuse the
    same registry twice, by the backends' ``registry_identity`` where they have one
    (else the URL, credentials aside, or the object)."""
    seen: dict[Hashable, int] = {}
    for i, (item, backend) in enumerate(zip(given, backends, strict=True)):
        identity, said = identity_of(backend, _registry_key(item))
        first = seen.setdefault(identity, i)
        if first == i:
            continue
        if said:
            why = f"both write to {describe_identity(identity)}"
        elif isinstance(item, str):
            why = "the same URL, credentials aside"
        else:
            why = "the same object"
        raise ConfigError(
            f"the same registry as backend[{first}] ({why}): list each registry once",
            field=f"backend[{i}]",
        )


def _url_name(text: str) -> str:
    """A URL as events and logs name it: no credentials, no options (they may hold a token)."""
    url = parse_backend_url(text, default_port=0)
    hosts = ",".join(
        (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
        for host, port in url.endpoints
    )
    return f"{url.scheme}://{hosts}{url.path}"


def _object_name(backend: Backend) -> str:
    """A Backend object's own repr (credentials masked), or its scheme if it has none."""
    if type(backend).__repr__ is object.__repr__:
        return str(getattr(type(backend), "scheme", type(backend).__name__))
    return scrub_credentials(repr(backend))


def _lane_names(given: list[str | Backend], backends: list[Backend]) -> list[str]:
    """A name per backend, safe to log: the URL without credentials or options, or an
    object's repr (``ConsulBackend(consul://…)``); ``(backend[i])`` is added to a name
    that repeats."""
    bases = [
        _url_name(item) if isinstance(item, str) else _object_name(backend)
        for item, backend in zip(given, backends, strict=True)
    ]
    return [
        base if bases.count(base) == 1 else f"{base} (backend[{i}])" for i, base in enumerate(bases)
    ]


def _per_lane(pairs: Iterable[tuple[str, str]]) -> str:
    """One text for several backends: the text once when they all say the same."""
    listed = list(pairs)
    if len({text for _, text in listed}) == 1:
        return listed[0][1]
    return "; ".join(f"{name}: {text}" for name, text in listed)


def _any_ready(answers: list[tuple[str, bool, str | None]]) -> tuple[bool, str | None]:
    """``(ready, why not)`` over the backends' ``(name, ready, why not)``: ready when any is."""
    if len(answers) == 1:
        return answers[0][1], answers[0][2]
    if any(ok for _, ok, _ in answers):
        return True, None
    return False, _per_lane((name, why or "") for name, _, why in answers)


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
    #: The backend the event is about (its name in ``status()["backends"]``); "" for the
    #: health gate's own events (``state_changed``, ``stopped``).
    backend: str = ""


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

    Several registries at once: ``backend`` may be a non-empty sequence of URLs
    and Backends (``["consul://127.0.0.1:8500", "etcd://127.0.0.1:2379"]``). The
    checks and the health gate are shared; each backend keeps its own entry,
    lease, heartbeats, read-backs, retries and backoff, so one registry down,
    throttling or refusing never delays the others. :attr:`registered` and
    :attr:`ready` are true while ANY backend holds the entry (passing, for
    ``ready``): a secondary registry going down does not make the instance
    unready. ``status()["backends"]`` says what each backend holds; events name
    their backend (:attr:`RegistrarEvent.backend`). A list or tuple of one is the
    same as that one backend. The same registry twice is a
    :class:`~registry_agent.ConfigError`, however it is spelled: backends that say
    which entries they write (``registry_identity``: an etcd cluster and key prefix,
    a Consul agent) are compared by that, others by URL (credentials aside) or object.

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
        backend: BackendArg,
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
        self._shared_liveness = shared_liveness
        self._changing: asyncio.Lock | None = None  # held by set_backends
        #: What was given for each lane (a URL or a Backend), in the lanes' order.
        self._given = _one_or_many(backend)
        self._lanes = self._make_lanes(self._given, shared_liveness)
        #: Every backend, in the order given.
        self.backends: tuple[Backend, ...] = tuple(lane.backend for lane in self._lanes)
        #: The first backend (the only one, unless a sequence was given).
        self.backend: Backend = self.backends[0]
        self._backend_name = self._lanes[0].scheme

        self._fork = ForkGuard(f"AsyncRegistrar({instance.service}/{instance.id})")
        # The running loop's clock once started (time.monotonic for asyncio's own loops).
        self._clock: Callable[[], float] = time.monotonic
        self._results: dict[str, CheckResult] = {}
        self._registered: asyncio.Event | None = None  # set while every backend holds the entry
        self._rejected: asyncio.Event | None = None  # set while a backend refuses it
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._started = False
        self._signals: list[tuple[int, Any]] = []

    def _make_lanes(self, given: list[str | Backend], shared_liveness: bool) -> list[_BackendLane]:
        many = len(given) > 1
        # Opening a backend creates no connection: clients appear on first use,
        # inside the process that runs start() (after a fork, not before).
        backends = [_open(item, f"backend[{i}]" if many else None) for i, item in enumerate(given)]
        _refuse_same_registry(given, backends)
        names = _lane_names(given, backends)
        return [
            _BackendLane(
                self,
                i,
                names[i],
                backend,
                owned=isinstance(item, str),
                shared_liveness=shared_liveness,
                many=many,
            )
            for i, (item, backend) in enumerate(zip(given, backends, strict=True))
        ]

    # -- public API -------------------------------------------------------------------

    @property
    def state(self) -> GateState:
        """The health gate's state: starting, registered, withdrawn or stopped."""
        return self.gate.state

    @property
    def registered(self) -> bool:
        """True while a registry holds our entry (passing or critical): any of them,
        with several backends.

        False as soon as no registration or heartbeat has succeeded for a TTL:
        by then the registry has dropped the entry (etcd) or failed it (Consul).
        """
        now = self._clock()
        return any(lane.reg.registered(now) for lane in self._lanes)

    @property
    def ready(self) -> bool:
        """True while a registry holds our entry as passing (what ``/readyz`` reports):
        any of them, with several backends."""
        return self._readiness()[0]

    @property
    def counters(self) -> RegistrationCounters:
        """What this registrar has done: with several backends, their sums (each one's
        counts are in ``status()["backends"]``)."""
        if len(self._lanes) == 1:
            return self._lanes[0].reg.counters
        return RegistrationCounters.total(lane.reg.counters for lane in self._lanes)

    async def start(self, *, wait_registered: float | None = None) -> None:
        """Start checks and registration in the background and return at once.

        The instance is first checked against what the backend documents it
        accepts (``backend.validate``): a :class:`~registry_agent.Rejected` or
        :class:`~registry_agent.ConfigError` is raised here, before anything runs.

        With ``wait_registered``, wait up to that many seconds for the entry to
        be in the registry (in every backend, with several); on timeout, stop and
        raise :class:`RegistrationTimeout` (naming the backends still missing it).
        If a registry refuses the registration (:class:`~registry_agent.Rejected`:
        a permission or a value no retry can fix), stop and raise that at once.
        Without it, a refused registration is reported by :meth:`status` and
        the log, and retried slowly (at the backoff cap) in case an operator
        fixes the permission; the other backends go on meanwhile.
        """
        if self._started:
            raise RuntimeError("a registrar can be started once")
        await self.validate()
        # Created in a gunicorn master (preload) and started in a worker: the
        # registration is the worker's, so the worker's stop() must deregister.
        self._fork = ForkGuard(self._fork.what)
        self._started = True
        self._clock = asyncio.get_running_loop().time
        self._registered = asyncio.Event()
        self._rejected = asyncio.Event()
        for check in self.checks:
            self._tasks.append(asyncio.create_task(self._run_check(check), name=check.name))
        for lane in self._lanes:
            lane.start()
        if self.install_signal_handlers:
            self._install_signal_handlers()
        if wait_registered is not None:
            await self._wait_started(wait_registered)

    async def validate(self) -> None:
        """Check the instance and the options against what each backend documents it
        accepts, without I/O: the backend's optional ``validate(instance)`` and
        ``validate_options(ttl=…, deregister_critical_after=…[, on_unhealthy=…])``
        (Consul's 60 s floor; an etcd format that carries no health refuses "critical").
        Raises :class:`~registry_agent.Rejected` or :class:`~registry_agent.ConfigError`
        naming the field (and ``backend[i]``, with several backends); :meth:`start`
        runs it first."""
        for lane in self._lanes:
            try:
                await lane.validate()
            except (Rejected, ConfigError) as exc:
                raise self._naming(lane, exc) from None

    def _naming(
        self, lane: _BackendLane, error: Rejected | ConfigError, *, many: bool | None = None
    ) -> Rejected | ConfigError:
        """``error`` naming its backend as ``backend[i]``, when there are several
        (``many``: in the list being set, not the running one)."""
        if not (len(self._lanes) > 1 if many is None else many):
            return error
        where = f"backend[{lane.index}]"
        if isinstance(error, ConfigError):
            what = f"{error.field}: {error.reason}" if error.field else error.reason
            named: Rejected | ConfigError = ConfigError(
                f"{what} ({lane.name})", field=where, source=error.source
            )
        else:
            named = Rejected(
                f"{where} ({lane.name}): {error.message}",
                service=error.service,
                instance=error.instance,
                backend=error.backend,
            )
        named.__cause__ = error
        return named

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
        refused = [(lane, lane.reg.rejection) for lane in self._lanes if lane.reg.rejection]
        missing = [lane for lane in self._lanes if lane.reg.actual is None]
        why = _per_lane(
            (lane.name, _CONTEXT.sub("", lane.reg.last_error or f"health gate is {self.state}"))
            for lane in missing
        )
        await self.stop()
        for lane, rejection in refused:
            assert rejection is not None
            raise self._naming(lane, rejection)
        where = f" in {', '.join(lane.name for lane in missing)}" if len(self._lanes) > 1 else ""
        # One context, of the backends it is about (each error's own is dropped above).
        about = ",".join(dict.fromkeys(lane.scheme for lane in missing)) or self._backend_name
        raise RegistrationTimeout(
            f"not registered within {timeout:g}s{where}: {why}",
            service=self.instance.service,
            instance=self.instance.id,
            backend=about,
        )

    async def set_backends(self, backends: BackendArg, *, timeout: float = 10.0) -> None:
        """Change the registries the instance is kept in, without a gap in the others.

        ``backends`` is what the constructor takes. A backend already in use (the same
        object, or the same URL string) keeps its lane as it is: its entry, lease,
        follows and counters are untouched (no deregistration, no new
        registration). A backend no longer listed is stopped and its entry removed,
        each within ``timeout`` and all at once. A new backend starts registering at
        once under the current health gate: an instance already healthy is
        registered there without waiting for ``rise`` passes. A new backend for a
        registry being left (the same ``registry_identity``: other options or
        credentials) writes the same entry, so it registers once the old lane has
        removed it: a gap of one deregistration and one registration, there only. The lanes take the
        new list's order (``status()["backends"]`` indexes and names follow it).

        Raises :class:`~registry_agent.ConfigError` (an empty list, the same
        registry twice, a bad URL) or :class:`~registry_agent.Rejected` (a new
        backend refuses the instance or the options, see :meth:`validate`) before
        anything changes; :class:`RuntimeError` once stopping.
        """
        if self._changing is None:
            self._changing = asyncio.Lock()
        async with self._changing:  # one change at a time: each starts from the last
            await self._set_backends(backends, timeout)

    async def _set_backends(self, backends: BackendArg, timeout: float) -> None:
        if self._stopping:
            raise RuntimeError("the registrar is stopping: its backends cannot change")
        given = _one_or_many(backends)
        # Opens (no I/O) and checks the whole list as the constructor does; lanes of
        # backends already in use then replace their fresh stand-ins.
        fresh = self._make_lanes(given, self._shared_liveness)
        lanes: list[_BackendLane] = []
        unused: list[_BackendLane] = []
        for item, lane in zip(given, fresh, strict=True):
            kept = self._lane_of(item)
            if kept is None:
                lanes.append(lane)
                continue
            if any(kept is other for other in lanes):  # its URL and its object
                await _close_owned(fresh)
                raise ConfigError(
                    f"the same registry as backend[{lanes.index(kept)}]: list each backend once",
                    field=f"backend[{lane.index}]",
                )
            kept.take_place_of(lane)
            lanes.append(kept)
            unused.append(lane)
        added = [lane for lane in lanes if any(lane is f for f in fresh)]
        for lane in added:
            try:
                await lane.validate()
            except (Rejected, ConfigError) as exc:
                await _close_owned(added + unused)
                raise self._naming(lane, exc, many=len(lanes) > 1) from None
        await _close_owned(unused)
        if self._stopping:  # stopped while a backend validated
            await _close_owned(added)
            raise RuntimeError("the registrar is stopping: its backends cannot change")
        removed = [lane for lane in self._lanes if not any(lane is n for n in lanes)]
        # A new backend object for a registry we leave (new options or credentials)
        # writes the same entry: it registers once the old lane has removed it, or
        # that removal would take the new entry away until the next read-back.
        leaving = {
            identity_of(lane.backend, _registry_key(was))[0]
            for was, lane in zip(self._given, self._lanes, strict=True)
            if any(lane is r for r in removed)
        }
        after = [
            lane
            for item, lane in zip(given, lanes, strict=True)
            if any(lane is a for a in added)
            and identity_of(lane.backend, _registry_key(item))[0] in leaving
        ]
        self._given, self._lanes = given, lanes
        self.backends = tuple(lane.backend for lane in lanes)
        self.backend = self.backends[0]
        self._backend_name = lanes[0].scheme
        self._start_lanes([lane for lane in added if not any(lane is a for a in after)])
        await self._drop_lanes(removed, timeout)
        if not self._stopping:
            self._start_lanes(after)

    def _start_lanes(self, lanes: list[_BackendLane]) -> None:
        if self._started:
            for lane in lanes:
                lane.start()
        self.lanes_changed()

    def _lane_of(self, item: str | Backend) -> _BackendLane | None:
        """The running lane of ``item``: the same object, or the same URL (credentials
        and options too: other ones make a new backend)."""
        for was, lane in zip(self._given, self._lanes, strict=True):
            if item is lane.backend or item is was or (isinstance(item, str) and item == was):
                return lane
        return None

    async def _drop_lanes(self, lanes: list[_BackendLane], timeout: float) -> None:
        """Stop ``lanes`` (no longer ours) and remove their entries, each within ``timeout``."""
        if not lanes:
            return
        for lane in lanes:
            lane.dropped = True
        if not self._started:
            await _close_owned(lanes)
            return
        deadline = self._clock() + timeout
        results = await asyncio.gather(
            *(lane.shut_down(timeout, deadline) for lane in lanes), return_exceptions=True
        )
        for lane, result in zip(lanes, results, strict=True):
            if isinstance(result, Exception):
                lane.log_failure("stop", lane.registry_error(result), force=True)

    async def wait_registered(self, timeout: float | None = None) -> bool:
        """Wait until the entry is in the registry (every one of them, with several
        backends); False on timeout."""
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

        With several backends, each is deregistered at the same time, each within
        ``timeout``: one that does not answer never holds up the others.
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
            lane = self._lanes[0]
            lane.log_failure("stop", lane.registry_error(exc), force=True)

    async def _shutdown(self, timeout: float) -> None:
        deadline = self._clock() + timeout

        def left() -> float:
            return max(0.1, deadline - self._clock())

        self._remove_signal_handlers()
        for task in self._tasks:
            task.cancel()
        stopped = await asyncio.gather(
            *(lane.shut_down(timeout, deadline) for lane in self._lanes), return_exceptions=True
        )
        for lane, result in zip(self._lanes, stopped, strict=True):
            if isinstance(result, Exception):
                lane.log_failure("stop", lane.registry_error(result), force=True)
        self.gate_stopped()
        for check in self.checks:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(left()):
                    await check.aclose()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=left())
        self._emit(RegistrarEventKind.STOPPED, "")

    def gate_stopped(self) -> None:
        """Stop the health gate (once; a lane calls it when its loop has ended)."""
        if self.gate.stop() is not None:
            self._emit(RegistrarEventKind.STATE_CHANGED, "stopping")

    def snapshot(self) -> RegistrationStatus:
        """This registration's state now, as one typed value (``status()`` is its dict).

        ``registered``: the registry holds our entry (False once renewals have
        failed for a TTL). ``registry_status``: our entry's health as the
        registry reports it (None when not registered), ``registry_note`` its
        note when not passing. ``ready``: the registry holds our entry as
        passing; ``not_ready_reason`` says why not (None when ready).

        With several backends, ``backends`` holds each one's own state and the
        top-level fields sum them up: ``registered``/``ready`` when any backend
        holds the entry (as passing), ``registry_status``/``registry_note`` from
        the first backend that is ready (else the first that holds the entry),
        ``last_heartbeat`` the latest, ``last_error`` and ``not_ready_reason``
        each backend's prefixed with its name (a reason they all give, once),
        ``counters`` the sums, and
        ``backend`` the first backend's scheme. With one backend they are its own.
        """
        lanes = tuple(lane.status() for lane in self._lanes)
        best = next(
            (lane for lane in lanes if lane.ready),
            next((lane for lane in lanes if lane.registered), lanes[0]),
        )
        ready = any(lane.ready for lane in lanes)
        beats = [lane.last_heartbeat for lane in lanes if lane.last_heartbeat is not None]
        errors = [(lane.name, lane.last_error) for lane in lanes if lane.last_error]
        last_error = errors[0][1] if len(lanes) == 1 and errors else None
        if len(lanes) > 1 and errors:
            last_error = "; ".join(f"{name}: {error}" for name, error in errors)
        return RegistrationStatus(
            service=self.instance.service,
            instance=self.instance.id,
            backend=self._backend_name,
            state=str(self.state),
            registered=any(lane.registered for lane in lanes),
            registry_status=best.registry_status,
            registry_note=best.registry_note,
            ready=ready,
            not_ready_reason=_any_ready(
                [(lane.name, lane.ready, lane.not_ready_reason) for lane in lanes]
            )[1],
            last_heartbeat=max(beats) if beats else None,
            last_error=last_error,
            checks=frozen_mapping(
                {
                    check.name: CheckStatus(
                        self.gate.check_up(check.name), self._results.get(check.name)
                    )
                    for check in self.checks
                }
            ),
            counters=frozen_mapping(self.counters.to_dict()),
            backends=lanes,
        )

    def status(self) -> dict[str, Any]:
        """A JSON-ready view: :meth:`snapshot` as a dict (what the agent's ``/status`` shows)."""
        return self.snapshot().to_dict()

    def readiness(self, lane: _BackendLane) -> tuple[bool, str | None]:
        """``(ready, why not)`` of one backend's entry."""
        failing = "" if self.gate.healthy else self.failing_checks()
        return lane.reg.readiness(
            self._clock(), self.state, stopping=self._stopping, failing=failing
        )

    def _readiness(self) -> tuple[bool, str | None]:
        return _any_ready([(lane.name, *self.readiness(lane)) for lane in self._lanes])

    @property
    def _lease(self) -> Lease | None:
        return self._lanes[0].reg.lease

    def lanes_changed(self) -> None:
        """A lane's entry came or went, or was refused: update what start() waits for."""
        if self._registered is not None:
            if all(lane.reg.actual is not None for lane in self._lanes):
                self._registered.set()
            else:
                self._registered.clear()
        if self._rejected is not None:
            if any(lane.reg.rejection is not None for lane in self._lanes):
                self._rejected.set()
            else:
                self._rejected.clear()

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
                for lane in self._lanes:
                    lane.wake_up()
            await asyncio.sleep(max(0.0, check.interval - (loop.time() - started)))

    def failing_checks(self) -> str:
        """What the failing checks say, scrubbed (it is written into the registry)."""
        failing = [
            f"{name}: {result.detail}"
            for name, result in self._results.items()
            if not self.gate.check_up(name)
        ]
        # This note is written into the registry, readable by anyone who can read it.
        return scrub_credentials("; ".join(failing)) or "checks not passing"

    # -- events and logs -----------------------------------------------------------------

    def _extra(self, event: str, **more: Any) -> dict[str, Any]:
        return {
            "event": event,
            "service": self.instance.service,
            "instance": self.instance.id,
            "backend": ",".join(lane.log_name for lane in self._lanes),
            **more,
        }

    def _emit(
        self, kind: RegistrarEventKind, detail: str, lane: _BackendLane | None = None
    ) -> None:
        """Log ``kind`` and give it to ``on_event``; ``lane``: the backend it is about."""
        detail = scrub_credentials(detail)
        event = RegistrarEvent(
            kind, self.instance, self.state, detail, backend=lane.name if lane else ""
        )
        if kind is not RegistrarEventKind.BACKEND_UNAVAILABLE:
            # A shared lease's loss is logged once by the backend (with the count), not
            # once per registration (10,000 lines after one etcd wipe).
            shared = lane is not None and lane.shares_liveness
            loud = kind is RegistrarEventKind.LEASE_LOST and not shared
            level = logging.WARNING if loud else logging.INFO
            extra = (lane.extra if lane else self._extra)(kind.value, state=str(self.state))
            log.log(
                level,
                "%s %s: %s%s",
                lane.who if lane is not None else self.instance.id,
                kind.value,
                self.state,
                f" ({detail})" if detail else "",
                extra=extra,
            )
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("on_event callback failed", extra=self._extra("callback_failed"))

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


class _BackendLane:
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
        self._unfollow_connection: Callable[[], None] = lambda: None
        #: Set when the registrar let this backend go (``set_backends``): it stops alone.
        self.dropped = False

    @property
    def halted(self) -> bool:
        """The registrar is stopping, or has let this backend go."""
        return self.owner._stopping or self.dropped

    def take_place_of(self, other: _BackendLane) -> None:
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
            try:
                async with asyncio.timeout(left()):
                    await self.backend.deregister(reg.lease)
            except Exception as exc:
                self.log_failure("deregister", self.registry_error(exc), force=True)
            else:
                self._publish(reg.deregistered_on_stop())
        self._stop_following()  # a registration that finished while stopping
        if self.owned:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(left()):
                    await self.backend.close()

    def _stop_following(self) -> None:
        unfollow, self._unfollow = self._unfollow, None
        if unfollow is not None:
            unfollow()

    def status(self) -> BackendStatus:
        """This backend's part of ``status()``."""
        reg = self.reg
        ready, reason = self.owner.readiness(self)
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
            owner.instance,
            ttl=owner.ttl,
            status=reg.wanted,
            note=reg.note,
            deregister_critical_after=owner.deregister_critical_after,
        )

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
            self._unfollow = self.backend.follow(lease, self._on_news)

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


async def _close_owned(lanes: Iterable[_BackendLane]) -> None:
    """Close the backends the registrar opened itself (from a URL) in ``lanes``."""
    for lane in lanes:
        if lane.owned:
            with contextlib.suppress(Exception):
                await lane.backend.close()


def chain_signal(sig: int, previous: Any) -> None:
    """After our cleanup, hand a signal on as if we had not caught it."""
    if callable(previous):
        previous(sig, None)
    elif previous != signal.SIG_IGN:
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
