"""go-micro's etcd layout: key ``/micro/registry/<service>/<node id>``, value a JSON service.

Read from micro/go-micro (v2.9.1, v3.7.0, v5.30.0, v6.10.0) and go-micro/plugins
(v4, the etcd registry of the v4 era):

- ``registry/etcd/etcd.go`` (in ``plugins/registry/etcd`` for v3, in go-micro/plugins
  ``v4/registry/etcd`` for v4): ``registerNode`` puts, per node, the
  ``json.Marshal`` of a ``registry.Service`` holding that one node at
  ``nodePath(name, node.Id)`` = ``path.Join("/micro/registry/", name, id)`` with
  every ``/`` of the name and the id replaced by ``-``, attached to a lease of
  the register TTL. ``GetService`` gets every key under
  ``/micro/registry/<name>/``, groups the values by ``version`` and joins their
  nodes; ``watcher.go`` decodes each put (and a delete's previous value). The
  same in every version above.
- ``registry/registry.go``: ``Service`` is ``name, version, metadata, endpoints,
  nodes`` and ``Node`` is ``metadata, id, address`` since commit a7522e7d6 (first
  in v4.10.2; before: ``id, address, metadata``; before v1.8.0 a ``port`` field
  beside a bare host). No ``omitempty``: a nil map is ``null``, an empty slice ``[]``.
- ``server/rpc_server.go`` (``Register``, ``newNodeMetedata``): a server writes
  its node metadata with ``protocol`` = ``mucp`` (``server/grpc/grpc.go``:
  ``grpc``; go-micro/plugins ``v4/server/http/extractor.go``: ``http``), no
  service metadata (``null``), ``endpoints`` built with ``make(…, 0, n)`` (``[]``
  without handlers), and ``version`` from ``server.DefaultVersion`` = ``latest``.
- Readers use the node's metadata (``client/rpc_codec.go``: ``protocol``;
  ``selector/filter.go``: ``FilterLabel``) and the service's version
  (``FilterVersion``); nothing reads the service metadata or a health.

So we write one node whose id is the instance id, ``host:port`` (``[ipv6]:port``),
the meta as node metadata with ``protocol`` = the scheme, and the version
(``latest`` when none, read back as none). Tags and health are lost.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

from registry_agent import HealthStatus, InstanceHealth, Rejected, ServiceInstance
from registry_agent.backend import error_context
from registry_agent_etcd._format_gozero import refuse_unspecified

__all__ = ["GoMicroFormat", "go_json"]

#: go-micro's ``server.DefaultVersion``: what a service that sets no version writes.
DEFAULT_VERSION = "latest"
#: The node metadata key naming the protocol a node serves (our scheme).
PROTOCOL = "protocol"

_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]{0,31}$")
_SURROGATE = re.compile("[\ud800-\udfff]")
# What Go's encoding/json escapes that Python's json (ensure_ascii=False) leaves as is.
_GO_ESCAPES = str.maketrans(
    {
        "<": "\\u003c",
        ">": "\\u003e",
        "&": "\\u0026",
        "\u2028": "\\u2028",
        "\u2029": "\\u2029",
    }
)


def go_json(value: Any) -> bytes:
    """``value`` as Go's ``json.Marshal`` writes it: no spaces, ``<>&`` and U+2028/9
    escaped, other non-ASCII as UTF-8, a string that is not valid UTF-8 with U+FFFD.

    Map keys must already be in order (Go sorts them). Go 1.22 and later write
    ``\\b``/``\\f`` as Python does; older Go wrote ``\\u0008``/``\\u000c``.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    # These characters only occur inside strings: translating the whole text is safe.
    return _SURROGATE.sub("\\\\ufffd", text.translate(_GO_ESCAPES)).encode()


def _join_hostport(host: str, port: int) -> str:
    # go-micro's HostPort (internal/util/net): an address with ':' goes in brackets.
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _split_address(address: str, legacy_port: object) -> tuple[str, int]:
    """``(host, port)`` of a node address: ``host:port``, ``[ipv6]:port``, a bare host
    (port 0, what go-micro writes for a queue name) or, before go-micro v1.8.0, a
    bare host beside a ``port`` field."""
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket or not host or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [ipv6]:port as the node address, got {address!r}")
        port = rest[1:] if rest else ""
    elif address.count(":") == 1:
        host, _, port = address.partition(":")
    else:  # a bare host, or a bare IPv6 address
        host, port = address, ""
    if not host or "/" in host:  # not a URL either: go-micro dials host:port
        raise ValueError(f"expected host:port as the node address, got {address!r}")
    if not port:
        if isinstance(legacy_port, int) and not isinstance(legacy_port, bool):
            if 0 <= legacy_port <= 65535:
                return host, legacy_port
        elif legacy_port is None:
            return host, 0
        raise ValueError(f"expected the node's port as an integer 0-65535, got {legacy_port!r}")
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected a port 0-65535 in the node address, got {address!r}")
    return host, int(port)


class _Object:
    """A JSON object read as Go's ``json.Unmarshal`` fills a struct: a field matches
    its key exactly or ignoring (ASCII) case, and the last matching key wins."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs

    def field(self, name: str) -> Any:
        found = None
        for key, value in self.pairs:
            if key.lower() == name:
                found = value
        return found

    def as_map(self, what: str) -> dict[str, str]:
        """The object as a Go ``map[string]string`` (the last of equal keys wins)."""
        result: dict[str, str] = {}
        for key, value in self.pairs:
            if not isinstance(value, str):
                raise ValueError(f"{what}.{key}: expected a string, got {_show(value)}")
            result[_clean(key)] = _clean(value)
        return result


def _show(value: Any) -> str:
    return "an object" if isinstance(value, _Object) else repr(value)


def _clean(text: str) -> str:
    # Go reads an escaped lone surrogate (\ud800) as U+FFFD.
    return _SURROGATE.sub("\ufffd", text)


def _string(obj: _Object, name: str, what: str) -> str:
    value = obj.field(name)
    if value is None:  # absent or null: Go leaves the zero value
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{what}.{name}: expected a string, got {_show(value)}")
    return _clean(value)


def _metadata(obj: _Object, what: str) -> dict[str, str]:
    value = obj.field("metadata")
    if value is None:
        return {}
    if not isinstance(value, _Object):
        raise ValueError(f"{what}.metadata: expected an object of strings, got {_show(value)}")
    return value.as_map(f"{what}.metadata")


def _node_path_segment(text: str) -> str:
    # go-micro's nodePath: every "/" of the name and of the node id becomes "-".
    return text.replace("/", "-")


class GoMicroFormat:
    """go-micro's etcd registry entries: one ``registry.Service`` JSON per node."""

    name: ClassVar[str] = "go-micro"
    default_prefix: ClassVar[str] = "/micro/registry"
    carries_health: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        del options  # no option of its own

    def entry_id(self, instance: ServiceInstance) -> str:
        return _node_path_segment(instance.id)

    def encode(self, instance: ServiceInstance, status: HealthStatus, note: str) -> bytes:
        """The service JSON a go-micro server writes, holding ``instance`` as its one node.

        Node metadata: the meta, and ``protocol`` = the scheme when one is set
        (go-micro servers write ``mucp``, ``grpc`` or ``http``). Version: the
        instance's, ``latest`` when none. Tags, ``status`` and ``note`` are lost.
        Raises :class:`Rejected` for a meta ``protocol`` (the scheme's place: it
        would be overwritten or read back as the scheme) and :class:`ConfigError`
        naming ``address`` for ``0.0.0.0``/``::`` (go-micro servers publish their
        own IP, ``util/addr.Extract``).
        """
        del status, note  # presence only: the backend refuses a non-passing status
        refuse_unspecified(instance.address, self.name)
        if PROTOCOL in instance.meta:
            # The words of the Consul go-micro flavor (registry_agent_consul._gomicro).
            raise Rejected(
                "meta.protocol: go-micro's 'protocol' metadata is written from the instance's "
                "scheme; set scheme (http, https, grpc, grpcs…) instead of meta 'protocol' "
                "(format go-micro)",
                **error_context("etcd", instance=instance),
            )
        metadata = dict(instance.meta)
        if instance.scheme:
            metadata[PROTOCOL] = instance.scheme
        service = {
            "name": instance.service,
            "version": instance.version or DEFAULT_VERSION,
            "metadata": None,
            "endpoints": [],
            "nodes": [
                {
                    "metadata": dict(sorted(metadata.items())),
                    "id": instance.id,
                    "address": _join_hostport(instance.address, instance.port),
                }
            ],
        }
        return go_json(service)

    def decode(self, service: str, entry_id: str, value: bytes) -> InstanceHealth:
        """The node a go-micro client reads at ``<service>/<entry_id>``, always passing.

        The value's ``name`` must be the key's service and one of its nodes must
        have the key's node id (go-micro writes exactly one). Meta is that node's
        metadata (the service metadata, which go-micro's clients never read, is
        ignored); its ``protocol`` becomes the scheme when it is one; version
        ``latest`` (go-micro's default) reads as none. Raises :class:`ValueError`
        saying what is wrong with a value that is not such a service.
        """
        try:
            data = json.loads(value.decode("utf-8", "replace"), object_pairs_hook=_Object)
        except ValueError as exc:
            raise ValueError(f"expected go-micro's service JSON: {exc}") from None
        if not isinstance(data, _Object):
            raise ValueError(f"expected go-micro's service JSON object, got {_show(data)}")
        name = _string(data, "name", "service")
        if not name:
            raise ValueError("service.name: expected the service's name, got none")
        if _node_path_segment(name) != service:
            raise ValueError(f"service.name {name!r} under {service!r}")
        nodes = data.field("nodes")
        if not isinstance(nodes, list):
            raise ValueError(f"service.nodes: expected a list of nodes, got {_show(nodes)}")
        for i, node in enumerate(nodes):
            if not isinstance(node, _Object):
                raise ValueError(f"service.nodes[{i}]: expected an object, got {_show(node)}")
            if _node_path_segment(_string(node, "id", f"service.nodes[{i}]")) == entry_id:
                break
        else:
            raise ValueError(f"service.nodes: no node has the key's id {entry_id!r}")
        what = f"service.nodes[{i}]"
        address = _string(node, "address", what)
        if not address:
            raise ValueError(f"{what}.address: expected host:port, got nothing")
        host, port = _split_address(address, node.field("port"))
        meta = _metadata(node, what)
        scheme = ""
        if _SCHEME.match(meta.get(PROTOCOL, "")):
            scheme = meta.pop(PROTOCOL)
        version = _string(data, "version", "service")
        instance = ServiceInstance.from_registry(
            service=service,
            id=entry_id,
            address=host,
            port=port,
            meta=meta,
            scheme=scheme,
            version="" if version == DEFAULT_VERSION else version,
        )
        return InstanceHealth(instance, HealthStatus.PASSING)
