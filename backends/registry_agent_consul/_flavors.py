"""Consul flavors: how an instance is written for one fleet, and how any entry is read.

Pure functions, no I/O. Reading needs no configuration: an entry written by
us, by go-kratos, by go-micro or by Spring Cloud Consul comes out as one
:class:`ServiceInstance` with its scheme, version and meta (:func:`read_instance`).
Writing follows one flavor, chosen per backend (:func:`write_entry`):

``registry-agent`` (the default)
    The instance as is; ``version`` and ``scheme`` (when set) as meta keys
    ``registry-agent-version`` and ``registry-agent-scheme``: a meta ``version``
    of the caller's own stays the caller's (it round-trips as meta).
``kratos``
    go-kratos/kratos contrib/registry/consul/client.go (the same shape from
    v2.1.0 to v3.0.0, commit 668db92c2), ``Client.Register``: tag
    ``version=<v>`` first (written even when the version is empty), then the
    instance's tags (v2.9.2 added the client's custom tags after it; before,
    the version tag came alone; since v2.9.0 the reader's http:// fallback
    brackets an IPv6 host);
    ``TaggedAddresses`` keyed by URL scheme, each holding the whole endpoint URL
    (``{"grpc": {"Address": "grpc://10.0.0.5:9000", "Port": 9000}}``); Address
    and Port from the (first) endpoint; Meta the instance's metadata.
``go-micro``
    go-micro/plugins v4/registry/consul/consul.go (also v2, v3, v5; commit
    6026888), ``consulRegistry.Register``: metadata, endpoints and version as
    encoded tags (see ``_gomicro``) placed first, then the instance's tags;
    Meta the node metadata (v4 and v5 write it; v2 and v3 wrote tags only). The
    scheme travels as go-micro's ``protocol`` (+ ``secure``) metadata.
``spring``
    spring-cloud/spring-cloud-consul ConsulAutoRegistration.java (v3.1.0 to
    v5.0.2, commit f008a118): meta ``secure`` = ``"true"`` for https, else
    ``"false"`` (2.x wrote a ``secure=<bool>`` tag instead: not written, not
    read), and a service name Spring's ``normalizeForDns`` keeps as it is.
    The version and scheme are also written as by default.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from registry_agent import ConfigError, Rejected, ServiceInstance
from registry_agent.backend import error_context
from registry_agent_consul import _gomicro

__all__ = ["FLAVORS", "read_instance", "read_written", "validate_flavor", "write_entry"]

#: The flavors a Consul backend writes (``flavor=`` option); reading knows them all.
FLAVORS = ("registry-agent", "kratos", "go-micro", "spring")

# Tagged addresses Consul itself sets (agent: lan_ipv4/wan_ipv4 for a service
# with an IP address; lan/wan for nodes; virtual for Connect in later releases).
_CONSUL_TAGGED = frozenset(
    {"lan", "lan_ipv4", "lan_ipv6", "wan", "wan_ipv4", "wan_ipv6", "virtual"}
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]{0,31}$")
# Go's strconv.ParseBool: the spellings of true (kratos's legacy isSecure=…).
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_KRATOS_VERSION = "version="
#: Where the default flavor keeps the fields Consul has no place for.
META_VERSION = "registry-agent-version"
META_SCHEME = "registry-agent-scheme"
# Spring's normalizeForDns (ConsulAutoRegistration.java) leaves such a name as it is:
# a letter first, a letter or digit last, letters, digits and single '-' between.
_DNS_NAME = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]|-(?=[A-Za-z0-9]))*$")


def _version_ok(value: str) -> bool:
    return bool(value) and value.isprintable() and not any(c.isspace() for c in value)


def _lift(meta: dict[str, str], key: str, ok: Any) -> str:
    """Take ``meta[key]`` out when ``ok(value)``; its value, or ``""``."""
    value = meta.get(key)
    if value is None or not ok(value):
        return ""
    del meta[key]
    return value


def _tagged_url(value: Any) -> str:
    """The ``Address`` of a tagged address (a JSON object or a decoded struct)."""
    address = value.get("Address") if isinstance(value, Mapping) else getattr(value, "Address", "")
    return address if isinstance(address, str) else ""


def _endpoint(url: str) -> tuple[str, str, int | None] | None:
    """``(scheme, host, port)`` of an endpoint URL; None when it is not one.

    A legacy ``?isSecure=true`` (go-kratos/kratos v2.1.0 to v2.3.0 wrote
    ``grpc://…?isSecure=true`` for TLS; ``internal/endpoint`` read it up to
    v2.4.x) adds the ``s`` (``grpcs``, ``https``), as the etcd kratos format reads it.
    """
    if "://" not in url:
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "grpcs"):
        secure = [v for k, v in urllib.parse.parse_qsl(parts.query) if k == "isSecure"]
        if secure and secure[0] in _GO_TRUE:
            scheme += "s"
    # The host as written (urlsplit's hostname is lower-cased), without brackets.
    host = parts.netloc.rpartition("@")[2]
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif port is not None or host.endswith(":"):
        host = host.rpartition(":")[0]
    if not host or not _SCHEME.match(parts.scheme):
        return None
    return scheme, host, port


def _pick_endpoint(
    tagged_addresses: Mapping[str, Any], address: str, port: int, want: str = ""
) -> tuple[str, str, int] | None:
    """The kratos endpoint that stands for the instance (see :func:`read_instance`)."""
    found = []
    for key in sorted(tagged_addresses):
        if key in _CONSUL_TAGGED:
            continue
        parsed = _endpoint(_tagged_url(tagged_addresses[key]))
        if parsed is not None:
            found.append(parsed)
    if want:
        found = [e for e in found if e[0] == want] or found
    if not found:
        return None
    own = [e for e in found if (e[1], e[2] if e[2] is not None else port) == (address, port)]
    scheme, host, found_port = (own or found)[0]
    return scheme, host, found_port if found_port is not None else port


def read_instance(
    *,
    service: str,
    id: str,
    address: str,
    port: int,
    tags: Sequence[str],
    meta: Mapping[str, str],
    tagged_addresses: Mapping[str, Any],
    node: str = "",
    endpoint_scheme: str = "",
    weights: Any = None,
) -> ServiceInstance:
    """The instance a Consul entry stands for, whoever wrote it.

    Read in this order, each filling ``version``/``scheme`` only while still empty,
    and taking out of tags and meta what it understood:

    1. go-micro's encoded tags (``_gomicro.decode_tags``), only when the entry
       carries go-micro data (a decodable ``t-``/``v-``/``e-`` tag or an old
       ``t={json object}``; never a lone plain ``v=…``): the meta is Consul's
       ``Meta`` joined with the tags' metadata (the tags win; go-micro plugins
       v4+ write the same map in both), with their version and scheme; the tags
       left are the plain ones.
    2. Ours: meta ``registry-agent-version`` and ``registry-agent-scheme``.
    3. kratos: the last ``version=<v>`` tag (every one is taken out; kratos's
       ``defaultResolver`` keeps the last), on an entry kratos wrote: one with
       an endpoint URL among its ``TaggedAddresses`` and none of our meta keys
       (elsewhere such a tag is a plain tag). Its ``TaggedAddresses`` holding URLs
       (Consul's own ``lan``/``wan``/``*_ipv4``/``*_ipv6`` skipped): one endpoint
       stands for the instance, giving its scheme, host and port: the one on the
       entry's own Address and Port (kratos sets them from its first endpoint),
       else the first by scheme name; several on that address: the first by
       scheme name. With ``endpoint_scheme`` (the backend option, e.g. ``grpc``)
       only the endpoints of that scheme compete, by the same rules (none of
       that scheme: all of them, as without it). The other endpoints are not
       carried. A legacy ``grpc://…?isSecure=true`` reads as ``grpcs``.
    4. Spring: meta ``secure`` (``"true"``/``"false"``, any case, as Java's
       ``Boolean.parseBoolean``) is taken out; true gives scheme ``https``.

    Consul's native ``Weights`` (``weights``): a ``Passing`` weight other than 1 on an
    entry whose meta says no ``weight`` becomes the meta ``weight``, so that
    weighted choice honours what a peer (Spring, Envoy users) set natively.

    Raises :class:`ConfigError` naming the field when a value has the wrong type.
    """
    left_tags: Sequence[str] = tags
    fields = dict(meta)
    version = scheme = ""
    micro = _gomicro.decode_tags(tags, meta) if tags else None
    if micro is not None:
        left_tags = micro.tags
        fields = dict(micro.meta)
        version, scheme = micro.version, micro.scheme.lower()
    ours = _lift(fields, META_VERSION, _version_ok)
    ours_scheme = _lift(fields, META_SCHEME, _SCHEME.match).lower()
    version, scheme = version or ours, scheme or ours_scheme
    kratos_version: str | None = None
    plain: list[str] = []
    # kratos's Register always writes its endpoints as URLs in TaggedAddresses: an
    # entry without one (or carrying our meta keys) is no kratos entry, and its
    # 'version=…' tags are plain tags.
    kratos = not (ours or ours_scheme) and any(
        "://" in _tagged_url(value)
        for key, value in (tagged_addresses or {}).items()
        if key not in _CONSUL_TAGGED
    )
    for tag in left_tags:
        if kratos and isinstance(tag, str) and tag.startswith(_KRATOS_VERSION):
            value = tag[len(_KRATOS_VERSION) :]
            if value == "" or _version_ok(value):
                kratos_version = value  # the last one wins, as in kratos's resolver
                continue
        plain.append(tag)
    if kratos_version is not None:
        left_tags = plain
        version = version or kratos_version
    if tagged_addresses and not tagged_addresses.keys() <= _CONSUL_TAGGED:
        picked = _pick_endpoint(tagged_addresses, address, port, endpoint_scheme)
        if picked is not None:
            picked_scheme, address, port = picked
            scheme = scheme or picked_scheme
    native = native_weight(weights)
    if native is not None and native != 1 and "weight" not in fields:
        fields["weight"] = str(native)
    secure = fields.get("secure")
    if secure is not None and secure.lower() in ("true", "false"):
        del fields["secure"]
        if secure.lower() == "true":
            scheme = scheme or "https"
    return ServiceInstance.from_registry(
        service=service,
        id=id,
        address=address,
        port=port,
        tags=left_tags,
        meta=fields,
        node=node,
        scheme=scheme,
        version=version,
    )


def native_weight(weights: Any) -> int | None:
    """``Weights.Passing`` of a Consul entry, when it is a whole number >= 0."""
    if not isinstance(weights, Mapping):
        return None
    passing = weights.get("Passing")
    if isinstance(passing, bool) or not isinstance(passing, int) or passing < 0:
        return None
    return passing


def written_weight(instance: ServiceInstance) -> int | None:
    """The native ``Weights.Passing`` written for ``instance``: its meta ``weight`` when a
    whole number >= 1 (Consul refuses 0; a weight 0 stays in the meta only)."""
    text = instance.meta.get("weight")
    if text is None or not (text.isascii() and text.isdigit()):
        return None
    weight = int(text)
    return weight if weight >= 1 else None


def _host_port(instance: ServiceInstance) -> str:
    host = f"[{instance.address}]" if ":" in instance.address else instance.address
    return f"{host}:{instance.port}"


def write_entry(instance: ServiceInstance, flavor: str = "registry-agent") -> dict[str, Any]:
    """The service fields of ``/v1/agent/service/register`` for ``instance`` in ``flavor``.

    ``Name``, ``ID``, ``Address``, ``Port``, ``Tags``, ``Meta``, and
    ``TaggedAddresses`` when the flavor has any (checks are the caller's).
    Call :func:`validate_flavor` first: this one does not check.
    """
    if flavor not in FLAVORS:
        raise ConfigError(f"expected one of {', '.join(FLAVORS)}, got {flavor!r}", field="flavor")
    tags = list(instance.tags)
    meta = dict(instance.meta)
    tagged: dict[str, dict[str, Any]] = {}
    if flavor == "kratos":
        # kratos Register: the version tag always, even "version=" (a kratos reader
        # takes the empty version); one tagged address per endpoint scheme.
        tags.insert(0, f"{_KRATOS_VERSION}{instance.version}")
        # A kratos server always has an endpoint URL; no scheme said: http, as
        # kratos's resolver reads an entry without one.
        scheme = instance.scheme or "http"
        url = f"{scheme}://{_host_port(instance)}"
        tagged[scheme] = {"Address": url, "Port": instance.port}
    elif flavor == "go-micro":
        tags[:0] = _gomicro.encode_tags(instance)
        meta = _gomicro.encode_meta(instance)  # plugins v4+ Register: Meta = node.Metadata
    else:
        if instance.version:
            meta[META_VERSION] = instance.version
        if instance.scheme:
            meta[META_SCHEME] = instance.scheme
        if flavor == "spring":
            meta["secure"] = "true" if instance.scheme == "https" else "false"
    payload: dict[str, Any] = {
        "Name": instance.service,
        "ID": instance.id,
        "Address": instance.address,
        "Port": instance.port,
        "Tags": tags,
        "Meta": meta,
    }
    if tagged:
        payload["TaggedAddresses"] = tagged
    weight = written_weight(instance)
    if weight is not None:
        # Consul's own weights: its DNS SRV answers and Envoy (Connect) honour them.
        payload["Weights"] = {"Passing": weight, "Warning": 1}
    return payload


def read_written(payload: Mapping[str, Any], node: str = "") -> ServiceInstance:
    """What :func:`read_instance` makes of ``payload`` (a :func:`write_entry` result)."""
    return read_instance(
        service=payload["Name"],
        id=payload["ID"],
        address=payload["Address"],
        port=payload["Port"],
        tags=payload["Tags"],
        meta=payload["Meta"],
        tagged_addresses=payload.get("TaggedAddresses") or {},
        node=node,
    )


def validate_flavor(instance: ServiceInstance, flavor: str = "registry-agent") -> None:
    """Raise :class:`Rejected` naming the field when ``instance`` cannot be written in
    ``flavor`` so that it reads back as itself (or its peers would misread it)."""
    context = error_context("consul", instance=instance)
    for key in (META_VERSION, META_SCHEME):
        if key in instance.meta:
            raise Rejected(
                f"meta.{key}: this key holds the instance's {key.rpartition('-')[2]} "
                f"field in Consul: set the field instead",
                **context,
            )
    if flavor == "kratos":
        for tag in instance.tags:
            if tag.startswith(_KRATOS_VERSION):
                raise Rejected(
                    f"tags: {tag!r} would be read by kratos as the version: set the "
                    "instance's version instead",
                    **context,
                )
    elif flavor == "go-micro":
        why = _gomicro.check_instance(instance)  # its tags (check_tags) and meta
        if why is not None:
            raise Rejected(f"{why} (flavor go-micro)", **context)
    elif flavor == "spring":
        if not _DNS_NAME.match(instance.service):
            # The field is named once: the agent already says which service[i] it is.
            raise Rejected(
                f"service name {instance.service!r}: Spring Cloud Consul takes letters, "
                f"digits and single '-', starting with a letter and ending with a letter "
                f"or digit (its normalizeForDns; Consul DNS too)",
                **context,
            )
        secure = instance.meta.get("secure")
        if secure is not None and secure != ("true" if instance.scheme == "https" else "false"):
            raise Rejected(
                f"meta.secure: {secure!r} contradicts the scheme {instance.scheme or '(none)'!r} "
                "(the spring flavor writes secure from the scheme): drop it",
                **context,
            )
