"""Typed decoding of Consul's watch answers, and the picture of one service built from them.

Only the fields we read are decoded (``msgspec`` structs: unknown fields are
skipped without building Python objects for them). :class:`ServiceView` keeps
the last catalog entries, service checks and node checks of one service and
turns them into instances with their health, reusing the objects of entries
whose raw fields did not change, so a consumer comparing snapshots finds the
unchanged ones identical at once.
"""

from __future__ import annotations

import itertools
import logging
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import msgspec

from registry_agent import ConfigError, HealthStatus, InstanceHealth, ServiceInstance
from registry_agent.backend import InstanceMap
from registry_agent_consul._flavors import read_instance

__all__ = [
    "CatalogEntry",
    "Check",
    "Decoded",
    "ServiceView",
    "TaggedAddress",
    "decode_catalog",
    "decode_checks",
    "skip_warning",
]

Key = tuple[str, str]  # (node, service id): Consul's identity of an instance
S = TypeVar("S", bound=msgspec.Struct)


class TaggedAddress(msgspec.Struct, frozen=True, gc=False):
    """One of a service's ``TaggedAddresses`` (kratos keeps an endpoint URL in ``Address``)."""

    Address: str = ""
    Port: int = 0


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
    ServiceTaggedAddresses: dict[str, TaggedAddress] | None = None
    ServiceWeights: Any = None  # {"Passing": n, "Warning": m}: read leniently (see weights)


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

    Each ``set_*`` takes one decoded answer and sequence numbers from one
    counter: when its request was sent (``asked``) and when it arrived
    (``received``). An instance is shown only once its health is known: its
    checks have arrived, or a checks answer requested after the entry was
    first seen says it has none; likewise for its node's checks. Until then
    it is held back (:meth:`waiting` says which read would settle it).

    The other way round, an instance whose checks (or whose node's failing
    checks) vanish while the catalog still lists it is most likely being
    deregistered, with the catalog answer still on its way: it keeps the
    health it had until a catalog answer requested after that says whether
    it is still there (so a deregistration never shows as passing first).

    Updates cost O(changes) when an answer only changed some entries in place
    (a status change: the answers list entries in a stable order): unchanged
    entries are compared in C and keep their objects, and :meth:`snapshot`
    evolves an :class:`~registry_agent._events.InstanceMap` by the changed ids.
    """

    def __init__(
        self,
        service: str,
        *,
        local_node: str | None,
        preferred: Preferred,
        warn: Warn,
        endpoint_scheme: str = "",
    ):
        self.service = service
        self.endpoint_scheme = endpoint_scheme  # read_instance's: which kratos endpoint
        self.local_node = local_node
        self._preferred = preferred
        self._warn = warn
        self.has_catalog = self.has_checks = self.has_nodes = False
        # Catalog: the answer's entries, and per key the entry and its instance (None: invalid).
        self._catalog: list[CatalogEntry] = []
        self._entries: dict[Key, tuple[CatalogEntry, ServiceInstance | None]] = {}
        self._on_node: dict[str, list[Key]] = {}
        self._first_seen: dict[Key, int] = {}
        self._node_first_seen: dict[str, int] = {}
        self._names: dict[Key, str] = {}  # snapshot key of each valid instance
        self._check_list: list[Check] = []
        self._checks: dict[Key, list[Check]] = {}
        self._bad: set[Key] = set()  # instances with an unreadable check
        self._checks_asked = -1
        self._node_checks: dict[str, list[Check]] = {}
        self._nodes_asked = -1
        # Sequence number of the answer in which an instance's checks (a node's
        # failing checks) vanished while the catalog still listed it.
        self._vanished: dict[Key, int] = {}
        self._node_vanished: dict[str, int] = {}
        self._map = InstanceMap()
        self._shown: dict[Key, tuple[str, InstanceHealth]] = {}  # in the map, per key
        self._dirty: set[Key] = set()  # keys to look at again
        self._held: set[Key] = set()  # keys held back or kept as they were
        self._renamed = True  # snapshot keys changed: look at everything
        # Probes (small catalog reads of a few keys, see probe_keys): keys whose checks
        # came before the catalog listed them; keys being probed; and keys a probe
        # found there / gone, with the sequence number its answer arrived at (a full
        # catalog answer requested before that is older and must not undo it).
        self._unlisted: set[Key] = set()
        self._probing: set[Key] = set()
        self._probed_in: dict[Key, int] = {}
        self._probed_out: dict[Key, int] = {}

    # -- answers --------------------------------------------------------------

    def set_catalog(self, answer: Decoded, received: int, asked: int = -1) -> bool:
        """Take a catalog answer; True when membership or an instance's fields changed."""
        self.has_catalog = True
        for _node, service_id in answer.bad:
            self._warn(service_id, "an entry that is not what Consul's catalog returns")
        new_list: list[CatalogEntry] = answer.entries
        changed = None
        if not self._probed_in and not self._probed_out:
            changed = self._catalog_in_place(new_list)
        if changed is None:
            changed = self._catalog_anew(new_list, received, asked)
        self._catalog = new_list
        for key in [
            k for k, seen in self._vanished.items() if k not in self._entries or asked > seen
        ]:
            del self._vanished[key]
            self._dirty.add(key)
        for node in [
            n for n, seen in self._node_vanished.items() if n not in self._on_node or asked > seen
        ]:
            del self._node_vanished[node]
            self._dirty.update(self._on_node.get(node, ()))
        return changed

    def _catalog_in_place(self, new_list: list[CatalogEntry]) -> bool | None:
        """Apply an answer listing the same keys in the same order; None when it does not."""
        old_list = self._catalog
        if len(old_list) != len(new_list):
            return None
        differ = list(
            itertools.compress(range(len(new_list)), map(operator.ne, old_list, new_list))
        )
        for i in differ:
            if (old_list[i].Node, old_list[i].ServiceID) != (
                new_list[i].Node,
                new_list[i].ServiceID,
            ):
                return None
        made = []
        for i in differ:
            entry = new_list[i]
            key = (entry.Node, entry.ServiceID)
            instance = self._instance(entry)
            if (instance is None) != (self._entries[key][1] is None):
                return None  # valid <-> invalid changes the snapshot keys: start anew
            made.append((key, entry, instance))
        for key, entry, instance in made:
            self._entries[key] = (entry, instance)
            self._dirty.add(key)
        return bool(differ)

    def _catalog_anew(self, new_list: list[CatalogEntry], received: int, asked: int) -> bool:
        old = self._entries
        new: dict[Key, tuple[CatalogEntry, ServiceInstance | None]] = {}
        for entry in new_list:
            key = (entry.Node, entry.ServiceID)
            if key in self._probed_out and asked <= self._probed_out[key]:
                continue  # a probe found it gone after this answer was asked for
            before = old.get(key)
            if before is not None and before[0] == entry:
                new[key] = before
                continue
            new[key] = (entry, self._instance(entry))
            self._first_seen.setdefault(key, received)
            self._node_first_seen.setdefault(entry.Node, received)
        for key, seen in self._probed_in.items():
            if key not in new and key in old and asked <= seen:
                new[key] = old[key]  # a probe found it after this answer was asked for
        self._probed_in = {k: seen for k, seen in self._probed_in.items() if asked <= seen}
        self._probed_out = {k: seen for k, seen in self._probed_out.items() if asked <= seen}
        changed = new.keys() != old.keys() or any(new[k] is not old[k] for k in new)
        self._entries = new
        self._unlisted = {key for key in self._checks if key not in new}
        self._probing &= self._unlisted | self._vanished.keys()
        if changed:
            for key in [k for k in self._first_seen if k not in new]:
                del self._first_seen[key]
            on_node: dict[str, list[Key]] = {}
            for key in new:
                on_node.setdefault(key[0], []).append(key)
            self._on_node = on_node
            for node in [n for n in self._node_first_seen if n not in on_node]:
                del self._node_first_seen[node]
            self._dirty.update(k for k in old.keys() | new.keys() if old.get(k) is not new.get(k))
            self._rename()
        return changed

    def set_checks(self, answer: Decoded, asked: int, received: int | None = None) -> None:
        """Take the service's checks, from a request sent at sequence number ``asked``."""
        self.has_checks = True
        new_list: list[Check] = answer.entries
        if not self._checks_in_place(new_list):
            grouped: dict[Key, list[Check]] = {}
            for check in new_list:
                grouped.setdefault((check.Node, check.ServiceID), []).append(check)
            old = self._checks
            for key in old.keys() | grouped.keys():
                if old.get(key) != grouped.get(key):
                    self._dirty.add(key)
            for key in old:
                if key not in grouped and key in self._entries:
                    self._vanished[key] = asked if received is None else received
            self._unlisted = {key for key in grouped if key not in self._entries}
            for key in grouped:
                if self._vanished.pop(key, None) is not None:
                    self._dirty.add(key)
            self._checks = grouped
        self._check_list = new_list
        bad = {key for key in answer.bad if key[1]}
        self._dirty.update(bad ^ self._bad)
        self._bad = bad
        self._checks_asked = asked

    def _checks_in_place(self, new_list: list[Check]) -> bool:
        """Apply checks that changed in place (same checks, same order); False if others did."""
        old_list = self._check_list
        if len(old_list) != len(new_list) or not old_list:
            return False
        differ = list(
            itertools.compress(range(len(new_list)), map(operator.ne, old_list, new_list))
        )
        for i in differ:
            before, after = old_list[i], new_list[i]
            if (before.Node, before.ServiceID, before.CheckID) != (
                after.Node,
                after.ServiceID,
                after.CheckID,
            ):
                return False
        for i in differ:
            key = (new_list[i].Node, new_list[i].ServiceID)
            group = list(self._checks[key])
            group[group.index(old_list[i])] = new_list[i]
            self._checks[key] = group
            self._dirty.add(key)
        return True

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
        old = self._node_checks
        for node in old.keys() | grouped.keys():
            if old.get(node) != grouped.get(node):
                self._dirty.update(self._on_node.get(node, ()))
        for node in old:
            if node not in grouped and node in self._on_node:
                self._node_vanished[node] = asked if received is None else received
        for node in grouped:
            self._node_vanished.pop(node, None)
        self._node_checks = grouped
        self._nodes_asked = asked

    def probe_keys(self, limit: int) -> list[Key]:
        """Keys a small catalog read could settle now (at most ``limit``, else none).

        An instance whose checks arrived before the catalog listed it (just
        registered), or whose checks vanished while it is listed (being
        deregistered): the full catalog answer would settle it too, but it is
        the largest and slowest to come.
        """
        keys = [
            key
            for key in self._unlisted | self._vanished.keys()
            if key not in self._probing and not any('"' in p or "\\" in p for p in key)
        ]
        if not keys or len(keys) > limit:
            return []
        self._probing.update(keys)
        return keys

    def set_probe(self, answer: Decoded, keys: Iterable[Key], asked: int, received: int) -> None:
        """Take a catalog read of ``keys`` only, sent at ``asked``, arrived at ``received``."""
        found = {(entry.Node, entry.ServiceID): entry for entry in answer.entries}
        renamed = False
        for key in keys:
            entry = found.get(key)
            settles = asked > self._vanished.get(key, asked)
            if settles:
                del self._vanished[key]
                self._dirty.add(key)
            if entry is not None and key not in self._entries:
                self._entries[key] = (entry, self._instance(entry))
                self._first_seen.setdefault(key, received)
                self._node_first_seen.setdefault(key[0], received)
                self._on_node.setdefault(key[0], []).append(key)
                self._probed_in[key] = received
                self._unlisted.discard(key)
                renamed = True
            elif entry is None and settles and key in self._entries:
                del self._entries[key]  # deregistered
                self._first_seen.pop(key, None)
                on_node = self._on_node.get(key[0], [])
                if key in on_node:
                    on_node.remove(key)
                self._probed_out[key] = received
                renamed = True
            self._dirty.add(key)
        if renamed:
            self._rename()

    # -- what is known ----------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Every kind of answer has arrived once."""
        return self.has_catalog and self.has_checks and self.has_nodes

    def waiting(self) -> tuple[int | None, int | None, int | None]:
        """Sequence numbers after which a catalog / checks / node checks read would settle
        what is held back (``None`` for a kind whose answers are enough).
        """
        catalog = checks = nodes = None
        for key, seen in self._vanished.items():
            if key not in self._probing:
                catalog = max(catalog or 0, seen)
        for seen in self._node_vanished.values():
            catalog = max(catalog or 0, seen)
        for key, seen in self._first_seen.items():
            if seen >= self._checks_asked and key not in self._checks:
                checks = max(checks or 0, seen)
        for seen in self._node_first_seen.values():
            if seen >= self._nodes_asked:
                nodes = max(nodes or 0, seen)
        return catalog, checks, nodes

    def snapshot(self) -> InstanceMap:
        """Every instance whose health is known (the same map when nothing changed)."""
        if self._renamed:
            look = set(self._entries) | set(self._shown)
            self._renamed = False
        else:
            look = self._dirty | self._held
        self._dirty = set()
        removed: dict[str, None] = {}
        added: dict[str, InstanceHealth] = {}
        for key in look:
            before = self._shown.get(key)
            name = self._names.get(key)
            health = self._health_of(key, before[1] if before is not None else None)
            if before is not None and before == (name, health):
                continue
            if before is not None:
                removed[before[0]] = None
                del self._shown[key]
            if name is not None and health is not None:
                self._shown[key] = (name, health)
                added[name] = health
        # (a name given up by one instance and taken by another: the latter wins)
        self._map = self._map.evolve({**removed, **added})
        return self._map

    def _health_of(self, key: Key, shown: InstanceHealth | None) -> InstanceHealth | None:
        """The health to show for ``key`` now (``shown``: what is shown), None: not shown."""
        entry = self._entries.get(key)
        instance = entry[1] if entry is not None else None
        if instance is None:
            self._held.discard(key)
            return None
        node = key[0]
        if key in self._vanished or node in self._node_vanished:
            self._held.add(key)  # maybe being deregistered: as it was, until known
            return shown
        checks = self._checks.get(key)
        if checks is None and self._first_seen.get(key, -1) >= self._checks_asked:
            self._held.add(key)  # its checks may not have arrived yet
            return None
        if self._node_first_seen.get(node, -1) >= self._nodes_asked:
            self._held.add(key)  # its node's health is not known yet
            return None
        self._held.discard(key)
        if key in self._bad:
            self._warn(key[1], "one of its checks is not what Consul returns")
            return None
        try:
            health = self._health(instance, [*self._node_checks.get(node, ()), *(checks or ())])
        except ValueError as exc:  # a status Consul does not have
            self._warn(key[1], exc)
            return None
        return shown if shown == health else health

    # -- helpers ----------------------------------------------------------------

    def _instance(self, entry: CatalogEntry) -> ServiceInstance | None:
        try:
            return read_instance(
                service=entry.ServiceName,
                id=entry.ServiceID,
                address=entry.ServiceAddress or entry.Address,
                port=entry.ServicePort,
                tags=entry.ServiceTags or (),
                meta=entry.ServiceMeta or {},
                tagged_addresses=entry.ServiceTaggedAddresses or {},
                node=entry.Node,
                endpoint_scheme=self.endpoint_scheme,
                weights=entry.ServiceWeights,
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

    def _rename(self) -> None:
        """New snapshot keys after a membership change; look again at those that moved."""
        old, new = self._names, self._keys()
        self._dirty.update(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        self._names = new

    def _keys(self) -> dict[Key, str]:
        """Snapshot keys: the id; an id held by several nodes: ``node/id`` but for one.

        The one keeping the plain id is this agent's node's, else the first node by name.
        """
        nodes_of: dict[str, list[str]] = {}
        for (node, service_id), (_, instance) in self._entries.items():
            if instance is not None:
                nodes_of.setdefault(service_id, []).append(node)
        local = self.local_node
        names: dict[Key, str] = {}
        for service_id, nodes in nodes_of.items():
            if len(nodes) == 1:
                names[(nodes[0], service_id)] = service_id
                continue
            for i, node in enumerate(sorted(nodes, key=lambda n: (n != local, n))):
                names[(node, service_id)] = (
                    service_id if i == 0 or not node else f"{node}/{service_id}"
                )
        return names
