"""format=kratos: go-kratos's etcd registry layout, written and read.

Derived from go-kratos/kratos, read at v3.0.0 (commit 668db92c); the key layout
and the marshalled struct are the same in every release since
``contrib/registry/etcd`` appeared (v2.1.0), only the endpoints' TLS marking changed:

- ``contrib/registry/etcd/registry.go`` ``Register``/``registerKey``: the key
  is ``<namespace>/<name>/<id>``, namespace ``/microservices`` by default; the
  value is put with a lease (default ttl 15 s) kept alive by ``KeepAlive``.
- ``contrib/registry/etcd/service.go`` ``marshal``: the value is
  ``json.Marshal`` of ``registry.ServiceInstance`` (``registry/registry.go``):
  fields ``id``, ``name``, ``version``, ``metadata`` (map[string]string),
  ``endpoints`` ([]string), in that order, none ``omitempty``: an app without
  metadata writes ``"metadata":null``.
- ``transport/grpc/server.go``, ``transport/http/server.go``
  ``listenAndEndpoint`` with ``internal/endpoint/endpoint.go``: an endpoint is
  ``url.URL{Scheme, Host}.String()``, e.g. ``grpc://10.0.0.1:9000``; TLS
  servers write ``grpcs://``/``https://`` (since v2.3.1). v2.1.0 to v2.3.0
  wrote ``grpc://…?isSecure=true`` instead; v2.3.1 to v2.4.x read both; v2.5.0
  on read only the scheme. We write the scheme and read both.
- ``transport/grpc/resolver/discovery/resolver.go``, ``transport/http/resolver.go``
  with ``endpoint.ParseEndpoint``: a client takes, of an instance's endpoints,
  the first whose scheme is the one it speaks (``grpc``, ``grpcs``, ``http``,
  ``https``) and dials its host.

What a kratos entry cannot hold: tags (lost), health (presence only: the
backend refuses a non-passing status), an empty scheme (written as ``http``).
kratos's ``GetService`` fails whole on one value it cannot unmarshal; we skip
that entry alone (the backend logs it once).
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from registry_agent import ConfigError, HealthStatus, InstanceHealth, ServiceInstance
from registry_agent_etcd._format_gozero import refuse_unspecified

__all__ = ["KratosFormat"]

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")

# Go's encoding/json (json.Marshal, HTML escaping on) writes these as \u escapes.
_HTML_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_HTML_CHARS = re.compile("[<>&\u2028\u2029]")
# A Go string holding invalid UTF-8 is marshalled with U+FFFD in its place.
_SURROGATES = re.compile("[\ud800-\udfff]")

# Go's net/url shouldEscape(c, encodeHost): what a host keeps unescaped.
_HOST_SAFE = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~!$&'()*+,;=:[]<>\""
)
# Go's strconv.ParseBool: the spellings of true (isSecure=…).
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})


def _go_string(text: str) -> str:
    """``text`` as Go's json.Marshal writes a string (Go 1.22+: ``\\b``, ``\\f`` short).

    Python's ``json.dumps(ensure_ascii=False)`` already escapes exactly what
    Go does (quote, backslash, ``\\b\\f\\n\\r\\t``, other controls as
    lower-case ``\\u00xx``) except Go's HTML-safe set.
    """
    quoted = json.dumps(_SURROGATES.sub("\ufffd", text), ensure_ascii=False)
    return _HTML_CHARS.sub(lambda m: _HTML_ESCAPES[m.group()], quoted)


def _go_host(hostport: str) -> str:
    """``hostport`` as Go's ``url.URL.String()`` writes a host (``%XX`` for the rest)."""
    return "".join(
        chr(byte) if byte in _HOST_SAFE else f"%{byte:02X}" for byte in hostport.encode()
    )


def endpoint_url(instance: ServiceInstance) -> str:
    """The endpoint kratos writes for ``instance``: ``<scheme>://<host>:<port>``.

    Like ``net.JoinHostPort`` an IPv6 address is bracketed; an empty scheme is
    ``http`` (kratos's HTTP transport, the default in its clients).
    """
    host = f"[{instance.address}]" if ":" in instance.address else instance.address
    return f"{instance.scheme or 'http'}://{_go_host(f'{host}:{instance.port}')}"


def _unescape_host(text: str) -> str:
    """Go's ``unescape(host, encodeHost)``: ``%XX`` only for non-ASCII bytes (and ``%25``)."""
    out = bytearray()
    i = 0
    raw = text.encode()
    while i < len(raw):
        byte = raw[i]
        if byte == ord("%"):
            code = raw[i + 1 : i + 3].decode(errors="replace")
            if len(code) != 2 or not all(c in "0123456789abcdefABCDEF" for c in code):
                raise ValueError(f"bad escape {raw[i : i + 3]!r} in host")
            value = int(code, 16)
            if value < 0x80 and value != 0x25:
                raise ValueError(f"escaped ASCII %{code} in host")
            out.append(value)
            i += 3
            continue
        if byte < 0x80 and byte not in _HOST_SAFE:
            raise ValueError(f"invalid character {chr(byte)!r} in host")
        out.append(byte)
        i += 1
    return out.decode(errors="replace")


def parse_endpoint(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a kratos endpoint URL, read as Go's ``url.Parse`` does.

    A legacy ``?isSecure=true`` (kratos v2.1.0-v2.4.x) makes ``grpc``/``http``
    ``grpcs``/``https``, as kratos's own ``legacyURLToNew`` did. No port: 0.
    Raises :class:`ValueError` for what is not ``scheme://host[:port]``.
    """
    if any(ord(c) < 0x20 or c == "\x7f" for c in url):
        raise ValueError(f"control character in endpoint {url!r}")
    scheme, colon, rest = url.partition(":")
    if not colon or not _SCHEME.fullmatch(scheme):
        raise ValueError(f"endpoint {url!r} has no scheme")
    scheme = scheme.lower()
    rest = rest.partition("#")[0]
    rest, _, query = rest.partition("?")
    if not rest.startswith("//"):
        raise ValueError(f"endpoint {url!r} has no host")
    authority = rest[2:].partition("/")[0].rpartition("@")[2]
    if authority.startswith("["):
        close = authority.rfind("]")
        if close < 0:
            raise ValueError(f"missing ']' in endpoint {url!r}")
        host, port_text = authority[1:close], authority[close + 1 :]
        if port_text and not port_text.startswith(":"):
            raise ValueError(f"bad port in endpoint {url!r}")
        port_text = port_text[1:]
    else:
        host, _, port_text = authority.rpartition(":") if ":" in authority else (authority, "", "")
    if port_text and not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"bad port in endpoint {url!r}")
    port = int(port_text) if port_text else 0
    if port > 65535:
        raise ValueError(f"port {port} out of range in endpoint {url!r}")
    host = _unescape_host(host)
    if scheme not in ("https", "grpcs"):
        secure = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "isSecure"]
        if secure and secure[0] in _GO_TRUE:
            scheme += "s"
    return scheme, host, port


class _Object(list[tuple[str, Any]]):
    """A JSON object's members in order, duplicates kept (Go's decoder sees them all)."""


def _members(value: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    """Go's struct decoding: a key matches a field exactly or ASCII case-insensitively,
    the last match wins, ``null`` leaves the field as it was."""
    found: dict[str, Any] = {}
    for key, item in value:
        name = key if key in fields else key.lower()
        if name in fields and item is not None:
            found[name] = item
    return found


def _string(data: dict[str, Any], name: str) -> str:
    value = data.get(name, "")
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a string, got {value!r}")
    return value


class KratosFormat:
    """go-kratos's etcd layout: ``/microservices/<name>/<id>``, its JSON ``ServiceInstance``.

    Writes one endpoint ``<scheme or http>://<host>:<port>``, ``meta`` as
    ``metadata`` and ``version``; tags are lost, health is not carried. Reads
    the first endpoint, or with ``scheme`` the first endpoint of that scheme
    and the first endpoint when there is none (the instance says its scheme:
    a caller wanting only gRPC filters on ``instance.scheme``).
    """

    name: ClassVar[str] = "kratos"
    default_prefix: ClassVar[str] = "/microservices"
    carries_health: ClassVar[bool] = False

    def __init__(self, *, scheme: str | None = None) -> None:
        if scheme is not None and (not isinstance(scheme, str) or not _SCHEME.fullmatch(scheme)):
            raise ConfigError(
                f"expected a URL scheme such as grpc, grpcs, http or https, got {scheme!r}",
                field="backend.scheme",
            )
        #: Of an instance's endpoints, read the first with this scheme (None: the first).
        self.scheme = scheme.lower() if scheme is not None else None

    def entry_id(self, instance: ServiceInstance) -> str:
        return instance.id

    def encode(self, instance: ServiceInstance, status: HealthStatus, note: str) -> bytes:
        """kratos's JSON instance; :class:`ConfigError` naming ``address`` for ``0.0.0.0``/``::``
        (kratos servers publish their own IP, ``internal/host.Extract``)."""
        del status, note  # presence only: the backend refuses a non-passing status first
        refuse_unspecified(instance.address, self.name)
        meta = instance.meta
        metadata = (
            "{" + ",".join(f"{_go_string(k)}:{_go_string(meta[k])}" for k in sorted(meta)) + "}"
            if meta
            else "null"  # a nil map, as a kratos app without Metadata(...) writes
        )
        return (
            f'{{"id":{_go_string(instance.id)},"name":{_go_string(instance.service)},'
            f'"version":{_go_string(instance.version)},"metadata":{metadata},'
            f'"endpoints":[{_go_string(endpoint_url(instance))}]}}'
        ).encode()

    def decode(self, service: str, entry_id: str, value: bytes) -> InstanceHealth:
        # Go replaces invalid UTF-8 in strings with U+FFFD rather than failing.
        data = json.loads(value.decode(errors="replace"), object_pairs_hook=_Object)
        if not isinstance(data, _Object):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        fields = _members(data, ("id", "name", "version", "metadata", "endpoints"))
        name = _string(fields, "name")
        if name != service:
            raise ValueError(f"name {name!r} under {service!r}")
        instance_id = _string(fields, "id")
        if instance_id != entry_id:
            raise ValueError(f"id {instance_id!r} does not match the key")
        metadata = fields.get("metadata", _Object())
        if not isinstance(metadata, _Object):
            raise ValueError(f"metadata: expected an object, got {metadata!r}")
        meta: dict[str, str] = {}
        for key, item in metadata:
            if item is not None and not isinstance(item, str):
                raise ValueError(f"metadata.{key}: expected a string, got {item!r}")
            meta[key] = item or ""
        endpoints = fields.get("endpoints", [])
        if not isinstance(endpoints, list) or isinstance(endpoints, _Object):
            raise ValueError(f"endpoints: expected a list of URLs, got {endpoints!r}")
        scheme, host, port = self._endpoint(endpoints)
        instance = ServiceInstance.from_registry(
            service=service,
            id=instance_id,
            address=host,
            port=port,
            meta=meta,
            scheme=scheme,
            version=_string(fields, "version"),
        )
        return InstanceHealth(instance, HealthStatus.PASSING)

    def _endpoint(self, endpoints: list[Any]) -> tuple[str, str, int]:
        """The endpoint to read: the first, or the first of ``self.scheme`` when set.

        Endpoints are parsed in order up to the one chosen, like kratos's
        ``ParseEndpoint``: a malformed URL before it makes the entry unreadable.
        """
        first: tuple[str, str, int] | None = None
        for raw in endpoints:
            if not isinstance(raw, str):
                raise ValueError(f"endpoints: expected URL strings, got {raw!r}")
            parsed = parse_endpoint(raw)
            if self.scheme is None or parsed[0] == self.scheme:
                return parsed
            first = first or parsed
        if first is None:
            raise ValueError("no endpoints")
        return first
