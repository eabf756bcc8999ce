"""go-micro's Consul tags: node metadata and version as zlib+hex encoded tags.

Read from go-micro's Consul registry, ``registry/consul/{encoding,consul,watcher}.go``
in micro/go-micro v0.x-v1.13 (``registry/encoding.go`` in v0.1.0; removed in
v1.14.0, 2019), go-micro/plugins ``v2``-``v5/registry/consul`` (6026888; asim/go-micro
v3.7.1 ``plugins/registry/consul``), and back in micro/go-micro since v5.7.0
(checked up to v6.10.0, 77fc793d5). The encoding is the same in all of them
since 2016-05-22 (06ee80fd0):

- ``Register`` writes the tags ``encodeMetadata(node.Metadata)`` (one
  ``t-<hex(zlib(json {k: v}))>`` per key, in Go's random map order), then
  ``encodeEndpoints`` (``e-<hex(zlib(json endpoint))>``), then
  ``encodeVersion`` (``v-<hex(zlib(version))>``, written even for an empty
  version). Since go-micro/plugins v4 (bc705ed, 2022) and in micro/go-micro
  v5+ it also puts the node metadata in Consul's ``Meta``; it is never read back.
- ``GetService`` and the watcher read the version with ``decodeVersion`` (the
  first tag ``v-…`` or ``v=…`` wins, even when it does not decode) and the node
  metadata with ``decodeMetadata``: the first tag starting with ``t`` fixes the
  form (its second character) and later ``t`` tags of another form are skipped.
  So a plain tag such as ``team`` ahead of the metadata tags hides them all: ours
  go first. ``decodeMetadata`` and ``decodeEndpoints`` read ``tag[1]`` of every
  tag starting with ``t``/``e``: a tag ``t`` or ``e`` alone panics (index out of
  range). An ``e`` tag holding JSON ``null`` becomes a nil endpoint, which
  ``CopyService`` (``internal/util/registry/util.go``, used by the registry
  cache) dereferences: a panic in every client that looks the service up.
- Older writers (2015-10 to 2016-03) wrote plain ``t={json}``, ``e={json}`` and
  ``v=<version>``; from 2016-03-29 to 2016-05-22 both forms, plain first. The
  readers still take the plain forms.
- The node metadata holds what its server adds (``server/rpc_server.go``
  ``newNodeMetedata``: ``transport``, ``broker``, ``server``, ``registry`` and
  ``protocol=mucp``; the gRPC server ``protocol=grpc``, the HTTP server plugin
  ``protocol=http``). go-micro's HTTP client picks nodes labelled
  ``protocol=http``; its HTTP broker posts to ``https`` when ``secure=true``.

Scheme: go-micro has none; the scheme is written as the node's ``protocol``
as is (``grpc``, ``http``; ``https``/``grpcs`` too, which go-micro's HTTP client,
plain http only, then rightly does not pick), as our etcd go-micro format does.
Reading takes a ``protocol`` that is a scheme name as the scheme (``mucp`` for
go-micro's own RPC), upgraded to ``https``/``grpcs`` by ``secure=true`` (the
HTTP broker's way), and removes the keys it used from the metadata. Endpoints
are not carried (we have none to write; read ones are dropped).

zlib: Go's ``zlib.NewWriter`` compresses at level 6 (header ``78 9c``) like
``zlib.compress``, but its deflate differs from zlib's (a 4-byte minimum match
where zlib takes 3, and the data closed by an empty final stored block), so the
bytes can differ for the same input while inflating to the same JSON, which is
byte for byte what Go's ``json.Marshal`` writes (Go 1.22+: ``\\b``/``\\f`` as such;
older Go wrote ``\\u0008``/``\\u000c``). Nothing compares tag bytes: go-micro's
``Register`` hashes the service before encoding, its readers decode every tag.
"""

from __future__ import annotations

import functools
import json
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from registry_agent import ServiceInstance

__all__ = [
    "GoMicroTags",
    "check_instance",
    "check_tags",
    "decode_tags",
    "encode_meta",
    "encode_tags",
]

#: A decoded tag larger than this is refused (go-micro has no limit; no real value comes near).
MAX_PAYLOAD = 64 * 1024
_LEVEL = 6  # Go's zlib.DefaultCompression
_HEX = re.compile(r"[0-9a-fA-F]*")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,31}")
_GO_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


@dataclass(frozen=True)
class GoMicroTags:
    """What go-micro's tags of one Consul entry say, read as go-micro reads them.

    ``tags`` are the other (plain) tags in their order; ``scheme`` comes from the
    metadata's ``protocol`` (``secure=true`` turns ``http``/``grpc`` into
    ``https``/``grpcs``), and both keys are then left out of ``meta``.
    ``skipped`` says why a tag of go-micro's forms gave nothing.
    """

    version: str
    meta: dict[str, str]
    tags: tuple[str, ...]
    scheme: str = ""
    skipped: tuple[str, ...] = field(default=(), compare=False)


class _Bad(ValueError):
    """A tag of go-micro's forms whose payload go-micro could not read."""


def encode_meta(instance: ServiceInstance) -> dict[str, str]:
    """The node metadata go-micro would hold for ``instance``: its meta, ``protocol`` its scheme.

    go-micro's Consul registry (plugins v4+, go-micro v5+) also writes this as
    the service's Consul ``Meta``.
    """
    meta = dict(instance.meta)
    if instance.scheme:
        meta["protocol"] = instance.scheme
    return meta


def encode_tags(instance: ServiceInstance) -> list[str]:
    """The tags go-micro's Consul registry writes for ``instance``'s metadata and version.

    One ``t-`` tag per metadata key (sorted by key: go-micro's order is random),
    then the ``v-`` tag (also for an empty version). They must come before any
    plain tag (see :func:`check_tags`).
    """
    meta = encode_meta(instance)
    tags = ["t-" + _deflate(_go_json(key, meta[key])) for key in sorted(meta)]
    tags.append("v-" + _deflate(_go_utf8(instance.version).encode()))
    return tags


def check_tags(tags: Sequence[str]) -> str | None:
    """Why one of these plain tags would crash or confuse go-micro's decoder, or None.

    Refused: ``t`` and ``e`` alone (go-micro's decoder panics on them), and
    any tag in go-micro's encoded forms ``t-``, ``t=``, ``v-``, ``v=``, ``e-``,
    ``e=`` (go-micro would read it as metadata, a version or an endpoint, and a
    reader could not tell it from go-micro's own).
    """
    for i, tag in enumerate(tags):
        if tag in ("t", "e"):
            return (
                f"tags[{i}]: {tag!r} crashes go-micro's Consul decoder (it reads the second "
                f"character of every tag starting with {tag!r}); rename the tag"
            )
        if tag[:2] in ("t-", "t=", "v-", "v=", "e-", "e="):
            what = {"t": "metadata", "v": "a version", "e": "an endpoint"}[tag[0]]
            return (
                f"tags[{i}]: {_short(tag)!r} has the form of go-micro's encoded tags "
                f"({tag[:2]!r}…): go-micro would read it as {what}; rename the tag"
            )
    return None


def check_instance(instance: ServiceInstance) -> str | None:
    """Why ``instance`` cannot be written for go-micro as it is, or None.

    :func:`check_tags` on its tags, and meta keys that go-micro's tags use for
    the scheme (they would read back as a scheme, not as the meta registered).
    """
    problem = check_tags(instance.tags)
    if problem:
        return problem
    if "protocol" in instance.meta:
        return (
            "meta.protocol: go-micro's 'protocol' metadata is written from the instance's "
            "scheme; set scheme (http, https, grpc, grpcs…) instead of meta 'protocol'"
        )
    if instance.meta.get("secure") == "true" and instance.scheme in ("http", "grpc"):
        better = instance.scheme + "s"
        return (
            f"meta.secure: 'secure=true' with scheme {instance.scheme!r} reads back as "
            f"scheme {better!r}; set scheme={better!r} and remove meta 'secure'"
        )
    return None


def decode_tags(tags: Sequence[str], consul_meta: Mapping[str, str] = {}) -> GoMicroTags | None:
    """Read go-micro's metadata and version tags out of ``tags``; None when the entry
    carries no go-micro data.

    go-micro data is a new-form ``t-``/``v-``/``e-`` tag that decodes, or an
    old-form ``t={json object}``: a lone plain ``v=2``, ``t=blue`` or ``e=prod``
    is an ordinary tag of some other writer (the older go-micro writers always
    put a ``t=`` tag per metadata key beside their ``v=``), and reading it as
    go-micro's would lose the entry's Consul ``Meta``.

    Follows go-micro's ``decodeMetadata``/``decodeVersion`` (see the module
    docstring), without their crashes. Every tag of go-micro's forms that
    decodes is removed from the plain tags, used or not (the 2016 writers put
    both forms); one that does not decode stays a plain tag, and ``skipped``
    says why it gave nothing. Endpoints are dropped.

    ``consul_meta`` is the entry's Consul ``Meta``: go-micro/plugins v4+ and
    micro/go-micro v5+ write the node metadata there too, so the metadata read
    is its union with the tags' (the tags win on a key both hold); the scheme is
    taken from that union, so other keys in ``Meta`` (ours among them) are kept.
    """
    if not any(len(tag) > 1 and tag[0] in "tve" and tag[1] in "-=" for tag in tags):
        return None
    meta: dict[str, str] = {}
    skipped: list[str] = []
    plain: list[str] = []
    found = False
    first_t = ""  # go-micro's `ver`: the first tag starting with 't' fixes the form read
    version: str | None = None  # go-micro takes the first version tag, even an unreadable one
    for tag in tags:
        if tag in ("t", "e"):
            skipped.append(f"{tag!r}: go-micro's decoder crashes on this tag")
            plain.append(tag)
            continue
        if tag.startswith("t"):
            first_t = first_t or tag
        if len(tag) < 2 or tag[0] not in "tve" or tag[1] not in "-=":
            plain.append(tag)
            continue
        try:
            if tag[0] == "t":
                found_meta = _meta_of(tag)
                if tag[1] == first_t[1]:
                    meta.update(found_meta)
                else:
                    skipped.append(
                        f"{_short(tag)!r}: go-micro reads only the form of the first "
                        f"'t' tag {_short(first_t)!r}"
                    )
            elif tag[0] == "v":
                found_version = _version_of(tag)
                version = found_version if version is None else version
            else:
                _check_endpoint(tag)
        except _Bad as exc:
            skipped.append(f"{_short(tag)!r}: {exc}")
            plain.append(tag)
            version = "" if version is None and tag[0] == "v" else version
            continue
        found = found or tag[1] == "-" or (tag[0] == "t" and tag[2:].lstrip().startswith("{"))
    if not found:
        return None
    meta = {**consul_meta, **meta}
    return GoMicroTags(
        version=version or "",
        meta=meta,
        tags=tuple(plain),
        scheme=_take_scheme(meta),
        skipped=tuple(skipped),
    )


def _take_scheme(meta: dict[str, str]) -> str:
    """The scheme ``protocol``/``secure`` say, removing them from ``meta``; "" when none."""
    protocol = meta.get("protocol", "")
    if not _SCHEME.fullmatch(protocol):
        return ""
    del meta["protocol"]
    if protocol in ("http", "grpc") and meta.get("secure") == "true":
        del meta["secure"]
        return protocol + "s"
    return protocol


@functools.lru_cache(maxsize=1024)
def _version_of(tag: str) -> str:
    """The version a ``v-``/``v=`` tag holds (cached: watch answers repeat tags)."""
    return _payload(tag)


@functools.lru_cache(maxsize=1024)
def _meta_of(tag: str) -> dict[str, str]:
    """The metadata a ``t-``/``t=`` tag holds, as Go fills a map[string]string."""
    parsed = _json(_payload(tag))
    if parsed is None:
        return {}
    if not isinstance(parsed, dict):
        raise _Bad("not a JSON object of strings")
    out: dict[str, str] = {}
    for key, value in parsed.items():
        if value is None:
            value = ""  # Go's json.Unmarshal stores a null as the zero string
        elif not isinstance(value, str):
            raise _Bad(f"the value of {_short(key)!r} is not a string")
        out[_go_utf8(key)] = _go_utf8(value)
    return out


@functools.lru_cache(maxsize=1024)
def _check_endpoint(tag: str) -> None:
    """Raise :class:`_Bad` unless an ``e-``/``e=`` tag holds a JSON object."""
    if not isinstance(_json(_payload(tag)), dict):
        raise _Bad("not a JSON object (a null endpoint crashes go-micro clients)")


def _payload(tag: str) -> str:
    """The text after a tag's form: inflated for ``x-``, as is for the plain ``x=``.

    Invalid UTF-8 becomes U+FFFD, as Go's JSON decoder reads it.
    """
    if tag[1] == "=":
        return _go_utf8(tag[2:])
    return _inflate(tag[2:]).decode("utf-8", "replace")


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _Bad(f"not JSON ({exc})") from None
    except RecursionError:
        raise _Bad("not JSON (nested too deep)") from None


def _inflate(text: str) -> bytes:
    """hex-decode and inflate like go-micro's ``decode`` (Go's hex and zlib readers)."""
    if len(text) % 2 or not _HEX.fullmatch(text):
        raise _Bad("not hex")
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(bytes.fromhex(text), MAX_PAYLOAD + 1)
    except zlib.error as exc:
        raise _Bad(f"not zlib ({exc})") from None
    if len(data) > MAX_PAYLOAD:
        raise _Bad(f"inflates to more than {MAX_PAYLOAD} bytes")
    if not inflater.eof:
        raise _Bad("not zlib (truncated)")
    return data


def _deflate(data: bytes) -> str:
    return zlib.compress(data, _LEVEL).hex()


def _go_json(key: str, value: str) -> bytes:
    """Go's ``json.Marshal(map[string]string{key: value})``, byte for byte."""
    text = json.dumps({_go_utf8(key): _go_utf8(value)}, ensure_ascii=False, separators=(",", ":"))
    return text.translate(_GO_ESCAPES).encode()


def _go_utf8(text: str) -> str:
    """``text`` with lone surrogates as U+FFFD, as Go holds strings that were not UTF-8."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _short(tag: str) -> str:
    return tag if len(tag) <= 24 else tag[:23] + "…"
