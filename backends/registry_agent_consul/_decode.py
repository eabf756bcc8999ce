"""Typed decoding of Consul's watch answers, and the picture of one service built from them.

Only the fields we read are decoded (``msgspec`` structs: unknown fields are
skipped without building Python objects for them). :class:`ServiceView` keeps
the last catalog entries, service checks and node checks of one service and
turns them into instances with their health, reusing the objects of entries
whose raw fields did not change, so a consumer comparing snapshots finds the
unchanged ones identical at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import msgspec

from registry_agent import ConfigError, HealthStatus, InstanceHealth, ServiceInstance

__all__ = [
    "CatalogEntry",
    "Check",
    "Decoded",
    "ServiceView",
    "decode_catalog",
    "decode_checks",
    "skip_warning",
]

Key = tuple[str, str]  # (node, service id): Consul's identity of an instance
S = TypeVar("S", bound=msgspec.Struct)


class CatalogEntry(msgspec.Struct, frozen=True, gc=False):
    """One entry of ``/v1/catalog/service/<service>`` (the fields we read)."""

    Node: str = ""
    Address: str = ""  # the node's: an instance without its own address uses it
    ServiceID: str = ""
    ServiceName: str = ""
    ServiceAddress: str = ""
    ServicePort: int = 0
    ServiceTags: tuple[str, ...] | None = None
    ServiceMeta: dict[str, str] | None = None


class Check(msgspec.Struct, frozen=True, gc=False):
    """One check of ``/v1/health/checks/<service>`` or ``/v1/health/state/<state>``."""

    Node: str = ""
    CheckID: str = ""
    Name: str = ""
    Status: str = ""
    Notes: str = ""
    Output: str = ""
    ServiceID: str = ""  # "" for a node check


class _Where(msgspec.Struct, gc=False):
    """What can still be read of an entry that is not what Consul sends (to name it)."""

    Node: Any = None
    ServiceID: Any = None


class Decoded(msgspec.Struct, gc=False):
    """A decoded answer: its readable entries, and where the unreadable ones were."""

    entries: list[Any]
    bad: list[tuple[str, str]]  # (node, service id) of each unreadable entry, as far as known


_RAW = msgspec.json.Decoder(list[msgspec.Raw])
_WHERE = msgspec.json.Decoder(_Where)
_CATALOG = msgspec.json.Decoder(list[CatalogEntry])
_CHECKS = msgspec.json.Decoder(list[Check])


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "?"


def _decode(body: str | bytes, decoder: msgspec.json.Decoder[list[S]], one: type[S]) -> Decoded:
    """All entries of a JSON array; raises ``msgspec.DecodeError`` (a ValueError) if no array.

    The whole array is decoded in one go; only when an entry does not have
    Consul's types (not Consul's answer, or a proxy's) is it decoded entry by
    entry, and the unreadable entries are reported instead of failing the rest.
    """
    try:
        return Decoded(decoder.decode(body), [])
    except msgspec.ValidationError:
        pass
    entries: list[Any] = []
    bad: list[tuple[str, str]] = []
    for raw in _RAW.decode(body):
        try:
            entries.append(msgspec.json.decode(raw, type=one))
        except msgspec.ValidationError:
            try:
                where = _WHERE.decode(raw)
                bad.append((_text(where.Node), _text(where.ServiceID)))
            except msgspec.ValidationError:  # not even an object
                bad.append(("?", "?"))
    return Decoded(entries, bad)


def decode_catalog(body: str | bytes) -> Decoded:
    """``/v1/catalog/service/<service>``'s answer: :class:`CatalogEntry` entries."""
    return _decode(body, _CATALOG, CatalogEntry)


def decode_checks(body: str | bytes) -> Decoded:
    """A list of checks (``/v1/health/checks/…``, ``/v1/health/state/…``): :class:`Check`."""
    return _decode(body, _CHECKS, Check)


def check_note(check: Check) -> str:
    """What a check says: its ``Output``, else ``"Name: Notes"`` (as the maintenance check)."""
    if check.Output:
        return check.Output
    if check.Name and check.Notes:
        return f"{check.Name}: {check.Notes}"
    return check.Name or check.Notes


Warn = Callable[[str, BaseException | str], None]  # (instance id, why) of a skipped entry
Preferred = Callable[[str], Sequence[str]]  # check ids whose note wins, for an instance id

log = logging.getLogger("registry_agent.consul")


def skip_warning(service: str, warned: set[tuple[str, str]]) -> Warn:
    """A :data:`Warn` that logs each skipped entry once per (service, id) in ``warned``."""

    def warn(instance_id: str, why: BaseException | str) -> None:
        key = (service, instance_id)
        if key in warned:
            return
        warned.add(key)
        log.warning(
            "skipping an entry of service %r that is not a valid instance: %s",
            service,
            why,
            extra={"event": "skip_foreign", "backend": "consul", "service": service},
        )

    return warn


class ServiceView:
    """The latest catalog entries, service checks and node checks of one service.

    Each ``set_*`` takes one decoded answer and the sequence number of the
    request that got it: ``set_catalog`` the number at which the answer was
    received, ``set_checks`` / ``set_node_checks`` the number at which their
    request was sent. An instance is shown only once its health is known: its
    checks have arrived, or a checks answer requested after the entry was
    first seen says it has none; likewise for its node's checks. Until then
    it is held back (:meth:`waiting` says which read would settle it).

    The other way round, an instance whose checks (or whose node's failing
    checks) vanish while the catalog still lists it is most likely being
    deregistered, with the catalog answer still on its way: it keeps the
    health it had until a catalog answer requested after that says whether
    it is still there (so a deregistration never shows as passing first).
    """

    def __init__(self, service: str, *, local_node: str | None, preferred: Preferred, warn: Warn):
        self.service = service
        self.local_node = local_node
        self._preferred = preferred
        self._warn = warn
        self.has_catalog = self.has_checks = self.has_nodes = False
        # Catalog: raw entry and its instance (None: not a valid instance), per key.
        self._entries: dict[Key, tuple[CatalogEntry, ServiceInstance | None]] = {}
        self._first_seen: dict[Key, int] = {}
        self._node_first_seen: dict[str, int] = {}
        self._order: list[tuple[str, Key]] = []  # (snapshot key, key), in snapshot order
        self._checks: dict[Key, list[Check]] = {}
        self._bad: set[Key] = set()  # instances (or node, "") with an unreadable check
        self._checks_asked = -1
        self._node_checks: dict[str, list[Check]] = {}
        self._nodes_asked = -1
        # Sequence number of the answer in which an instance's checks (a node's
        # failing checks) vanished while the catalog still listed it.
        self._vanished: dict[Key, int] = {}
        self._node_vanished: dict[str, int] = {}
        # Last health per key, with what it was made from (reused while that is unchanged).
        self._made: dict[Key, tuple[ServiceInstance, list[Check], list[Check], InstanceHealth]] = {}

    # -- answers --------------------------------------------------------------

    def set_catalog(self, answer: Decoded, received: int, asked: int = -1) -> bool:
        """Take a catalog answer; True when membership or an instance's fields changed.

        ``received``: the sequence number now; ``asked``: when its request was sent.
        """
        self.has_catalog = True
        old = self._entries
        new: dict[Key, tuple[CatalogEntry, ServiceInstance | None]] = {}
        for _node, service_id in answer.bad:
            self._warn(service_id, "an entry that is not what Consul's catalog returns")
        for entry in answer.entries:
            key = (entry.Node, entry.ServiceID)
            before = old.get(key)
            if before is not None and before[0] == entry:
                new[key] = before
                continue
            new[key] = (entry, self._instance(entry))
            self._first_seen.setdefault(key, received)
            self._node_first_seen.setdefault(entry.Node, received)
        changed = new.keys() != old.keys() or any(new[k] is not old[k] for k in new)
        self._entries = new
        for key in [k for k in self._first_seen if k not in new]:
            del self._first_seen[key]
        for key in [k for k, seen in self._vanished.items() if k not in new or asked > seen]:
            del self._vanished[key]
        nodes_now = {node for node, _ in new}
        for node in [
            n for n, seen in self._node_vanished.items() if n not in nodes_now or asked > seen
        ]:
            del self._node_vanished[node]
        if changed:
            nodes = {node for node, _ in new}
            for node in [n for n in self._node_first_seen if n not in nodes]:
                del self._node_first_seen[node]
            self._order = self._keys()
        return changed

    def set_checks(self, answer: Decoded, asked: int, received: int | None = None) -> None:
        """Take the service's checks, from a request sent at sequence number ``asked``."""
        self.has_checks = True
        grouped: dict[Key, list[Check]] = {}
        for check in answer.entries:
            grouped.setdefault((check.Node, check.ServiceID), []).append(check)
        for key in self._checks:
            if key not in grouped and key in self._entries:
                self._vanished[key] = asked if received is None else received
        for key in grouped:
            self._vanished.pop(key, None)
        self._checks = grouped
        self._bad = {key for key in answer.bad if key[1]}
        self._checks_asked = asked

    def set_node_checks(self, answer: Decoded, asked: int, received: int | None = None) -> None:
        """Take the node checks that are not passing, from a request sent at ``asked``."""
        self.has_nodes = True
        grouped: dict[str, list[Check]] = {}
        for check in answer.entries:
            if not check.ServiceID:
                grouped.setdefault(check.Node, []).append(check)
        for node, service_id in answer.bad:
            if not service_id or service_id == "?":
                grouped.setdefault(node, []).append(Check(Node=node, Status="?"))
        if self._node_checks:
            listed = {node for node, _ in self._entries}
            for node in self._node_checks:
                if node not in grouped and node in listed:
                    self._node_vanished[node] = asked if received is None else received
        for node in grouped:
            self._node_vanished.pop(node, None)
        self._node_checks = grouped
        self._nodes_asked = asked

    # -- what is known ----------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Every kind of answer has arrived once."""
        return self.has_catalog and self.has_checks and self.has_nodes

    def waiting(self) -> tuple[int | None, int | None]:
        """Sequence numbers after which a checks / node checks read would settle what is held back.

        ``None`` for a kind whose answers are enough for every instance shown.
        """
        checks = nodes = None
        for key, seen in self._first_seen.items():
            if seen >= self._checks_asked and key not in self._checks:
                checks = max(checks or 0, seen)
        for seen in self._node_first_seen.values():
            if seen >= self._nodes_asked:
                nodes = max(nodes or 0, seen)
        return checks, nodes

    def snapshot(self) -> dict[str, InstanceHealth]:
        """Every instance whose health is known, keyed as :meth:`_keys` says."""
        found: dict[str, InstanceHealth] = {}
        made: dict[Key, tuple[ServiceInstance, list[Check], list[Check], InstanceHealth]] = {}
        for name, key in self._order:
            instance = self._entries[key][1]
            if instance is None:  # (never: only valid instances have a snapshot key)
                continue
            if key in self._vanished or key[0] in self._node_vanished:
                kept = self._made.get(key)  # maybe being deregistered: as it was, until known
                if kept is not None:
                    made[key] = kept
                    found[name] = kept[3]
                continue
            checks = self._checks.get(key)
            if checks is None:
                if self._first_seen.get(key, 0) >= self._checks_asked:
                    continue  # its checks may not have arrived yet
                checks = []
            if self._node_first_seen.get(key[0], 0) >= self._nodes_asked:
                continue  # its node's health is not known yet
            if key in self._bad:
                self._warn(key[1], "one of its checks is not what Consul returns")
                continue
            node_checks = self._node_checks.get(key[0], [])
            before = self._made.get(key)
            if (
                before is not None
                and before[0] is instance
                and before[1] == checks
                and before[2] == node_checks
            ):
                health = before[3]
            else:
                try:
                    health = self._health(instance, [*node_checks, *checks])
                except ValueError as exc:  # a status Consul does not have
                    self._warn(key[1], exc)
                    continue
            made[key] = (instance, checks, node_checks, health)
            found[name] = health
        self._made = made
        return found

    # -- helpers ----------------------------------------------------------------

    def _instance(self, entry: CatalogEntry) -> ServiceInstance | None:
        try:
            return ServiceInstance.from_registry(
                service=entry.ServiceName,
                id=entry.ServiceID,
                address=entry.ServiceAddress or entry.Address,
                port=entry.ServicePort,
                tags=entry.ServiceTags or (),
                meta=entry.ServiceMeta or {},
                node=entry.Node,
            )
        except ConfigError as exc:
            self._warn(entry.ServiceID or "?", exc)
            return None

    def _health(self, instance: ServiceInstance, checks: Iterable[Check]) -> InstanceHealth:
        checks = list(checks)
        status = HealthStatus.worst(HealthStatus(c.Status) for c in checks)
        preferred = self._preferred(instance.id)

        def rank(check: Check) -> int:
            return preferred.index(check.CheckID) if check.CheckID in preferred else len(preferred)

        worst = sorted((c for c in checks if c.Status == status), key=rank)
        return InstanceHealth(instance, status, check_note(worst[0]) if worst else "")

    def _keys(self) -> list[tuple[str, Key]]:
        """Snapshot keys: the id; an id held by several nodes: ``node/id`` but for one.

        The one keeping the plain id is this agent's node's, else the first node by name.
        """
        local = self.local_node
        valid = (key for key, (_, instance) in self._entries.items() if instance is not None)
        ordered = sorted(valid, key=lambda k: (k[0] != local, k[0], k[1]))
        seen: set[str] = set()
        keys: list[tuple[str, Key]] = []
        for node, service_id in ordered:
            name = service_id if service_id not in seen or not node else f"{node}/{service_id}"
            seen.add(service_id)
            keys.append((name, (node, service_id)))
        return keys
