"""The advertised address: the choice among a host's addresses and routes, on given facts.

Every test hands :func:`choose_address` a table of interfaces and a route answer;
the real host is never asked (integration/test_address_netns.py does that, on
test hosts in network namespaces).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import pytest

import registry_agent._address as address_module
from registry_agent import ConfigError, ServiceInstance, advertised_address
from registry_agent._address import (
    Route,
    Routes,
    choose_address,
    parse_route_v4,
    parse_route_v6,
)
from registry_agent._agent.config import load_config, parse_config

# A host with a loopback, a first network (eth0) and a second one (eth1); eth1 lists
# its IPv6 addresses first, as some platforms do.
HOST = {
    "lo": ["127.0.0.1", "::1"],
    "eth0": ["192.0.2.10", "fe80::1%eth0"],
    "eth1": ["fd00:1::10", "fe80::2%eth1", "10.1.0.10", "10.1.0.11"],
    "eth2": ["fe80::3%eth2"],
}


def _never(*_: object) -> NoReturn:
    raise AssertionError("asked for a fact this choice does not need")


def choose(
    *,
    network: str | None = None,
    interface: str | None = None,
    env: str | Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    interfaces: Mapping[str, Sequence[str]] | None = None,
    routes: Routes | None = None,
) -> str:
    host: Callable[[], Mapping[str, Sequence[str]]] = (
        (lambda: interfaces) if interfaces is not None else _never
    )
    answer: Callable[[int], Route | None] = routes if routes is not None else _never
    return choose_address(
        network=network,
        interface=interface,
        env=env,
        environ=environ or {},
        interfaces=host,
        routes=answer,
    )


# -- the default: the default route's address ---------------------------------------------


def test_default_is_the_ipv4_default_routes_source_without_listing_interfaces() -> None:
    routes = Routes(v4=Route("eth1", "10.1.0.10"), v6=Route("eth1", "fd00:1::10"))
    assert choose(routes=routes) == "10.1.0.10"


def test_ipv6_route_is_not_looked_up_when_ipv4_answers() -> None:
    asked: list[int] = []

    def routes(version: int) -> Route | None:
        asked.append(version)
        return Route("eth1", "10.1.0.10" if version == 4 else "fd00:1::10")

    assert (
        choose_address(
            network=None, interface=None, env=None, environ={}, interfaces=_never, routes=routes
        )
        == "10.1.0.10"
    )
    assert asked == [4]


def test_ipv6_only_when_there_is_no_ipv4_default_route() -> None:
    assert choose(routes=Routes(v6=Route("eth1", "fd00:1::10"))) == "fd00:1::10"


@pytest.mark.parametrize("source", ["", "127.0.0.1", "0.0.0.0", "169.254.1.1", "fd00:1::10"])
def test_an_unknown_or_unroutable_source_takes_the_route_interfaces_first_address(
    source: str,
) -> None:
    """No source, a loopback/unspecified/link-local one, or one of the other family:
    the interface's first IPv4 address that can be advertised."""
    assert choose(routes=Routes(v4=Route("eth1", source)), interfaces=HOST) == "10.1.0.10"


def test_ipv6_route_skips_link_local_addresses() -> None:
    routes = Routes(v6=Route("eth1", "fe80::2"))
    assert choose(routes=routes, interfaces=HOST) == "fd00:1::10"


def test_an_ipv4_route_with_nothing_to_advertise_falls_to_ipv6() -> None:
    routes = Routes(v4=Route("eth2", ""), v6=Route("eth1", "fd00:1::10"))
    assert choose(routes=routes, interfaces=HOST) == "fd00:1::10"


def test_a_route_without_interface_and_a_link_local_source_takes_its_holder_s_address() -> None:
    """The route found by the lookup alone (policy routing, a split default) leaves by
    the interface holding the kernel's source: 169.254.1.1 there, beside 10.7.0.7."""
    host = {**HOST, "eth3": ["169.254.1.1", "10.7.0.7"]}
    assert choose(routes=Routes(v4=Route("", "169.254.1.1")), interfaces=host) == "10.7.0.7"
    # A routable source needs no interface listing (choose() fails if one is asked).
    assert choose(routes=Routes(v4=Route("", "10.9.9.9"))) == "10.9.9.9"


@pytest.mark.parametrize(
    ("routes", "says"),
    [
        (Routes(), "no default route"),
        (Routes(v4=Route("", "169.254.1.1")), "no address to advertise"),
        (Routes(v4=Route("eth2", "")), "no address to advertise"),
        (Routes(v6=Route("lo", "::1")), "no address to advertise"),
    ],
)
def test_no_default_route_is_a_config_error_saying_how_to_choose(routes: Routes, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        choose(routes=routes, interfaces=HOST)
    error = caught.value
    assert error.field == "address"
    assert says in error.reason
    for how in ("address=", 'network="10.0.0.0/8"', 'interface="eth1"', 'env="POD_IP"'):
        assert how in error.reason
    # The host's addresses are listed, zones dropped; never the host name instead.
    assert "eth1 fd00:1::10, fe80::2, 10.1.0.10" in error.reason


# -- by network -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("network", "expected"),
    [
        ("10.0.0.0/8", "10.1.0.10"),
        ("10.1.0.11/32", "10.1.0.11"),
        ("192.0.2.0/24", "192.0.2.10"),
        ("fd00::/8", "fd00:1::10"),
        ("127.0.0.0/8", "127.0.0.1"),  # chosen on purpose: kept
        ("fe80::/10", "fe80::1"),
        (" 10.1.0.0/16 ", "10.1.0.10"),
        ("10.1.0.99/24", "10.1.0.10"),  # host bits are allowed, as ip(8) does
    ],
)
def test_network_picks_the_first_address_inside_it(network: str, expected: str) -> None:
    assert choose(network=network, interfaces=HOST) == expected


def test_nothing_inside_the_network_names_network_and_lists_the_addresses() -> None:
    with pytest.raises(ConfigError) as caught:
        choose(network="172.16.0.0/12", interfaces=HOST)
    assert caught.value.field == "network"
    assert "inside 172.16.0.0/12" in caught.value.reason
    assert "eth0 192.0.2.10, fe80::1" in caught.value.reason


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "eth1", "", "10.0.0/8x"])
def test_a_bad_network_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        choose(network=bad, interfaces=HOST)
    assert caught.value.field == "network"
    assert "CIDR" in caught.value.reason


# -- by interface -----------------------------------------------------------------------------


def test_interface_picks_its_first_ipv4_address() -> None:
    assert choose(interface="eth1", interfaces=HOST) == "10.1.0.10"
    assert choose(interface="eth0", interfaces=HOST) == "192.0.2.10"
    assert choose(interface="lo", interfaces=HOST) == "127.0.0.1"


def test_interface_and_network_together() -> None:
    assert choose(interface="eth1", network="fd00::/8", interfaces=HOST) == "fd00:1::10"
    assert choose(interface="eth1", network="10.1.0.11/32", interfaces=HOST) == "10.1.0.11"
    with pytest.raises(ConfigError) as caught:
        choose(interface="eth0", network="10.0.0.0/8", interfaces=HOST)
    assert caught.value.field == "network"
    assert "on eth0 inside 10.0.0.0/8" in caught.value.reason


def test_an_interface_with_only_link_local_addresses_has_nothing_to_advertise() -> None:
    with pytest.raises(ConfigError) as caught:
        choose(interface="eth2", interfaces=HOST)
    assert caught.value.field == "interface"


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        # 169.254.x.x beside the interface's real address: the real one, whatever the order.
        (["169.254.1.1", "192.168.7.7", "fe80::7%eth3"], "192.168.7.7"),
        (["fe80::7%eth3", "169.254.1.1", "fd00:7::7"], "fd00:7::7"),
        (["169.254.1.1", "127.0.0.2"], "127.0.0.2"),
        # Nothing else: the IPv4 link-local one (an IPv6 one is useless without its zone).
        (["fe80::7%eth3", "169.254.1.1"], "169.254.1.1"),
    ],
)
def test_interface_prefers_routable_addresses_to_link_local(
    addresses: list[str], expected: str
) -> None:
    assert choose(interface="eth3", interfaces={**HOST, "eth3": addresses}) == expected


def test_network_prefers_routable_addresses_to_loopback_and_link_local() -> None:
    host = {**HOST, "eth3": ["169.254.1.1", "10.7.0.7"]}
    assert choose(network="0.0.0.0/0", interfaces=host) == "192.0.2.10"
    assert choose(network="::/0", interfaces=host) == "fd00:1::10"
    assert choose(network="169.254.0.0/16", interfaces=host) == "169.254.1.1"


@pytest.mark.parametrize("name", ["eth9", ""])
def test_an_unknown_interface_names_interface_and_lists_the_host_s(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        choose(interface=name, interfaces=HOST)
    assert caught.value.field == "interface"
    assert "eth1" in caught.value.reason or "interface name" in caught.value.reason


# -- from the environment ---------------------------------------------------------------------


def test_env_takes_the_first_variable_set_without_looking_at_the_host() -> None:
    environ = {"HOST_IP": "10.9.0.1", "POD_IP": "10.244.1.7"}
    assert choose(env="POD_IP", environ=environ) == "10.244.1.7"
    assert choose(env=("POD_IP", "HOST_IP"), environ=environ) == "10.244.1.7"
    assert choose(env=["POD_IP", "HOST_IP"], environ={"HOST_IP": "10.9.0.1"}) == "10.9.0.1"
    assert choose(env=("POD_IP", "HOST_IP"), environ={"POD_IP": "", "HOST_IP": "fd00::9"}) == (
        "fd00::9"
    )


def test_env_list_value_gives_its_first_address() -> None:
    """Kubernetes' POD_IPS (dual stack) is a comma-separated list, the primary first."""
    assert choose(env="POD_IPS", environ={"POD_IPS": "10.244.1.7,fd00::7"}) == "10.244.1.7"
    assert choose(env="POD_IP", environ={"POD_IP": " 10.244.1.7\n"}) == "10.244.1.7"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("pod-7.example", "not an IP address"),
        ("10.0.0.300", "not an IP address"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("::ffff:0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "zone"),
    ],
)
def test_env_value_that_is_not_an_address_to_advertise(value: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        choose(env="POD_IP", environ={"POD_IP": value})
    assert caught.value.field == "env"
    assert f"POD_IP={value!r}" in caught.value.reason
    assert why in caught.value.reason


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("::ffff:10.0.0.1", "10.0.0.1"),  # IPv4-mapped: the IPv4 address, not ::ffff:a00:1
        ("::FFFF:10.244.1.7,fd00::7", "10.244.1.7"),
        ("169.254.3.3", "169.254.3.3"),  # IPv4 link-local needs no zone
        ("127.0.0.1", "127.0.0.1"),  # given on purpose (a local test): kept
    ],
)
def test_env_values_kept_or_unwrapped(value: str, expected: str) -> None:
    assert choose(env="POD_IP", environ={"POD_IP": value}) == expected


def test_env_not_set_is_an_error_not_a_silent_default() -> None:
    with pytest.raises(ConfigError) as caught:
        choose(env=("POD_IP", "HOST_IP"), environ={"PATH": "/bin"})
    assert caught.value.field == "env"
    assert "POD_IP and HOST_IP are not set" in caught.value.reason


@pytest.mark.parametrize("env", [(), [""], "", [1]])
def test_bad_env_names(env: object) -> None:
    with pytest.raises(ConfigError) as caught:
        choose(env=env, environ={"POD_IP": "10.0.0.1"})  # type: ignore[arg-type]
    assert caught.value.field == "env"


def test_env_with_network_or_interface_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        choose(env="POD_IP", network="10.0.0.0/8", environ={"POD_IP": "10.0.0.1"})
    assert caught.value.field == "env"


def test_public_function_reads_the_given_environ() -> None:
    assert advertised_address(env="POD_IP", environ={"POD_IP": "10.244.0.3"}) == "10.244.0.3"


# -- the kernel's route tables ----------------------------------------------------------------

ROUTE_V4 = textwrap.dedent(
    """\
    Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
    eth0\t00000000\t010200C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
    eth1\t00000000\t0100010A\t0003\t0\t0\t100\t00000000\t0\t0\t0
    eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
    eth1\t0000010A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
    lo\t00000000\t00000000\t0201\t0\t0\t0\t00000000\t0\t0\t0
    """
)

ROUTE_V6 = textwrap.dedent(
    """\
    fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
    00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0
    00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000004 00000000 80200001       lo
    00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
    """  # noqa: E501
)


def test_route_v4_defaults_by_metric_and_other_networks() -> None:
    defaults, others = parse_route_v4(ROUTE_V4)
    assert defaults == ["eth1", "eth0"]  # the lowest metric first; the reject route left out
    assert sorted(map(str, others)) == ["10.1.0.0/16", "192.0.2.0/24"]


def test_route_v6_leaves_out_the_unreachable_default_on_lo() -> None:
    defaults, others = parse_route_v6(ROUTE_V6)
    assert defaults == ["eth0"]
    assert sorted(map(str, others)) == ["::1/128", "fd00::/64"]


def test_no_default_route_in_the_tables() -> None:
    header = ROUTE_V4.splitlines()[0]
    assert (
        parse_route_v4(header + "\neth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0")[0]
        == []
    )
    assert parse_route_v6(ROUTE_V6.splitlines()[3])[0] == []
    assert parse_route_v4("garbage\nnot a route\n") == ([], [])


def test_the_probe_skips_documentation_networks_another_route_covers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A host on 192.0.2.0/24 (this one's own test network): the route lookup must go
    to a documentation address only the default route covers, else it would answer
    that network's route and its address."""
    asked: list[str] = []

    def source(target: str) -> str:
        asked.append(target)
        return "10.1.0.10"

    monkeypatch.setattr(address_module, "_source_towards", source)
    monkeypatch.setattr(address_module, "_ROUTE_TABLES", {4: tmp_path / "route"})
    (tmp_path / "route").write_text(ROUTE_V4)
    assert address_module.default_route(4) == Route("eth1", "10.1.0.10")
    assert asked == ["198.51.100.1"]


SPLIT_DEFAULT_V4 = (
    ROUTE_V4.splitlines()[0]
    + "\neth1\t00000000\t0100010A\t0003\t0\t0\t0\t00000080\t0\t0\t0"  # 0.0.0.0/1
    + "\neth1\t00000080\t0100010A\t0003\t0\t0\t0\t00000080\t0\t0\t0"  # 128.0.0.0/1
    + "\neth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0"  # 192.0.2.0/24
    + "\n*\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0"  # blackhole default
)


@pytest.mark.parametrize(
    ("table", "answer", "expected"),
    [
        # A split default (VPN): its wide halves do not hide the probes; the network's
        # own route does; the blackhole default (device "*") is no default.
        (SPLIT_DEFAULT_V4, "10.1.0.10", Route("", "10.1.0.10")),
        # No route in the main table at all (a policy rule's table has the default).
        (ROUTE_V4.splitlines()[0], "10.1.0.10", Route("", "10.1.0.10")),
        # A link-local source is answered too: the choice looks at its interface.
        (SPLIT_DEFAULT_V4, "169.254.1.1", Route("", "169.254.1.1")),
        # The kernel finds no route either.
        (SPLIT_DEFAULT_V4, "", None),
    ],
    ids=["split-default", "policy-routing", "link-local-source", "no-route"],
)
def test_without_a_default_in_the_main_table_the_kernel_is_still_asked(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    table: str,
    answer: str,
    expected: Route | None,
) -> None:
    asked: list[str] = []

    def source(target: str) -> str:
        asked.append(target)
        return answer

    monkeypatch.setattr(address_module, "_source_towards", source)
    monkeypatch.setattr(address_module, "_ROUTE_TABLES", {4: tmp_path / "route"})
    (tmp_path / "route").write_text(table)
    assert address_module.default_route(4) == expected
    assert asked == ["198.51.100.1" if "000200C0" in table else "192.0.2.1"]


def test_a_blackhole_default_is_no_default() -> None:
    assert parse_route_v4(SPLIT_DEFAULT_V4)[0] == []


def test_no_table_and_no_route_on_other_platforms(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(address_module, "_ROUTE_TABLES", {6: tmp_path / "absent"})
    monkeypatch.setattr(address_module, "_source_towards", lambda target: "")
    assert address_module.default_route(6) is None
    monkeypatch.setattr(address_module, "_source_towards", lambda target: "fd00::5")
    assert address_module.default_route(6) == Route("", "fd00::5")


# -- ServiceInstance and the agent's [[service]] ----------------------------------------------


def facts(
    monkeypatch: pytest.MonkeyPatch,
    routes: Routes = Routes(),  # noqa: B008
    interfaces: Mapping[str, Sequence[str]] = HOST,
) -> None:
    monkeypatch.setattr(address_module, "default_route", routes)
    monkeypatch.setattr(address_module, "host_interfaces", lambda: interfaces)


def test_instance_address_defaults_to_the_route_and_id_follows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    facts(monkeypatch, Routes(v6=Route("eth1", "fd00:1::10")))
    instance = ServiceInstance("orders", port=8080)
    assert instance.address == "fd00:1::10"
    assert instance.id == "orders-fd00_1__10-8080"


def test_instance_without_a_route_raises_naming_address(monkeypatch: pytest.MonkeyPatch) -> None:
    facts(monkeypatch)
    with pytest.raises(ConfigError) as caught:
        ServiceInstance("orders", port=8080)
    assert caught.value.field == "address"
    # A literal needs no route.
    assert ServiceInstance("orders", address="10.0.0.5", port=8080).address == "10.0.0.5"


def agent(service: Mapping[str, object], env: Mapping[str, str] | None = None) -> str:
    data = {
        "backend": {"url": "memory://address-test"},
        "service": [{"name": "orders", "port": 8080, **service}],
    }
    config = parse_config(data, source="agent.toml", env=env or {})
    return config.services[0].instance.address


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ({"address": "10.0.0.5"}, "10.0.0.5"),
        ({"address": "orders.internal"}, "orders.internal"),
        ({"address_network": "10.0.0.0/8"}, "10.1.0.10"),
        ({"address_network": "fd00::/8"}, "fd00:1::10"),
        ({"address_interface": "eth0"}, "192.0.2.10"),
        ({"address_interface": "eth1", "address_network": "10.1.0.11/32"}, "10.1.0.11"),
        ({"address_env": "POD_IP"}, "10.244.0.9"),
        ({"address_env": ["NOT_SET", "HOST_IP"]}, "10.9.0.1"),
        ({}, "10.1.0.10"),
    ],
)
def test_agent_service_address_keys(
    monkeypatch: pytest.MonkeyPatch, service: Mapping[str, object], expected: str
) -> None:
    facts(monkeypatch, Routes(v4=Route("eth1", "10.1.0.10")))
    env = {"POD_IP": "10.244.0.9", "HOST_IP": "10.9.0.1"}
    assert agent(service, env) == expected


@pytest.mark.parametrize(
    ("service", "field", "says"),
    [
        ({}, "service[0].address", 'address_network = "10.0.0.0/8"'),
        ({"address_network": "172.16.0.0/12"}, "service[0].address_network", "inside"),
        ({"address_network": "ten"}, "service[0].address_network", "CIDR"),
        ({"address_network": 10}, "service[0].address_network", "expected a string"),
        ({"address_interface": "eth9"}, "service[0].address_interface", "no interface"),
        ({"address_env": "POD_IP"}, "service[0].address_env", "POD_IP is not set"),
        ({"address_env": []}, "service[0].address_env", "variable name"),
        (
            {"address_env": "POD_IP", "address_interface": "eth0"},
            "service[0].address_env",
            "give env alone",
        ),
        (
            {"address": "10.0.0.5", "address_interface": "eth0"},
            "service[0].address_interface",
            "give address or address_interface, not both",
        ),
        ({"address_netwrok": "10.0.0.0/8"}, "service[0].address_netwrok", "unknown key"),
    ],
)
def test_agent_address_errors_name_the_key_and_the_file(
    monkeypatch: pytest.MonkeyPatch, service: Mapping[str, object], field: str, says: str
) -> None:
    facts(monkeypatch)  # no default route
    with pytest.raises(ConfigError) as caught:
        agent(service)
    assert caught.value.field == field
    assert caught.value.source == "agent.toml"
    assert says in caught.value.reason
    if field == "service[0].address":
        # The agent's words, not the library's keyword arguments.
        assert "address_env" in caught.value.reason
        assert "interface=" not in caught.value.reason


def test_agent_file_with_address_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    facts(monkeypatch)
    path = tmp_path / "agent.toml"
    path.write_text(
        textwrap.dedent(
            """\
            [backend]
            url = "memory://address-file"

            [[service]]
            name = "orders"
            port = 8080
            address_network = "10.0.0.0/8"
            """
        )
    )
    (service,) = load_config(path, env={}).services
    assert service.instance.address == "10.1.0.10"
    assert service.instance.id == "orders-10.1.0.10-8080"
    path.write_text(path.read_text().replace('"10.0.0.0/8"', '"172.16.0.0/12"'))
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(f"{path}: service[0].address_network: ")
