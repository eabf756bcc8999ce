"""Backend lookup through entry points and open_backend's errors."""

import sys
from importlib.metadata import entry_points

import pytest
from registry_agent_consul import ConsulBackend
from registry_agent_etcd import EtcdBackend

from registry_agent import BackendNotFound, ConfigError, available_backends, open_backend
from registry_agent._plugins import ENTRY_POINT_GROUP, backend_class
from registry_agent.testing import MemoryBackend


def test_entry_points_map_the_shipped_backends() -> None:
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert found == {
        "consul": "registry_agent_consul:ConsulBackend",
        "etcd": "registry_agent_etcd:EtcdBackend",
        "memory": "registry_agent.testing.memory:MemoryBackend",
    }
    assert available_backends() == ["consul", "etcd", "memory"]


def test_open_each_scheme() -> None:
    consul = open_backend("consul://127.0.0.1:8500?dc=dc1&token=t", timeout="2s")
    assert isinstance(consul, ConsulBackend)
    assert (consul.host, consul.port, consul.dc, consul.timeout) == ("127.0.0.1", 8500, "dc1", 2.0)
    etcd = open_backend("etcd://127.0.0.1?prefix=/reg")
    assert isinstance(etcd, EtcdBackend)
    assert (etcd.port, etcd.prefix) == (2379, "/reg")
    assert isinstance(open_backend("memory://"), MemoryBackend)


def test_etcd_takes_every_member_of_a_cluster() -> None:
    etcd = open_backend("etcd://10.0.0.1:2379,10.0.0.2,[::1]:2479?prefix=/reg")
    assert isinstance(etcd, EtcdBackend)
    assert etcd.endpoints == (("10.0.0.1", 2379), ("10.0.0.2", 2379), ("::1", 2479))
    assert (etcd.host, etcd.port) == ("10.0.0.1", 2379)  # starts with the first
    assert repr(etcd) == "EtcdBackend(etcd://10.0.0.1:2379,10.0.0.2:2379,[::1]:2479, prefix='/reg')"


def test_memory_backends_with_one_name_share_state() -> None:
    a = open_backend("memory://shared-name")
    b = open_backend("memory://shared-name")
    c = open_backend("memory://other-name")
    assert isinstance(a, MemoryBackend)
    assert isinstance(b, MemoryBackend)
    assert isinstance(c, MemoryBackend)
    assert a.registry is b.registry
    assert a.registry is not c.registry


def test_unknown_scheme_lists_installed_backends() -> None:
    with pytest.raises(BackendNotFound) as info:
        open_backend("zookeeper://127.0.0.1:2181")
    assert "'zookeeper'" in str(info.value)
    assert "consul, etcd, memory" in str(info.value)


@pytest.mark.parametrize(("scheme", "module"), [("etcd", "aetcd"), ("consul", "consul")])
def test_missing_extra_gives_the_pip_hint(
    monkeypatch: pytest.MonkeyPatch, scheme: str, module: str
) -> None:
    # A None entry in sys.modules makes the import fail as if not installed.
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delitem(sys.modules, f"registry_agent_{scheme}", raising=False)
    monkeypatch.delitem(sys.modules, f"registry_agent_{scheme}._backend", raising=False)
    with pytest.raises(BackendNotFound) as info:
        backend_class(scheme)
    assert f"pip install 'registry-agent[{scheme}]'" in str(info.value)


@pytest.mark.parametrize(
    ("url", "options", "field", "expected"),
    [
        (
            "consul://h:1?colour=red",
            {},
            "backend.colour",
            "unknown option(s) 'colour' for consul://",
        ),
        ("consul://h:1?a=1&b=2", {}, "backend", "unknown option(s) 'a', 'b' for consul://"),
        (
            "etcd://h:1",
            {"prefx": "/a"},
            "backend.prefx",
            "expected one of: ca_file, cert_file, format, keepalive_time, keepalive_timeout,"
            " key_file, max_request_bytes, password, prefix, scheme, timeout, tls, user",
        ),
        ("consul://h:1?scheme=ftp", {}, "backend.scheme", "expected one of http, https"),
        ("consul://h:1?timeout=soon", {}, "backend.timeout", "duration"),
        ("consul://h:1?timeout=0s", {}, "backend.timeout", "above zero"),
        (
            "consul://h:1",
            {"deregister_critical_after": "30s"},
            "backend.deregister_critical_after",
            "floor is 60s",
        ),
        (  # a break-it run: the keyword had a ceiling, the URL option did not
            "consul://h:1?deregister_critical_after=17520h",
            {},
            "backend.deregister_critical_after",
            "at most 31536000s (a year), got 63072000s",
        ),
        ("etcd://h:1?prefix=services", {}, "backend.prefix", "leading '/'"),
        ("etcd://h:1?prefix=//services", {}, "backend.prefix", "got '//services'"),
        ("etcd://h:1?user=alice", {}, "backend.user", "user and password go together"),
        ("consul://a:1,b:2", {}, "backend", "exactly one host:port"),
        ("etcd://a:1,b:2,a:1", {}, "backend", "an endpoint is listed twice"),
        ("etcd://a:1?tls=maybe", {}, "backend.tls", "expected true or false"),
        ("consul://h:1?token=a", {"token": "b"}, "backend", "both in the URL and as keywords"),
    ],
)
def test_bad_options_name_the_field(
    url: str, options: dict[str, object], field: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        open_backend(url, **options)
    assert info.value.field == field
    assert expected in str(info.value)


def test_explicit_consul_token_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "10.9.9.9:1")
    explicit = open_backend("consul://127.0.0.1:8500", token="explicit")
    assert isinstance(explicit, ConsulBackend)
    assert explicit.api.token == "explicit"
    assert explicit.api.http.base_uri == "http://127.0.0.1:8500"
    implicit = open_backend("consul://127.0.0.1:8500")
    assert isinstance(implicit, ConsulBackend)
    assert implicit.api.token == "from-env"


def _fake_check_plugin(monkeypatch: pytest.MonkeyPatch, **targets: str) -> None:
    """``registry_agent.checks`` entry points named ``targets`` (kind -> "module:attr")."""
    import types
    from importlib.metadata import EntryPoint

    from registry_agent._health.base import HealthCheck
    from registry_agent._urls import Table, as_str

    class DnsCheck(HealthCheck):
        """Resolves a name (a stand-in for a third-party kind)."""

        kind = "dns"
        example = 'dns = "name"'

        @classmethod
        def from_table(cls, table: Table) -> HealthCheck:
            return cls(f"dns {table.require('dns', as_str)}", **cls.common_options(table))

    module = types.ModuleType("fake_checks")
    module.DnsCheck = DnsCheck  # type: ignore[attr-defined]
    module.NotACheck = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_checks", module)
    found = [EntryPoint(k, v, "registry_agent.checks") for k, v in targets.items()]

    def fake_entry_points(*, group: str, name: str | None = None) -> list[EntryPoint]:
        if group != "registry_agent.checks":
            return list(entry_points(group=group))
        return [ep for ep in found if name is None or ep.name == name]

    monkeypatch.setattr("registry_agent._plugins.entry_points", fake_entry_points)


def test_a_check_kind_from_an_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    from registry_agent._agent.config import parse_config
    from registry_agent._plugins import check_class, check_kinds

    _fake_check_plugin(monkeypatch, dns="fake_checks:DnsCheck", bad="fake_checks:NotACheck")
    assert check_kinds() == ["http", "tcp", "command", "grpc", "bad", "dns"]
    assert check_class("dns").kind == "dns"
    config = parse_config(
        {
            "backend": {"url": "memory://plugin-checks"},
            "service": [{"name": "a", "port": 1, "check": [{"dns": "db", "interval": "2s"}]}],
        },
        env={},
    )
    (check,) = config.services[0].checks
    assert (check.kind, check.build().name, check.build().interval) == ("dns", "dns db", 2.0)
    with pytest.raises(ConfigError, match=r"the bad check kind .* is not a HealthCheck class"):
        check_class("bad")
    with pytest.raises(ConfigError, match="no check kind 'nope'; known kinds: http, tcp"):
        check_class("nope")


def test_a_check_kind_registered_under_another_name_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from registry_agent._plugins import check_class

    _fake_check_plugin(monkeypatch, resolve="fake_checks:DnsCheck", gone="nowhere_at_all:X")
    with pytest.raises(ConfigError, match=r"the resolve check kind .* says its kind is 'dns'"):
        check_class("resolve")
    with pytest.raises(ConfigError, match=r"the gone check kind .* failed to load"):
        check_class("gone")
