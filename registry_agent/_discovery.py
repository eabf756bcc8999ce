"""AsyncDiscovery: an always-fresh cache of instances per service, and instance choice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any

from registry_agent._backend import Backend
from registry_agent._errors import (
    BackendUnavailable,
    ConfigError,
    NoInstanceAvailable,
    RegistryError,
)
from registry_agent._fork import ForkGuard
from registry_agent._lkg import _daemon_call
from registry_agent._lkg import last_known_good as _last_known_good
from registry_agent._models import InstanceHealth, ServiceInstance
from registry_agent._outliers import OutlierTracker
from registry_agent._policy import DiscoveryPolicy, preferred
from registry_agent._retry import RetryPolicy
from registry_agent._select import Selector, Strategy, as_strategy
from registry_agent._watcher import AsyncWatcher, Backends, open_backends

__all__ = ["AsyncDiscovery"]

# How long is_service() trusts a registry's list of service names.
_SERVICES_TTL = 3.0
# How long is_service() repeats a registry's failure to list them before asking again.
_SERVICES_FAILED_TTL = 1.0
_NO_POLICY = DiscoveryPolicy()


def _check_policies(
    policy: DiscoveryPolicy | None, policies: Mapping[str, DiscoveryPolicy] | None
) -> dict[str, DiscoveryPolicy]:
    if policy is not None and not isinstance(policy, DiscoveryPolicy):
        raise ConfigError(f"expected a DiscoveryPolicy or None, got {policy!r}", field="policy")
    if policies is None:
        return {}
    if not isinstance(policies, Mapping):
        raise ConfigError(
            f"expected a mapping of service name to DiscoveryPolicy, got {policies!r}",
            field="policies",
        )
    for name, value in policies.items():
        if not isinstance(name, str) or not isinstance(value, DiscoveryPolicy):
            raise ConfigError(
                f"expected a service name mapped to a DiscoveryPolicy, got {name!r}: {value!r}",
                field="policies",
            )
    return dict(policies)


class _Plan:
    """What choose() weighs for a service under one policy while the watcher's view
    of it stays the same object (the watcher replaces it on every change): built by
    the first choice after a change, reused until the next one."""

    __slots__ = (
        "candidates",
        "eligible",
        "endpoints",
        "healthy",
        "levels",
        "policy",
        "state",
        "watcher",
        "with_port",
    )

    def __init__(
        self,
        policy: DiscoveryPolicy,
        watcher: AsyncWatcher | None,
        state: object,
        healthy: list[ServiceInstance],
    ) -> None:
        self.policy = policy
        self.watcher = watcher
        self.state = state
        self.healthy = healthy
        # An entry without a port (registered by another tool) is no target to connect to.
        self.with_port = [i for i in healthy if i.port]
        self.eligible = (
            [i for i in self.with_port if policy.matches(i)] if policy.filters else self.with_port
        )
        self.endpoints = tuple((i.address, i.port) for i in self.eligible)
        # Per eligible instance, how many leading ``prefer`` entries it matches.
        entries = list(policy.prefer.items())
        self.levels = [_level(i, entries) for i in self.eligible] if entries else []
        # The choice when none is ejected or excluded: the best locality tier.
        self.candidates = (
            preferred(self.eligible, policy.prefer) if policy.prefer else self.eligible
        )


def _level(instance: ServiceInstance, entries: list[tuple[str, str]]) -> int:
    """How many of ``entries`` (locality, most important first) ``instance`` matches
    before the first it does not: it is in every tier of :func:`preferred` up to it."""
    matched = 0
    for key, value in entries:
        if instance.meta.get(key) != value:
            break
        matched += 1
    return matched


def _name(value: object, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected a service name (non-empty text), got {value!r}", field=field)
    return value


class AsyncDiscovery:
    """Instances of any service, served from a watcher-backed cache.

    The first call for a service starts a watch and waits (up to
    ``sync_timeout``) for its first read; from then on answers come from
    memory and stay fresh. With ``keep_last_nonempty=True`` a service that
    suddenly reads empty keeps being served its last non-empty set (protection
    against a registry wiped or cut off; off by default: an empty list is a fact).

    ``backend`` is a URL or a :class:`Backend`, or a list of them: one view
    merged over several registries, as :class:`AsyncWatcher` gives it (an
    instance held by several counts once, healthy when any says passing; a
    registry that is down keeps its last view). The first call for a service
    then waits until one registry has answered and each other has answered or
    failed once, or, when one keeps silent, ``sync_timeout`` (then it serves what
    the others said). That hold is paid once per service: a registry that stays
    silent delays the first call for each service it is asked about by up to
    ``sync_timeout``, later calls not at all. An instance's ``id`` can change
    between calls while its ``address:port`` stays (the registry shown for it
    changed): key by the endpoint.

    ``policy`` (a :class:`DiscoveryPolicy`) applies to every service, ``policies``
    per service name (replacing ``policy`` for that service): filters, locality
    preference and outlier ejection in :meth:`choose`, fed by :meth:`report`.

    ``last_known_good`` (a directory, opt-in) keeps each service's set on disk,
    saved off the event loop when it changed. When a service's first read fails
    (every backend failed once: refused, timed out; or ``sync_timeout`` passed)
    and its file exists, that set is served at once, marked stale
    (:meth:`stale` is True, each ``InstanceHealth.note`` says ``stale: last known
    good from <UTC time>``; one WARNING), until the registry answers (one INFO).
    A file older than ``last_known_good_max_age`` seconds (default: any age) is
    not used. Files hold instances and their health only, never credentials.
    """

    def __init__(
        self,
        backend: Backends,
        *,
        keep_last_nonempty: bool = False,
        sync_timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        on_error: Callable[[str, BaseException], None] | None = None,
        selector: Selector | None = None,
        policy: DiscoveryPolicy | None = None,
        policies: Mapping[str, DiscoveryPolicy] | None = None,
        last_known_good: str | os.PathLike[str] | None = None,
        last_known_good_max_age: float | None = None,
    ) -> None:
        self._policies = _check_policies(policy, policies)
        # Opt-in: each service's served set kept on disk, served stale while the registry is down.
        self._lkg = _last_known_good(last_known_good, last_known_good_max_age)
        #: The policy of every service without one of its own in ``policies``.
        self.policy: DiscoveryPolicy = policy if policy is not None else _NO_POLICY
        # Failures and ejections per endpoint, fed by report() from any thread.
        self._outliers = OutlierTracker()
        # Per backend index, (service names, read at) for is_service(); its failure
        # (error, at), repeated for a second; its read in flight, shared by every caller.
        self._names: dict[int, tuple[frozenset[str], float]] = {}
        self._names_failed: dict[int, tuple[BaseException, float]] = {}
        self._names_reads: dict[int, asyncio.Future[None]] = {}
        # Per name, (a last-known-good file exists, looked at) for is_service().
        self._files: dict[str, tuple[bool, float]] = {}
        # Per (service, policy), (the watcher's state object, its candidates) for report().
        self._eligible: dict[tuple[str, DiscoveryPolicy], tuple[object, list[ServiceInstance]]] = {}
        # Per (service, id of the policy object), what choose() weighs while the watcher's
        # view stays the same (the plan holds its policy: the id is not reused meanwhile).
        self._plans: dict[tuple[str, int], _Plan] = {}
        self._members = open_backends(backend)
        self._borrowed = tuple(replace(member, owned=False) for member in self._members)
        #: Every backend watched, in the order given.
        self.backends: tuple[Backend, ...] = tuple(m.backend for m in self._members)
        #: The first backend (the only one, unless several were given).
        self.backend: Backend = self.backends[0]
        self.keep_last_nonempty = keep_last_nonempty
        self.sync_timeout = sync_timeout
        self.retry = retry
        self.on_error = on_error
        self.selector = selector or Selector()
        self._watchers: dict[str, AsyncWatcher] = {}
        # Services served once: never waited for again.
        self._served: set[str] = set()
        # Per service, the watch's latest error: the server's own words for a timed-out first read.
        self._last_error: dict[str, BaseException] = {}
        self._last_nonempty: dict[tuple[str, bool], list[ServiceInstance]] = {}
        self._lock = asyncio.Lock()
        # Armed by the first watch: what runs from then on belongs to this process.
        self._fork: ForkGuard | None = None
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the discovery is closed: create a new one")

    @classmethod
    def from_env(cls, **kwargs: Any) -> AsyncDiscovery:
        """Discovery over the backends the environment names (see
        :func:`~registry_agent.backends_from_env`); the same as ``backend=None``.
        ``kwargs``: the constructor's keywords."""
        return cls(None, **kwargs)

    async def _watcher(self, service: str) -> AsyncWatcher:
        self._check_open()
        watcher = self._watchers.get(service)
        if watcher is None:
            async with self._lock:
                self._check_open()  # closed while this call waited for the lock
                watcher = self._watchers.get(service)
                if watcher is None:
                    watcher = AsyncWatcher(
                        list(self.backends),
                        service,
                        retry=self.retry,
                        on_error=self._note_error,
                    )
                    # Our backends, named in logs as we name them (the watcher never owns them).
                    watcher._members = self._borrowed
                    if self._fork is None:
                        self._fork = ForkGuard("AsyncDiscovery")
                    await watcher.start()
                    self._watchers[service] = watcher
        if service in self._served:
            return watcher
        started = time.monotonic()
        if not watcher.synced(service):
            timeout = self.sync_timeout
            if self._lkg is not None:  # every backend failed: the file, at once
                left = await self._lkg.first_read(service, watcher, timeout, self._last_error)
                if left is None:  # served stale from the last known good file
                    self._served.add(service)
                    return watcher
                timeout = left
            synced = await watcher.wait_synced(timeout)
            if not synced and not watcher._read_by_any(service):
                raise self._unsynced(service)
        # Over several backends, one that neither answers nor fails (a black hole) does
        # not hold the others' view back longer than sync_timeout, once per service. One
        # that failed (a timeout: it may only be slow) is waited for within sync_timeout
        # when the others hold no healthy instance: "none" is not an answer yet.
        deadline = started + self.sync_timeout
        while (  # noqa: ASYNC110 - the watcher's state has no event of its own for this
            len(self.backends) > 1
            and not watcher._read_by_all(service)
            and not any(h.healthy for h in watcher.snapshot(service))
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        self._served.add(service)
        return watcher

    def _note_error(self, service: str, error: BaseException) -> None:
        self._last_error[service] = error
        if self.on_error is not None:
            self.on_error(service, error)

    def _unsynced(self, service: str) -> BackendUnavailable:
        """The error for a first read that did not arrive in time, with the watch's last error."""
        registries = "the registry" if len(self.backends) == 1 else "any of the registries"
        message = f"no answer from {registries} within {self.sync_timeout:g}s"
        last = self._last_error.get(service)
        if last is None:
            return BackendUnavailable(message, service=service)
        words = last.message if isinstance(last, RegistryError) else str(last)
        backend = last.backend if isinstance(last, RegistryError) else None
        error = BackendUnavailable(
            f"{message}; last error: {words}", service=service, backend=backend
        )
        error.__cause__ = last
        return error

    def _no_longer_stale(self, service: str, why: str) -> BackendUnavailable:
        """The error once a stale set may no longer be served and the registry has not
        answered: why, and the watch's last error."""
        last = self._last_error.get(service)
        message = f"no answer from the registry yet, and {why}"
        if last is None:
            return BackendUnavailable(message, service=service)
        words = last.message if isinstance(last, RegistryError) else str(last)
        backend = last.backend if isinstance(last, RegistryError) else None
        error = BackendUnavailable(
            f"{message}; last error: {words}", service=service, backend=backend
        )
        error.__cause__ = last
        return error

    async def health(self, service: str) -> list[InstanceHealth]:
        """Every instance of ``service`` with its health, ordered by id."""
        watcher = await self._watcher(service)
        if self._lkg is not None:  # the stale set while it is served; saves a changed set
            found = self._lkg.health(service, watcher, self._last_error)
            if found is None:  # served stale until now: no longer (too old, or refused)
                raise self._no_longer_stale(service, self._lkg.ended(service) or "")
            return found
        return watcher.snapshot(service)

    def stale(self, service: str) -> bool:
        """True while ``service`` is served from its last-known-good file (the registry
        has not answered since this discovery started); always False without
        ``last_known_good``. Not async; safe from any thread."""
        return self._lkg is not None and self._lkg.stale(service, self._watchers.get(service))

    async def instances(self, service: str, healthy_only: bool = True) -> list[ServiceInstance]:
        """The instances of ``service`` (by default only the passing ones), ordered by id."""
        found = [h.instance for h in await self.health(service) if h.healthy or not healthy_only]
        if self.keep_last_nonempty:
            key = (service, healthy_only)
            if found:
                self._last_nonempty[key] = found
            else:
                return list(self._last_nonempty.get(key, ()))
        return found

    async def choose(
        self,
        service: str,
        strategy: str | Strategy = Strategy.ROUND_ROBIN,
        *,
        exclude: Collection[str | ServiceInstance] = (),
        policy: DiscoveryPolicy | None = None,
    ) -> ServiceInstance:
        """One healthy instance of ``service`` with a port, skipping those in ``exclude``.

        ``exclude`` holds ids (every instance with that id: on Consul, ids are
        unique per node only) or instances (exactly those).
        Instances read without a port (``port`` 0: another tool's entry) are
        never chosen; :meth:`instances` and :meth:`health` still list them.

        ``policy`` (default: :meth:`policy_for`) filters by tags and meta, leaves out
        endpoints ejected as outliers (see :meth:`report`), then prefers locality:
        the choice is among the candidates matching every ``prefer`` entry, else all
        but the last, ..., else all of them.
        Raises :class:`NoInstanceAvailable` when there is none, saying why.
        """
        strategy = as_strategy(strategy)
        policy = self._policy(service, policy)
        if exclude.__class__ is not tuple and (
            isinstance(exclude, str | bytes) or not isinstance(exclude, Collection)
        ):
            raise ConfigError(
                f"expected a collection of ids or instances, e.g. ({exclude!r},), got {exclude!r}",
                field="exclude",
            )
        plan = self._plan(service, policy)
        if plan is None:  # the first choice since the watcher's view changed
            plan = self._new_plan(service, policy, await self.instances(service))
        return self._pick(service, policy, plan, strategy, exclude)

    def _plan(self, service: str, policy: DiscoveryPolicy) -> _Plan | None:
        """The plan kept for ``service`` under ``policy`` when the watcher's view has not
        changed since it was made; else None. Safe from any thread."""
        plan = self._plans.get((service, id(policy)))
        if plan is None or plan.policy is not policy:
            return None
        watcher = self._watchers.get(service)
        if watcher is None or plan.watcher is not watcher:
            return None
        if watcher._state.get(service) is not plan.state:
            return None
        return plan

    def _new_plan(
        self, service: str, policy: DiscoveryPolicy, healthy: list[ServiceInstance]
    ) -> _Plan:
        """The plan for ``healthy`` (what instances() just served), kept when it is the
        watcher's current view (not a stale set from the last-known-good file)."""
        watcher = self._watchers.get(service)
        state = watcher._state.get(service) if watcher is not None else None
        plan = _Plan(policy, watcher, state, healthy)
        if state is not None and service in self._served and not self.stale(service):
            if len(self._plans) >= 1024:  # many policies made per call: start over
                self._plans.clear()
            self._plans[(service, id(policy))] = plan
        return plan

    def _pick(
        self,
        service: str,
        policy: DiscoveryPolicy,
        plan: _Plan,
        strategy: Strategy,
        exclude: Collection[str | ServiceInstance],
    ) -> ServiceInstance:
        """choose() on a plan: leaves out ejected and excluded instances, prefers locality."""
        candidates = plan.candidates
        eligible = plan.eligible
        ejected: list[ServiceInstance] = []
        if policy.outliers is not None:
            _, ejected = self._outliers.split(
                service, eligible, policy.outliers, key=policy, endpoints=plan.endpoints
            )
        if ejected or exclude:
            out = {id(i) for i in ejected}  # the very objects of ``eligible``
            keep = [
                n
                for n, i in enumerate(eligible)
                if id(i) not in out and not (exclude and (i.id in exclude or i in exclude))
            ]
            if plan.levels and keep:  # the best locality tier left (see preferred())
                levels = plan.levels
                best = max(levels[n] for n in keep)
                if best:
                    keep = [n for n in keep if levels[n] >= best]
            candidates = [eligible[n] for n in keep]
        chosen = self.selector.pick(service, candidates, strategy)
        if chosen is None:
            raise self._none_left(
                service, policy, plan.healthy, plan.with_port, plan.eligible, ejected, exclude
            )
        return chosen

    def _choose_now(
        self,
        service: str,
        strategy: str | Strategy,
        exclude: Collection[str | ServiceInstance],
        policy: DiscoveryPolicy | None,
    ) -> ServiceInstance | None:
        """choose() without the event loop when a plan for the watcher's current view is
        kept (thread-safe: it only reads what the loop replaces); None otherwise (then
        call choose() on the loop). Raises as choose() does."""
        if exclude.__class__ is not tuple or self._closed:
            return None
        strategy = as_strategy(strategy)
        chosen = self._policy(service, policy)
        plan = self._plan(service, chosen)
        if plan is None:
            return None
        return self._pick(service, chosen, plan, strategy, exclude)

    def _none_left(
        self,
        service: str,
        policy: DiscoveryPolicy,
        healthy: Sequence[ServiceInstance],
        with_port: Sequence[ServiceInstance],
        eligible: Sequence[ServiceInstance],
        ejected: Sequence[ServiceInstance],
        exclude: Collection[str | ServiceInstance],
    ) -> NoInstanceAvailable:
        """Why choose() found nothing, in words."""
        portless = len(healthy) - len(with_port)
        message = "no healthy instance"
        if policy.filters:
            message += f" matching {policy.describe()}"
        if exclude:
            message += " left to try"
        if portless:
            message += f" with a port ({portless} without one)"
        reasons = []
        if not healthy:
            watcher = self._watchers.get(service)
            known = len(watcher.snapshot(service)) if watcher is not None else 0
            if self._lkg is not None and self.stale(service):
                known = len(self._lkg.stale_set(service) or ())
            if known:
                reasons.append(f"{known} registered, none passing")
        unmatched = len(with_port) - len(eligible)
        if unmatched:
            reasons.append(f"{unmatched} healthy do not match")
        if ejected:
            reasons.append(f"{len(ejected)} ejected as outliers")
        said = ", ".join(reasons)
        stale = self._lkg.describe(service, self._last_error) if self._lkg is not None else None
        if stale is not None and self.stale(service):
            said = f"{said}; {stale}" if said else stale
        if said:
            message += f" ({said})"
        return NoInstanceAvailable(message, service=service)

    def policy_for(self, service: str) -> DiscoveryPolicy:
        """The policy of ``service``: its own from ``policies``, else ``policy``."""
        return self._policies.get(service, self.policy)

    def _policy(self, service: object, policy: object) -> DiscoveryPolicy:
        """The policy a call names (checked), else the service's; checks ``service``."""
        name = _name(service, "service")
        if policy is None:
            return self.policy_for(name)
        if not isinstance(policy, DiscoveryPolicy):
            raise ConfigError(f"expected a DiscoveryPolicy or None, got {policy!r}", field="policy")
        return policy

    def _candidates(self, service: str, policy: DiscoveryPolicy) -> list[ServiceInstance] | None:
        """What choose() would weigh now before ejection (healthy, with a port, passing
        the filter), from the watcher's current view; None while unknown without a read
        (no watch yet, or served from the last-known-good file). Safe from any thread:
        it only reads the watcher's state, an object replaced on every change."""
        plan = self._plan(service, policy)
        if plan is not None:
            return plan.eligible
        watcher = self._watchers.get(service)
        if watcher is None or service not in self._served or self.stale(service):
            return None
        state = watcher._state.get(service)
        memo = self._eligible.get((service, policy))
        if memo is not None and memo[0] is state and state is not None:
            return memo[1]
        healthy = [h.instance for h in watcher.snapshot(service) if h.healthy]
        if not healthy and self.keep_last_nonempty:
            healthy = list(self._last_nonempty.get((service, True), ()))
        with_port = [i for i in healthy if i.port]
        eligible = [i for i in with_port if policy.matches(i)] if policy.filters else with_port
        if len(self._eligible) >= 1024:  # many policies made per call: start over
            self._eligible.clear()
        self._eligible[(service, policy)] = (state, eligible)
        return eligible

    def report(
        self,
        service: str,
        instance: ServiceInstance,
        ok: bool,
        *,
        policy: DiscoveryPolicy | None = None,
    ) -> None:
        """Tell outlier ejection how a call to ``instance`` of ``service`` went.

        Not a coroutine, and thread-safe: call it from any thread. A no-op when the
        policy (``policy``, default :meth:`policy_for`) has no ``outliers``.
        Endpoints are keyed by ``address:port`` (an id may change between registries).
        A failure is a connect error or timeout, a TLS handshake failure, a read
        timeout, an HTTP 5xx or gRPC UNAVAILABLE; any other answer is a success.
        """
        chosen = self._policy(service, policy)
        if not isinstance(instance, ServiceInstance):
            raise ConfigError(
                f"expected the ServiceInstance choose() gave, got {instance!r}", field="instance"
            )
        if instance.service != service:
            raise ConfigError(
                f"expected an instance of {service!r}, got one of {instance.service!r}",
                field="instance",
            )
        if not isinstance(ok, bool):
            raise ConfigError(f"expected True or False, got {ok!r}", field="ok")
        rule = chosen.outliers
        if rule is not None and not self._closed:
            candidates = self._candidates(service, chosen)
            self._outliers.report(service, instance, ok, rule, key=chosen, candidates=candidates)

    def ejected(
        self, service: str, *, policy: DiscoveryPolicy | None = None
    ) -> list[ServiceInstance]:
        """The instances of ``service`` that :meth:`choose` leaves out as outliers now
        (under ``policy``, default :meth:`policy_for`), by address and port.

        Not a coroutine, thread-safe. It agrees with :meth:`choose`: only current
        candidates (healthy, passing the filter) count, and never more than the
        percent cap of them. Before the service's first choice (no watch yet) it
        judges from the endpoints reported so far. Empty when the policy has no
        ``outliers``.
        """
        chosen = self._policy(service, policy)
        if chosen.outliers is None:
            return []
        return self._outliers.ejected(
            service,
            chosen.outliers,
            key=chosen,
            candidates=self._candidates(service, chosen),
        )

    async def is_service(self, name: str) -> bool:
        """True when a registry lists ``name`` as a service; starts no watch.

        Each backend's ``services()`` is read at most every few seconds (its answer
        is cached); concurrent callers share one read in flight, bounded by
        ``sync_timeout``. True too when no backend can list its services. A registry
        error (every registry failing, none listing ``name``) propagates as a
        :class:`RegistryError`, and is repeated for a second without asking that
        registry again; one answering within ``sync_timeout`` suffices.
        """
        _name(name, "name")
        self._check_open()
        if self._serves(name):
            return True
        if self._lkg is not None and name not in self._watchers and await self._has_file(name):
            return True
        listing = [
            (n, b) for n, b in enumerate(self.backends) if callable(getattr(b, "services", None))
        ]
        if not listing:
            return True
        now = time.monotonic()
        reads: list[asyncio.Future[None]] = []
        for n, backend in listing:
            if n in self._names and now - self._names[n][1] <= _SERVICES_TTL:
                continue
            if n in self._names_failed and now - self._names_failed[n][1] <= _SERVICES_FAILED_TTL:
                continue
            read = self._names_reads.get(n)
            if read is None:
                read = self._names_reads[n] = asyncio.ensure_future(self._refresh_names(n, backend))
            reads.append(read)
        if reads:
            # Shielded: a caller cancelled (or timed out) leaves the shared read running.
            await asyncio.gather(*(asyncio.shield(r) for r in reads))
        if any(name in self._names[n][0] for n, _ in listing if n in self._names):
            return True
        for n, _ in listing:
            if n in self._names_failed:
                raise self._names_failed[n][0].with_traceback(None)
        return False

    async def _has_file(self, name: str) -> bool:
        """A last-known-good file exists for ``name`` (the answer kept a few seconds)."""
        if self._lkg is None:
            return False
        now = time.monotonic()
        known = self._files.get(name)
        if known is not None and now - known[1] <= _SERVICES_TTL:
            return known[0]
        path = self._lkg.store.path_for(name)
        try:  # bounded, in a thread of its own: a hung file system must not hang requests
            found = await asyncio.wait_for(_daemon_call(path.is_file), self.sync_timeout)
        except (TimeoutError, OSError):
            found = False
        if len(self._files) >= 1024:  # many names asked about: start over
            self._files.clear()
        self._files[name] = (found, now)
        return found

    def _serves(self, name: str) -> bool:
        """True when discovery already serves ``name``: its watch has read it, or it is
        served from the last-known-good file."""
        watcher = self._watchers.get(name)
        if watcher is not None and watcher._read_by_any(name):
            return True
        return self.stale(name)

    async def _refresh_names(self, number: int, backend: Backend) -> None:
        """Read one backend's service names into the cache (its failure too); never raises."""
        try:
            names = await self._read_names(backend)
        except Exception as exc:
            self._names.pop(number, None)
            self._names_failed[number] = (exc, time.monotonic())
        else:
            self._names[number] = (names, time.monotonic())
            self._names_failed.pop(number, None)
        finally:
            self._names_reads.pop(number, None)

    async def _read_names(self, backend: Backend) -> frozenset[str]:
        try:
            names = await asyncio.wait_for(backend.services(), self.sync_timeout)  # type: ignore[attr-defined]
        except TimeoutError:
            raise BackendUnavailable(
                f"no answer to the list of services within {self.sync_timeout:g}s"
            ) from None
        except RegistryError:
            raise
        except Exception as exc:
            raise BackendUnavailable(f"listing the services failed: {exc!r}") from exc
        return frozenset(str(n) for n in names)

    async def close(self) -> None:
        """Stop every watch. Afterwards :meth:`health`, :meth:`instances`,
        :meth:`choose` and :meth:`is_service` raise :class:`RuntimeError` and start
        nothing; :meth:`report` is ignored (a call that ends after close()).

        In a child process that inherited a discovery already watching through
        ``fork()`` it returns at once (with a warning): the watches belong to
        the parent.
        """
        self._closed = True
        watchers, self._watchers = list(self._watchers.values()), {}
        self._plans.clear()
        self._served.clear()
        if self._fork is not None and self._fork.in_child("close()"):
            return
        for read in list(self._names_reads.values()):  # is_service() reads in flight
            read.cancel()
        if self._lkg is not None:
            await self._lkg.close()
        for watcher in watchers:
            await watcher.close()
        for member in self._members:
            if member.owned:
                with contextlib.suppress(Exception):
                    await member.backend.close()

    async def __aenter__(self) -> AsyncDiscovery:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
