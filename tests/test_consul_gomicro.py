"""go-micro's Consul tags, both ways: golden tags Go writes, and ours read by go-micro's rules.

The rules are go-micro's ``registry/consul/encoding.go`` (``encode``, ``decode``,
``encodeMetadata``, ``decodeMetadata``, ``encodeVersion``, ``decodeVersion``,
``decodeEndpoints``), the same file in micro/go-micro v1.0.0-v1.13 (removed in
v1.14.0), go-micro/plugins ``v2``-``v5/registry/consul`` and micro/go-micro
v5.7.0-v6.10.0 (77fc793d5), and ``consul.go`` ``Register`` for the tag order.

Golden tags: ``v-789c32d433d03300040000ffff02ce00ee`` ("1.0.0") and
``v-789cca492c492d2e01040000ffff08cc028e`` ("latest") are go-micro's own
(``registry/consul/encoding_test.go``, ``TestEncodingVersion``); the others were
written by Go 1.19.8's standard library called as ``encoding.go`` calls it
(``json.Marshal(map[string]string{k: v})``, ``zlib.NewWriter``, ``Close``,
``hex.EncodeToString``), which gives those two as well.
"""

from __future__ import annotations

import contextlib
import json
import re
import zlib
from collections.abc import Sequence

import pytest
from registry_agent_consul._gomicro import (
    MAX_PAYLOAD,
    GoMicroTags,
    check_instance,
    check_tags,
    decode_tags,
    encode_meta,
    encode_tags,
)

from registry_agent import ServiceInstance

# --- go-micro's decoders, followed line by line (registry/consul/encoding.go) -------------


class GoPanic(Exception):
    """Where go-micro's Go code would panic."""


def go_decode(text: str) -> bytes | None:
    """``decode``: hex.DecodeString, zlib.NewReader, io.ReadAll; nil on any error."""
    if len(text) % 2 or not re.fullmatch(r"[0-9a-fA-F]*", text):
        return None
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(bytes.fromhex(text))
    except zlib.error:
        return None
    return data if inflater.eof else None


def go_unmarshal_map(buf: bytes | None) -> dict[str, str] | None:
    """``json.Unmarshal(buf, &kv)`` into a map[string]string; None where it returns an error.

    Measured on Go 1.19.8: a null value gives "", a number an error, top-level
    null a nil map and no error, invalid UTF-8 and lone surrogates U+FFFD.
    """
    if buf is None:
        return None  # json.Unmarshal(nil): unexpected end of JSON input
    try:
        parsed = json.loads(buf.decode("utf-8", "replace"))
    except (ValueError, RecursionError):  # Go: an error past 10000 levels of nesting
        return None
    if parsed is None:
        return {}
    if not isinstance(parsed, dict):
        return None
    out = {}
    for key, value in parsed.items():
        if value is None:
            value = ""
        if not isinstance(value, str):
            return None
        out[fix(key)] = fix(value)
    return out


def fix(text: str) -> str:
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def go_decode_metadata(tags: Sequence[str]) -> dict[str, str]:
    """``decodeMetadata``."""
    md: dict[str, str] = {}
    ver = ""
    for tag in tags:
        if len(tag) == 0 or tag[0] != "t":
            continue
        if len(tag) < 2:
            raise GoPanic("index out of range [1] with length 1")  # tag[1]
        if ver and tag[1] != ver:
            continue
        buf = None
        if tag[1] == "=":
            buf = tag[2:].encode()
        if tag[1] == "-":
            buf = go_decode(tag[2:])
        kv = go_unmarshal_map(buf)
        if kv is not None:
            md.update(kv)
        ver = tag[1]
    return md


def go_decode_version(tags: Sequence[str]) -> tuple[str, bool]:
    """``decodeVersion``."""
    for tag in tags:
        if len(tag) < 2 or tag[0] != "v":
            continue
        if tag[1] == "=":
            return tag[2:], True
        if tag[1] == "-":
            return (go_decode(tag[2:]) or b"").decode("utf-8", "replace"), True
    return "", False


def go_decode_endpoints(tags: Sequence[str]) -> list[object]:
    """``decodeEndpoints``: a JSON null becomes a nil *Endpoint in the list."""
    endpoints: list[object] = []
    ver = ""
    for tag in tags:
        if len(tag) == 0 or tag[0] != "e":
            continue
        if len(tag) < 2:
            raise GoPanic("index out of range [1] with length 1")
        if ver and tag[1] != ver:
            continue
        buf = tag[2:].encode() if tag[1] == "=" else go_decode(tag[2:]) if tag[1] == "-" else b""
        with contextlib.suppress(ValueError):  # json.Unmarshal errors are ignored
            endpoints.append(json.loads(buf or b""))
        ver = tag[1]
    return endpoints


def go_copy_endpoints(endpoints: list[object]) -> None:
    """``CopyService`` (internal/util/registry/util.go): ``*e = *ep`` for every endpoint."""
    if any(ep is None for ep in endpoints):
        raise GoPanic("invalid memory address or nil pointer dereference")


def go_reads(tags: Sequence[str]) -> tuple[str, dict[str, str]]:
    """The version and node metadata go-micro's GetService/watcher build from ``tags``."""
    go_copy_endpoints(go_decode_endpoints(tags))
    return go_decode_version(tags)[0], go_decode_metadata(tags)


# --- golden tags as Go writes them ---------------------------------------------------------

GO_VERSIONS = [
    ("1.0.0", "v-789c32d433d03300040000ffff02ce00ee"),
    ("latest", "v-789cca492c492d2e01040000ffff08cc028e"),
    ("", "v-789c010000ffff00000001"),
    ("1.0", "v-789c32d43300040000ffff01220090"),
    ("v2.3.1-β", "v-789c2a33d233d633d43db709100000ffff0cb20316"),
]

GO_META = [
    ("protocol", "grpc", "t-789caa562a28ca2fc94fcecf51b2524a2f2a4856aa05040000ffff468306d9"),
    ("protocol", "http", "t-789caa562a28ca2fc94fcecf51b252ca28292950aa05040000ffff46ca06ed"),
    ("secure", "true", "t-789caa562a4e4d2e2d4a55b2522a292a4d55aa05040000ffff36a00602"),
    ("registry", "consul", "t-789caa562a4a4dcf2c2e29aa54b2524acecf2b2ecd51aa05040000ffff560f07c8"),
    (
        "region",
        "eu-west-1",
        "t-789caa562a4a4dcfcccf53b2524a2dd52d4f2d2ed13554aa05040000ffff57cf0767",
    ),
    ("team", "支付", "t-789caa562a494dcc55b2527a3665fd93dd33946a01010000ffff3ee207c2"),
    ("emoji", "🚀 ok", "t-789caa564acdcdcfca54b252fa307f5683427eb6522d200000ffff49250772"),
    ("empty", "", "t-789caa564acd2d28a954b25252aa05040000ffff1b4803ea"),
    (
        "html",
        '<a href="x">&</a>',
        "t-789caa56ca28c9cd51b2528a293530304e4e54c8284a4db38d51aa888188a48248233388ac7e"
        "22444ca916100000ffffdaab1090",
    ),
    ("ls", "a\u2028b", "t-789caa56ca2956b2524a8c29353230b24852aa05040000ffff2dcf04fa"),
    ("a", "b", "t-789caa564a54b2524a52aa05040000ffff0c70027e"),
    (
        "long",
        "abc" * 14,
        "t-789caa56cac9cf4b57b2524a4c4a261229d502020000ffff0561137f",
    ),
]
GO = {f"{key}={value}": tag for key, value, tag in GO_META}
GO_V = dict(GO_VERSIONS)
GO_REGISTRY_NODE = {  # a go-micro gRPC server's node (server/grpc/grpc.go Register)
    "broker": ("http", "t-789caa564a2acacf4e2d52b252ca28292950aa05040000ffff364d0600"),
    "registry": ("consul", GO["registry=consul"]),
    "server": ("grpc", "t-789caa562a4e2d2a4b2d52b2524a2f2a4856aa05040000ffff36fa05fe"),
    "transport": ("grpc", "t-789caa562a294acc2b2ec82f2a51b2524a2f2a4856aa05040000ffff4f4c0754"),
    "protocol": ("grpc", GO["protocol=grpc"]),
}
GO_ENDPOINT = (
    "e-789c64cc310a02311005d0bbfc3a7880b9c096823718d8df2531ce4c0409b9bb4d148ced2bde80f1d1e9011"
    "9a85a08c1c1b82d4c8857fbb3a7e64e87d49ef34c307abb57e75e2cfd3dbeb82585a1a78642c64c9fe66a27cd"
    "2f0703f31d0000ffffac983ab8"
)
GO_NULL_ENDPOINT = "e-789cca2bcdc901040000ffff045f01bc"


def inflate(tag: str) -> bytes:
    return zlib.decompress(bytes.fromhex(tag[2:]))


def test_the_golden_tags_are_what_they_say() -> None:
    # The vectors themselves: each inflates (with Go's own framing) to the value named.
    for version, tag in GO_VERSIONS:
        assert inflate(tag) == version.encode()
    for key, value, tag in GO_META:
        assert json.loads(inflate(tag)) == {key: value}
    for key, (value, tag) in GO_REGISTRY_NODE.items():
        assert json.loads(inflate(tag)) == {key: value}
    assert json.loads(inflate(GO_ENDPOINT))["name"] == "Orders.Get"


# --- go-micro writes, we read ---------------------------------------------------------------


@pytest.mark.parametrize(("version", "tag"), GO_VERSIONS)
def test_go_written_version_tag_reads_as_its_version(version: str, tag: str) -> None:
    decoded = decode_tags([tag])
    assert decoded == GoMicroTags(version=version, meta={}, tags=())
    assert decoded.skipped == ()


@pytest.mark.parametrize(("key", "value", "tag"), GO_META)
def test_go_written_metadata_tag_reads_as_its_metadata(key: str, value: str, tag: str) -> None:
    decoded = decode_tags([tag, GO_V["1.0.0"]])
    assert decoded is not None
    assert decoded.version == "1.0.0"
    if key == "protocol":  # protocol is the scheme, not metadata
        assert (decoded.scheme, decoded.meta) == (value, {})
    else:
        assert (decoded.scheme, decoded.meta) == ("", {key: value})


def test_a_go_micro_grpc_node_reads_as_an_instance_with_its_scheme() -> None:
    # consul.go Register: metadata tags (Go map order: random), endpoints, then the version.
    tags = [tag for _, tag in GO_REGISTRY_NODE.values()]
    tags.reverse()
    tags += [GO_ENDPOINT, GO_V["1.0.0"]]
    decoded = decode_tags(tags)
    assert decoded == GoMicroTags(
        version="1.0.0",
        meta={"broker": "http", "registry": "consul", "server": "grpc", "transport": "grpc"},
        tags=(),
        scheme="grpc",
    )
    assert go_reads(tags) == ("1.0.0", {k: v for k, (v, _) in GO_REGISTRY_NODE.items()})


def test_plain_tags_around_go_micro_tags_stay_in_order() -> None:
    tags = ["edge", GO["region=eu-west-1"], "v", "x=1", GO_V["latest"], "version=2", ""]
    decoded = decode_tags(tags)
    assert decoded is not None
    assert decoded.tags == ("edge", "v", "x=1", "version=2", "")
    assert (decoded.version, decoded.meta) == ("latest", {"region": "eu-west-1"})


@pytest.mark.parametrize(
    "tags",
    [[], ["a", "b"], ["version=1.0.0", "grpc=grpc://10.0.0.1:9000"], ["team", "tls", "e"], ["t"]],
)
def test_entries_without_go_micro_tags_read_as_none(tags: list[str]) -> None:
    assert decode_tags(tags) is None


def test_the_old_plain_forms_are_read() -> None:
    # 2015-10 to 2016-03 (fcbd2acdd, e94179623^): t={json}, e={json}, v=<version>.
    tags = ['t={"a":"b"}', 't={"protocol":"http"}', 'e={"name":"Orders.Get"}', "v=1.0", "web"]
    decoded = decode_tags(tags)
    assert decoded == GoMicroTags(version="1.0", meta={"a": "b"}, tags=("web",), scheme="http")
    assert go_reads(tags) == ("1.0", {"a": "b", "protocol": "http"})


def test_the_2016_double_forms_read_like_go_micro_reads_them() -> None:
    # 61178d1b4 (2016-03-29) to 06ee80fd0 (2016-05-22): each item plain first, then encoded.
    # go-micro reads the plain ones (the first 't' tag fixes the form) and the first version.
    encoded = "t-" + zlib.compress(b'{"a":"encoded"}').hex()
    tags = ['t={"a":"plain"}', encoded, 'e={"name":"x"}', GO_ENDPOINT, "v=1.0", "v-00"]
    decoded = decode_tags(tags)
    assert decoded is not None
    assert (decoded.version, decoded.meta, decoded.tags) == ("1.0", {"a": "plain"}, ("v-00",))
    assert go_reads(tags) == ("1.0", {"a": "plain"})
    assert any("form of the first 't' tag" in why for why in decoded.skipped)


# --- what we write, go-micro reads ----------------------------------------------------------

INSTANCES = [
    ServiceInstance("orders", "10.0.0.1", 9000),
    ServiceInstance("orders", "10.0.0.1", 9000, scheme="grpc", version="1.0.0"),
    ServiceInstance("orders", "10.0.0.1", 9000, scheme="grpcs", meta={"zone": "a"}),
    ServiceInstance("orders", "10.0.0.1", 8443, scheme="https", version="2024.11-rc.1+b5"),
    ServiceInstance("orders", "10.0.0.1", 8080, scheme="http", tags=("team", "edge", "v")),
    ServiceInstance("orders", "10.0.0.1", 8080, scheme="ws", meta={"secure": "true"}),
    ServiceInstance("orders", "10.0.0.1", 8080, scheme="grpc", meta={"secure": "false"}),
    ServiceInstance("orders", "10.0.0.1", 8443, scheme="https", meta={"secure": "true"}),
    ServiceInstance(
        "orders",
        "10.0.0.1",
        8080,
        version="v2.3.1-β",
        meta={
            "team": "支付",
            "emoji": "🚀 ok",
            "empty": "",
            "html": '<a href="x">&</a>',
            "ctl": "a\nb\tc\x01\x7f\b\f",
            "ls": "a\u2028b\u2029",
            "quote": '"\\',
            "ключ": "значение",
            "secure": "false",
            "long": "abc" * 2000,
        },
        tags=("tls", "env=prod", "", "T"),
    ),
]


@pytest.mark.parametrize("instance", INSTANCES, ids=lambda i: i.scheme or "no-scheme")
def test_go_micro_reads_our_tags_as_the_instance(instance: ServiceInstance) -> None:
    assert check_instance(instance) is None
    tags = encode_tags(instance) + list(instance.tags)
    version, meta = go_reads(tags)
    assert version == instance.version
    assert meta == encode_meta(instance)
    assert {k: v for k, v in meta.items() if k not in ("protocol", "secure")} == {
        k: v for k, v in instance.meta.items() if k not in ("protocol", "secure")
    }
    assert go_decode_version(tags)[1]  # always written, also for an empty version


@pytest.mark.parametrize("instance", INSTANCES, ids=lambda i: i.scheme or "no-scheme")
def test_our_tags_read_back_as_the_instance(instance: ServiceInstance) -> None:
    decoded = decode_tags(encode_tags(instance) + list(instance.tags))
    assert decoded == GoMicroTags(
        version=instance.version,
        meta=dict(instance.meta),
        tags=instance.tags,
        scheme=instance.scheme,
    )
    assert decoded.skipped == ()


@pytest.mark.parametrize(
    ("scheme", "added"),
    [
        ("", {}),
        ("http", {"protocol": "http"}),
        ("https", {"protocol": "https"}),
        ("grpc", {"protocol": "grpc"}),
        ("grpcs", {"protocol": "grpcs"}),
        ("mucp", {"protocol": "mucp"}),
    ],
)
def test_the_scheme_travels_as_go_micro_protocol(scheme: str, added: dict[str, str]) -> None:
    # go-micro's HTTP client picks nodes with protocol=http (and speaks plain http only:
    # an https node is rightly not picked); its gRPC server writes protocol=grpc.
    instance = ServiceInstance("orders", "10.0.0.1", 9000, scheme=scheme, meta={"a": "b"})
    assert encode_meta(instance) == {"a": "b", **added}
    decoded = decode_tags(encode_tags(instance))
    assert decoded is not None
    assert (decoded.scheme, decoded.meta) == (scheme, {"a": "b"})


@pytest.mark.parametrize(
    ("protocol", "secure", "scheme", "meta"),
    [
        ("http", "true", "https", {}),  # go-micro's HTTP broker: secure=true -> https
        ("grpc", "true", "grpcs", {}),
        ("http", "false", "http", {"secure": "false"}),
        ("mucp", "true", "mucp", {"secure": "true"}),
        ("MUCP", "", "", {"protocol": "MUCP", "secure": ""}),  # not a scheme name: meta
    ],
)
def test_go_micro_protocol_and_secure_read_as_the_scheme(
    protocol: str, secure: str, scheme: str, meta: dict[str, str]
) -> None:
    tags = ["t-" + z(json.dumps({"protocol": protocol}).encode())]
    tags.append("t-" + z(json.dumps({"secure": secure}).encode()))
    decoded = decode_tags(tags)
    assert decoded is not None
    assert (decoded.scheme, decoded.meta) == (scheme, meta)


@pytest.mark.parametrize(("key", "value", "tag"), GO_META)
def test_our_json_is_go_json_byte_for_byte(key: str, value: str, tag: str) -> None:
    # The JSON inside is exactly Go's json.Marshal (HTML characters and U+2028 escaped).
    # The zlib around it is Go's default level (header 78 9c) but zlib's deflate: Go's
    # compress/flate ends with an empty final stored block and never takes 3-byte
    # matches, so its bytes can differ; only what they inflate to is compared.
    if key in ("protocol", "secure"):
        return  # these come from the scheme, checked below
    ours = encode_tags(ServiceInstance("s", "h", 1, meta={key: value}))[0]
    assert ours.startswith("t-789c")
    assert inflate(ours) == inflate(tag)
    assert go_decode_metadata([ours]) == go_decode_metadata([tag]) == {key: value}


def test_scheme_tags_inflate_to_go_micros_own_json() -> None:
    ours = encode_tags(ServiceInstance("s", "h", 1, scheme="http", meta={"region": "eu-west-1"}))
    go_tags = [GO["protocol=http"], GO["region=eu-west-1"], GO_V[""]]
    assert [inflate(t) for t in ours] == [inflate(t) for t in go_tags]
    assert [t[:2] for t in ours] == ["t-", "t-", "v-"]


def test_our_tags_are_sorted_metadata_then_version() -> None:
    instance = ServiceInstance("s", "h", 1, scheme="grpc", version="3", meta={"b": "2", "a": "1"})
    tags = encode_tags(instance)
    assert [json.loads(inflate(t)) for t in tags[:-1]] == [
        {"a": "1"},
        {"b": "2"},
        {"protocol": "grpc"},
    ]
    assert inflate(tags[-1]) == b"3"
    assert encode_tags(instance) == tags  # the same every time: no re-registration churn


def test_ours_go_first_because_a_plain_t_tag_ahead_hides_the_metadata() -> None:
    instance = ServiceInstance("s", "h", 1, meta={"a": "b"}, tags=("team",))
    ours = encode_tags(instance)
    assert go_decode_metadata([*ours, "team"]) == {"a": "b"}
    assert go_decode_metadata(["team", *ours]) == {}  # 'e' fixed the form: t- skipped
    decoded = decode_tags(["team", *ours])
    assert decoded is not None
    assert (decoded.meta, decoded.tags) == ({}, ("team",))  # we see what go-micro sees
    assert "first 't' tag 'team'" in decoded.skipped[0]


def test_lone_surrogates_are_written_as_go_writes_invalid_utf8() -> None:
    instance = ServiceInstance("s", "h", 1, meta={"k": "a\ud800b", "\udfff": "c"})
    decoded = decode_tags(encode_tags(instance))
    assert decoded is not None
    assert decoded.meta == {"k": "a\ufffdb", "\ufffd": "c"}


# --- what go-micro could not read: ignored with a reason, never a crash ---------------------


def z(data: bytes) -> str:
    return zlib.compress(data).hex()


GARBAGE = [
    ("t-zz", "not hex"),
    ("t-789", "not hex"),
    ("t-78 9c", "not hex"),
    ("t-", "not zlib"),
    ("t-0000", "not zlib"),
    (GO["a=b"][:-8], "not zlib (truncated)"),
    (GO["a=b"][:-1] + "f", "not zlib"),  # its adler32 ends in e: broken
    ("t-" + z(b"\xff\xfe{"), "not JSON"),
    ("t-" + z(b'{"a":1}'), "the value of 'a' is not a string"),
    ("t-" + z(b'["a"]'), "not a JSON object of strings"),
    ("t-" + z(b'{"a":"' + b"a" * MAX_PAYLOAD + b'"}'), f"more than {MAX_PAYLOAD} bytes"),
    ("t={not json", "not JSON"),
    ("t=[]", "not a JSON object of strings"),
    ("t=" + "[" * 100_000, "not JSON (nested too deep)"),
    ("t-" + z(b'{"a":' * 10_000), "not JSON (nested too deep)"),
    ("e=null", "a null endpoint crashes go-micro clients"),
    (GO_NULL_ENDPOINT, "a null endpoint crashes go-micro clients"),
    ("e-zz", "not hex"),
]


@pytest.mark.parametrize(("tag", "reason"), GARBAGE, ids=[g[0][:12] for g in GARBAGE])
def test_unreadable_go_micro_tags_are_skipped_with_a_reason(tag: str, reason: str) -> None:
    tags = [GO["region=eu-west-1"], tag, "web", GO_V["1.0.0"]]
    decoded = decode_tags(tags)
    assert decoded is not None
    assert (decoded.version, decoded.meta) == ("1.0.0", {"region": "eu-west-1"})
    assert decoded.tags == (tag, "web")  # not go-micro's data: kept as it was
    assert len(decoded.skipped) == 1
    assert reason in decoded.skipped[0]
    assert decoded.skipped[0].startswith(repr(tag[:23] + "…" if len(tag) > 24 else tag))
    if tag[0] == "t" and "more than" not in reason:  # go-micro ignores it too
        assert go_decode_metadata(tags) == {"region": "eu-west-1"}
    assert decode_tags([tag]) is None  # nothing readable: not go-micro's


def test_an_unreadable_first_version_tag_is_the_empty_version_as_in_go_micro() -> None:
    tags = ["v-zz", GO_V["1.0.0"]]
    decoded = decode_tags(tags)
    assert decoded is not None
    assert decoded.version == go_decode_version(tags)[0] == ""
    assert decoded.tags == ("v-zz",)
    assert "not hex" in decoded.skipped[0]


def test_json_edge_cases_read_as_go_reads_them() -> None:
    # Go 1.19.8 json.Unmarshal into map[string]string: null -> "", top-level null -> no
    # keys, lone surrogate escapes and invalid UTF-8 -> U+FFFD, duplicate keys: the last.
    cases = [
        (b'{"a":null,"b":"x"}', {"a": "", "b": "x"}),
        (b"null", {}),
        (b'{"a":"\\ud800"}', {"a": "\ufffd"}),
        (b'{"a":"\xff"}', {"a": "\ufffd"}),
        (b'{"a":"x","a":"y"}', {"a": "y"}),
        (b' {"A":"1","a":"2"} ', {"A": "1", "a": "2"}),
    ]
    for payload, meta in cases:
        tag = "t-" + z(payload)
        decoded = decode_tags([tag])
        assert decoded is not None
        assert decoded.meta == meta == go_decode_metadata([tag]), payload


def test_crash_tags_are_skipped_when_read() -> None:
    tags = ["t", GO["a=b"], "e", GO_V["1.0.0"]]
    with pytest.raises(GoPanic):
        go_reads(tags)
    decoded = decode_tags(tags)
    assert decoded is not None
    assert (decoded.meta, decoded.tags) == ({"a": "b"}, ("t", "e"))
    assert [why.split(":")[0] for why in decoded.skipped] == ["'t'", "'e'"]


# --- plain tags we refuse to write next to ours ---------------------------------------------


@pytest.mark.parametrize("tag", ["t", "e"])
def test_tags_that_crash_go_micros_decoder_are_refused(tag: str) -> None:
    with pytest.raises(GoPanic):
        go_reads([*encode_tags(ServiceInstance("s", "h", 1)), "web", tag])
    problem = check_tags(["web", tag])
    assert problem is not None
    assert problem.startswith(f"tags[1]: {tag!r} crashes go-micro's Consul decoder")


def test_a_null_endpoint_tag_would_crash_go_micro_clients_and_is_refused() -> None:
    with pytest.raises(GoPanic):
        go_reads([*encode_tags(ServiceInstance("s", "h", 1)), "e=null"])
    assert check_tags(["e=null"]) == (
        "tags[0]: 'e=null' has the form of go-micro's encoded tags ('e='…): go-micro would "
        "read it as an endpoint; rename the tag"
    )


@pytest.mark.parametrize(
    ("tag", "what"),
    [
        ('t={"a":"b"}', "metadata"),
        ("t-shirt", "metadata"),
        ("v=1", "a version"),
        ("v-2", "a version"),
        (GO_ENDPOINT, "an endpoint"),
        ("e=x", "an endpoint"),
    ],
)
def test_tags_in_go_micros_forms_are_refused(tag: str, what: str) -> None:
    problem = check_tags(["ok", tag])
    assert problem is not None
    assert problem.startswith(f"tags[1]: {tag[:23] + '…' if len(tag) > 24 else tag!r}")
    assert f"go-micro would read it as {what}" in problem


def test_a_plain_go_micro_form_tag_would_be_read_by_go_micro() -> None:
    # Why the forms are refused: after our tags (no metadata) go-micro takes them as data.
    ours = encode_tags(ServiceInstance("s", "h", 1))
    assert go_decode_metadata([*ours, 't={"owner":"x"}']) == {"owner": "x"}


@pytest.mark.parametrize(
    "tags", [(), ("team", "tls", "tcp", "T", "", "v", "version=1.0", "env", "edge", "x-t-")]
)
def test_other_plain_tags_pass_and_go_micro_reads_past_them(tags: tuple[str, ...]) -> None:
    assert check_tags(tags) is None
    instance = ServiceInstance("s", "h", 1, scheme="grpc", version="9", meta={"a": "b"}, tags=tags)
    assert go_reads(encode_tags(instance) + list(tags)) == ("9", encode_meta(instance))


@pytest.mark.parametrize(
    ("instance", "start"),
    [
        (ServiceInstance("s", "h", 1, tags=("a", "t")), "tags[1]: 't' crashes"),
        (ServiceInstance("s", "h", 1, meta={"protocol": "grpc"}), "meta.protocol: "),
        (ServiceInstance("s", "h", 1, scheme="http", meta={"secure": "true"}), "meta.secure: "),
        (ServiceInstance("s", "h", 1, scheme="grpc", meta={"secure": "true"}), "meta.secure: "),
        (ServiceInstance("s", "h", 1, scheme="grpc", meta={"protocol": "MUCP"}), "meta.protocol: "),
    ],
)
def test_instances_that_would_not_read_back_are_refused(
    instance: ServiceInstance, start: str
) -> None:
    problem = check_instance(instance)
    assert problem is not None
    assert problem.startswith(start)
    if start.startswith("meta"):  # and indeed: they would come back otherwise
        decoded = decode_tags(encode_tags(instance))
        assert decoded is not None
        assert (decoded.meta, decoded.scheme) != (dict(instance.meta), instance.scheme)
