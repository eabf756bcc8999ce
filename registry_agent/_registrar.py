"""AsyncRegistrar: keeps one instance registered while it is healthy, whatever happens.

One registrar runs one set of checks and one health gate, and one lane per backend
(:class:`~registry_agent._lane.BackendLane`): its own healing machine, reconcile
loop, lease, follows, retries and backoff. A registry that is down, throttling or
refusing slows only its lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Unpack

from registry_agent._backend import Backend, Lease
from registry_agent._env import carried_options
from registry_agent._errors import (
    ConfigError,
    RegistryError,
    Rejected,
)
from registry_agent._fork import ForkGuard
from registry_agent._health.checks import CheckResult, HealthCheck, as_check
from registry_agent._health.gate import GateState, HealthGate
from registry_agent._identity import (
    describe_identity,
    identity_of,
    listed_backends,
    open_listed,
)
from registry_agent._lane import BackendLane, close_owned
from registry_agent._models import ServiceInstance, weight_text
from registry_agent._options import HEARTBEAT_FLOOR, TTL_FLOOR, OptionArgs, RegistrationOptions
from registry_agent._registration import (
    RegistrarEventKind,
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

# What a withdrawn registrar logs at WARNING: leaving discovery because unhealthy.
_WITHDRAWALS = frozenset(
    {
        RegistrarEventKind.STATE_CHANGED,
        RegistrarEventKind.DEREGISTERED,
        RegistrarEventKind.STATUS_CHANGED,
    }
)

# The "(backend=…, service=…, instance=…)" a RegistryError's text ends with.
_CONTEXT = re.compile(r" \(backend=[^()]*\)$")

#: What ``backend`` may be: a URL, a Backend, or a non-empty sequence of them; None:
#: the backends the environment names (``backends_from_env``).
BackendArg = str | Backend | Sequence[str | Backend] | None


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


def updated_instance(
    instance: ServiceInstance,
    *,
    tags: Iterable[str] | None = None,
    meta: Mapping[str, str | int] | None = None,
    weight: int | None = None,
) -> ServiceInstance:
    """``instance`` with new ``tags``, ``meta`` (each replacing the old whole; None: kept)
    and ``weight`` (``meta["weight"]``), validated; ConfigError naming the field."""
    if tags is not None and (isinstance(tags, str) or not isinstance(tags, Iterable)):
        raise ConfigError(f"expected a list of strings, got {tags!r}", field="tags")
    if meta is not None and not isinstance(meta, Mapping):
        raise ConfigError(f"expected a mapping of strings, got {meta!r}", field="meta")
    new_meta: dict[str, Any] = dict(instance.meta if meta is None else meta)
    if weight is not None:
        new_meta["weight"] = weight_text(weight, "weight")
    return dataclasses.replace(
        instance,
        tags=tuple(instance.tags if tags is None else tags),
        meta=new_meta,
    )


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
            raise ConfigError(
                f'check names must be unique (give each a name: name = "…" in a config '
                f"table, name= in code), got {names}",
                field="checks",
            )
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
        self._stop_task: asyncio.Future[None] | None = None
        self._started = False
        self._signals: list[tuple[int, Any]] = []

    @classmethod
    def from_env(cls, instance: ServiceInstance, **kwargs: Unpack[RegistrarArgs]) -> AsyncRegistrar:
        """A registrar on the backends the environment names: ``REGISTRY_AGENT_BACKEND``,
        else Consul's ``CONSUL_HTTP_ADDR``…, else etcd's ``ETCDCTL_ENDPOINTS``… (see
        :func:`~registry_agent.backends_from_env`); the same as ``backend=None``."""
        return cls(None, instance, **kwargs)

    def _make_lanes(self, given: list[str | Backend], shared_liveness: bool) -> list[BackendLane]:
        many = len(given) > 1
        # Opening a backend creates no connection: clients appear on first use,
        # inside the process that runs start() (after a fork, not before).
        backends = [_open(item, f"backend[{i}]" if many else None) for i, item in enumerate(given)]
        _refuse_same_registry(given, backends)
        names = _lane_names(given, backends)
        return [
            BackendLane(
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
        for lane in self._lanes:
            lane.observe()
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

    async def update(
        self,
        *,
        tags: Iterable[str] | None = None,
        meta: Mapping[str, str | int] | None = None,
        weight: int | None = None,
    ) -> None:
        """Change the entry's tags, meta or weight in place, in every backend.

        ``tags`` and ``meta`` replace the current ones whole (None: keep them);
        ``weight`` (a whole number >= 0) is kept as ``meta["weight"]`` and set after
        ``meta``: a ``meta`` without ``"weight"`` and no ``weight`` drops the weight.
        The service, id, address and port cannot change (that is another instance:
        a new registrar). The new instance is validated like ``start()`` does
        (:class:`~registry_agent.ConfigError` naming the field, or the backend's
        :class:`~registry_agent.Rejected`), raised here before anything is written.

        It returns at once; each backend then writes its entry again in place (a
        register of the same id on Consul, whose checks keep their status; a put of
        the same key on the same lease on etcd) and emits an ``updated`` event:
        watchers see one ``updated`` and never a gap. An entry not held now
        (withdrawn, not registered yet, the registry down) is written with the
        new values when it is registered again; a write that fails is retried
        with the usual backoff. Counters and the health gate are kept.
        """
        if self._stopping:
            raise RuntimeError("the registrar is stopping: its entry cannot change")
        new = updated_instance(self.instance, tags=tags, meta=meta, weight=weight)
        if new == self.instance:
            return
        for lane in self._lanes:
            try:
                await lane.validate_instance(new)
            except (Rejected, ConfigError) as exc:
                raise self._naming(lane, exc) from None
        self.instance = new
        for lane in self._lanes:
            lane.reg.update(new)
            lane.wake_up()

    def _naming(
        self, lane: BackendLane, error: Rejected | ConfigError, *, many: bool | None = None
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
        lanes: list[BackendLane] = []
        unused: list[BackendLane] = []
        for item, lane in zip(given, fresh, strict=True):
            kept = self._lane_of(item)
            if kept is None:
                lanes.append(lane)
                continue
            if any(kept is other for other in lanes):  # its URL and its object
                await close_owned(fresh)
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
                await close_owned(added + unused)
                raise self._naming(lane, exc, many=len(lanes) > 1) from None
        await close_owned(unused)
        if self._stopping:  # stopped while a backend validated
            await close_owned(added)
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

    def _start_lanes(self, lanes: list[BackendLane]) -> None:
        if self._started:
            for lane in lanes:
                lane.start()
        self.lanes_changed()

    def _lane_of(self, item: str | Backend) -> BackendLane | None:
        """The running lane of ``item``: the same object, or the same URL (credentials
        and options too: other ones make a new backend)."""
        for was, lane in zip(self._given, self._lanes, strict=True):
            if item is lane.backend or item is was:
                return lane
            if (
                isinstance(item, str)
                and isinstance(was, str)
                and item == was
                and carried_options(item) == carried_options(was)
            ):
                return lane
        return None

    async def _drop_lanes(self, lanes: list[BackendLane], timeout: float) -> None:
        """Stop ``lanes`` (no longer ours) and remove their entries, each within ``timeout``."""
        if not lanes:
            return
        for lane in lanes:
            lane.dropped = True
        if not self._started:
            await close_owned(lanes)
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
        A failure a retry can fix (the registry unreachable, a reset, a 503 or 429)
        is retried with a short jittered backoff (its ``Retry-After`` honoured)
        until a little before ``timeout``; a :class:`~registry_agent.Rejected` one
        is not. Never raises: hanging checks are abandoned, and an entry still not
        removed is marked critical if the registry takes that write in the time
        left (own lease), then one WARNING ``<id> not deregistered: <error>`` is
        logged (and kept in ``status()``'s ``last_error``), leaving the entry to
        expire with its TTL. In a process that inherited the registrar through
        ``fork()`` it returns at once.
        """
        if self._fork.in_child("stop()"):
            return
        if self._stop_task is None:
            self._stopping = True
            self._stop_task = asyncio.ensure_future(self._shutdown_logged(timeout))
        # Shielded: a caller cancelled (an ASGI server's shutdown timeout) leaves the stop
        # running to its end, and a later stop() waits for that one (a second shutdown
        # would find nothing left to close: the probe and the backend kept running).
        await asyncio.shield(self._stop_task)

    async def _shutdown_logged(self, timeout: float) -> None:
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
            state=str(self._shown_state(lanes)),
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

    def _shown_state(self, lanes: tuple[BackendStatus, ...]) -> GateState:
        """The state :meth:`snapshot` shows: the gate's, except ``starting`` while a gate
        that lets the entry in (no checks, or checks up) has not had it written yet (not
        started, or no registry has taken it so far)."""
        state = self.state
        if state is GateState.REGISTERED and not (
            self._started
            and any(
                lane.counters["registrations"] or lane.counters["reregistrations"] for lane in lanes
            )
        ):
            return GateState.STARTING
        return state

    def status(self) -> dict[str, Any]:
        """A JSON-ready view: :meth:`snapshot` as a dict (what the agent's ``/status`` shows)."""
        return self.snapshot().to_dict()

    def readiness(self, lane: BackendLane) -> tuple[bool, str | None]:
        """``(ready, why not)`` of one backend's entry."""
        failing = "" if self.gate.healthy else self.failing_checks()
        lane.observe()
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
            "error": None,  # always present (a formatter may read record.error)
            **more,
        }

    def _emit(self, kind: RegistrarEventKind, detail: str, lane: BackendLane | None = None) -> None:
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
            # Taken out of discovery (or marked critical) because unhealthy: WARNING too.
            loud = loud or (self.state is GateState.WITHDRAWN and kind in _WITHDRAWALS)
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
            for sig, previous in self._signals:
                loop.remove_signal_handler(sig)
                # remove_signal_handler leaves SIG_DFL: a second SIGTERM while the
                # server drains would kill it instead of reaching the server's handler.
                if previous is not None:
                    with contextlib.suppress(ValueError, OSError):
                        signal.signal(sig, previous)
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
