"""The advertised address on real test hosts: network namespaces with several interfaces.

Each test builds a host namespace whose interfaces (``eth0``, ``eth1``) are veth
pairs to a second namespace (the "switch"); nothing is created in this machine's
own namespace, so the addresses (documentation and private ranges) and routes
exist only between the two. Python then runs inside the host
(``ip netns exec``) and asks :func:`registry_agent.advertised_address`, which
reads that namespace's own route table and interfaces. Both namespaces are
deleted whatever happens. Needs root and iproute2 (skipped elsewhere, failed in CI).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from integration.netns import require_netns
from integration.readme_kit import readme_block

ROOT = Path(__file__).resolve().parent.parent

# Runs inside the host namespace: one choice, answered as JSON (an error by its field).
_ASK = textwrap.dedent(
    """\
    import json, sys
    from pathlib import Path
    from registry_agent import ConfigError, ServiceInstance, advertised_address
    from registry_agent._agent.config import load_config

    request = json.loads(sys.argv[1])
    links = request.get("count", [])
    def sent():
        return {n: int(Path(f"/sys/class/net/{n}/statistics/tx_packets").read_text())
                for n in links}
    before = sent()
    try:
        if request.get("instance"):
            instance = ServiceInstance("orders", port=8080)
            answer = {"address": instance.address, "id": instance.id}
        elif request.get("agent"):
            (service,) = load_config(request["agent"]).services
            answer = {"address": service.instance.address}
        else:
            answer = {"address": advertised_address(**request.get("choose", {}))}
    except ConfigError as exc:
        answer = {"field": exc.field, "reason": exc.reason, "source": exc.source}
    answer["sent"] = {n: count - before[n] for n, count in sent().items()}
    print(json.dumps(answer))
    """
)


def _ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


class NetHost:
    """A host namespace wired to a switch namespace by one veth pair per interface."""

    def __init__(self, *, ipv6: bool) -> None:
        tag = os.urandom(3).hex()
        self.netns = f"ra{tag}-addr-host"
        self.switch = f"ra{tag}-addr-sw"
        self._made: list[str] = []
        for name in (self.netns, self.switch):
            _ip("netns", "add", name)
            self._made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
            if not ipv6:
                # No IPv6 on the links: nothing is sent unasked (no DAD, MLD or router
                # solicitations), so the packet counters can prove the choice sends none.
                for scope in ("all", "default"):
                    self.sysctl(name, f"net/ipv6/conf/{scope}/disable_ipv6", "1")

    @staticmethod
    def sysctl(netns: str, name: str, value: str) -> None:
        _ip("netns", "exec", netns, "sh", "-c", f"echo {value} > /proc/sys/{name}")

    def link(self, name: str, *addresses: str) -> None:
        """Interface ``name`` on the host with ``addresses`` (CIDR), its peer on the switch."""
        peer = f"sw-{name}"
        _ip("-n", self.netns, "link", "add", name, "type", "veth", "peer", "name", peer,
            "netns", self.switch)  # fmt: skip
        for address in addresses:
            extra = ["nodad"] if ":" in address else []
            _ip("-n", self.netns, "addr", "add", address, "dev", name, *extra)
        _ip("-n", self.netns, "link", "set", name, "up")
        _ip("-n", self.switch, "link", "set", peer, "up")

    def route(self, *args: str) -> None:
        """``ip route add args`` on the host (``-6`` first for IPv6)."""
        family = [args[0]] if args[0] == "-6" else []
        rest = args[len(family) :]
        _ip(*family, "-n", self.netns, "route", "add", *rest)

    def rule(self, *args: str) -> None:
        """``ip rule add args`` on the host (policy routing)."""
        _ip("-n", self.netns, "rule", "add", *args)

    def ask(self, environ: Mapping[str, str] | None = None, **request: Any) -> dict[str, Any]:
        """Run the choice in Python inside the host; its JSON answer."""
        env = {k: v for k, v in os.environ.items() if k not in ("POD_IP", "HOST_IP")}
        env.update(environ or {})
        started = time.monotonic()
        result = subprocess.run(
            ["ip", "netns", "exec", self.netns, sys.executable, "-c", _ASK,
             json.dumps(request)],
            capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        answer: dict[str, Any] = json.loads(result.stdout)
        answer["seconds"] = time.monotonic() - started
        return answer

    def close(self) -> None:
        for name in self._made:
            with contextlib.suppress(RuntimeError, OSError):
                _ip("netns", "del", name)


@contextlib.contextmanager
def host_lab(*, ipv6: bool = False) -> Iterator[NetHost]:
    require_netns()
    host = NetHost(ipv6=ipv6)
    try:
        yield host
    finally:
        host.close()
    assert not any(name in _ip("netns", "list") for name in (host.netns, host.switch)), (
        "a namespace was left behind"
    )


def two_networks(host: NetHost) -> None:
    """eth0 on 192.0.2.0/24 (the network of the first documentation probe: the
    route lookup must not take it for the default route), eth1 on 10.1.0.0/24."""
    host.link("eth0", "192.0.2.10/24")
    host.link("eth1", "10.1.0.10/24", "10.1.0.11/24")


def test_default_route_via_the_second_interface_picks_its_address() -> None:
    with host_lab() as host:
        two_networks(host)
        host.route("default", "via", "10.1.0.1", "dev", "eth1")
        answer = host.ask(count=["eth0", "eth1"])
        instance = host.ask(instance=True)
    print(f"\ndefault-route choice in the namespace: {answer['seconds']:.2f} s with start-up")
    assert answer["address"] == "10.1.0.10"
    assert answer["sent"] == {"eth0": 0, "eth1": 0}, "finding the address sent packets"
    assert (instance["address"], instance["id"]) == ("10.1.0.10", "orders-10.1.0.10-8080")


def test_the_default_route_with_the_lowest_metric_wins() -> None:
    with host_lab() as host:
        two_networks(host)
        host.route("default", "via", "10.1.0.1", "dev", "eth1", "metric", "200")
        host.route("default", "via", "192.0.2.1", "dev", "eth0", "metric", "100")
        assert host.ask()["address"] == "192.0.2.10"


def test_by_network_and_by_interface_pick_the_right_one() -> None:
    with host_lab() as host:
        two_networks(host)
        host.route("default", "via", "10.1.0.1", "dev", "eth1")
        assert host.ask(choose={"network": "192.0.2.0/24"})["address"] == "192.0.2.10"
        assert host.ask(choose={"network": "10.1.0.11/32"})["address"] == "10.1.0.11"
        assert host.ask(choose={"interface": "eth0"})["address"] == "192.0.2.10"
        assert host.ask(choose={"interface": "eth1"})["address"] == "10.1.0.10"
        missing = host.ask(choose={"network": "172.16.0.0/12"})
        assert missing["field"] == "network"
        assert "eth0 192.0.2.10" in missing["reason"]
        assert "eth1 10.1.0.10, 10.1.0.11" in missing["reason"]
        unknown = host.ask(choose={"interface": "eth7"})
        assert unknown["field"] == "interface"


def test_no_default_route_is_a_config_error_naming_address() -> None:
    with host_lab() as host:
        two_networks(host)
        answer = host.ask()
        instance = host.ask(instance=True)
        # A choice does not need the route.
        assert host.ask(choose={"interface": "eth1"})["address"] == "10.1.0.10"
    assert answer["field"] == "address"
    assert "no default route" in answer["reason"]
    assert 'network="10.0.0.0/8"' in answer["reason"]
    assert 'env="POD_IP"' in answer["reason"]
    assert "eth1 10.1.0.10" in answer["reason"]
    assert instance["field"] == "address"


def test_a_default_route_only_in_a_policy_routing_table() -> None:
    """The main table has no default; a rule sends every lookup to table 100, which has
    one (as multi-homed hosts and some VPNs set it up). The kernel routes everywhere."""
    with host_lab() as host:
        two_networks(host)
        host.route("default", "via", "10.1.0.1", "dev", "eth1", "table", "100")
        host.rule("from", "all", "lookup", "100", "pref", "100")
        answer = host.ask(count=["eth0", "eth1"])
    assert answer["address"] == "10.1.0.10"
    assert answer["sent"] == {"eth0": 0, "eth1": 0}, "finding the address sent packets"


def test_a_split_default_route() -> None:
    """0.0.0.0/1 + 128.0.0.0/1 (OpenVPN's def1): no default route, yet routes
    everywhere; eth1's 169.254.x.x, listed first, is the kernel's source there."""
    with host_lab() as host:
        host.link("eth0", "192.0.2.10/24")
        host.link("eth1", "169.254.1.1/16", "10.1.0.10/24")
        host.route("0.0.0.0/1", "via", "10.1.0.1", "dev", "eth1")
        host.route("128.0.0.0/1", "via", "10.1.0.1", "dev", "eth1")
        answer = host.ask(count=["eth0", "eth1"])
    assert answer["address"] == "10.1.0.10"
    assert answer["sent"] == {"eth0": 0, "eth1": 0}, "finding the address sent packets"


def test_a_split_default_over_the_main_default_is_the_route_taken() -> None:
    """A VPN's split default beside the original default (OpenVPN def1 keeps it): the
    kernel sends everything by the split halves, so their address is the one."""
    with host_lab() as host:
        two_networks(host)
        host.route("default", "via", "192.0.2.1", "dev", "eth0")
        host.route("0.0.0.0/1", "via", "10.1.0.1", "dev", "eth1")
        host.route("128.0.0.0/1", "via", "10.1.0.1", "dev", "eth1")
        assert host.ask()["address"] == "10.1.0.10"


def test_ipv6_split_default_route() -> None:
    with host_lab(ipv6=True) as host:
        host.link("eth1", "fd00:1::10/64")
        host.route("-6", "::/1", "via", "fd00:1::1", "dev", "eth1")
        host.route("-6", "8000::/1", "via", "fd00:1::1", "dev", "eth1")
        assert host.ask()["address"] == "fd00:1::10"


def test_a_blackhole_default_is_no_default_route() -> None:
    with host_lab() as host:
        two_networks(host)
        host.route("blackhole", "default")
        answer = host.ask()
    assert answer["field"] == "address"
    assert "no default route" in answer["reason"]


def test_default_via_an_interface_without_ipv4_takes_the_kernel_s_source() -> None:
    """The default route leaves by eth0, which has no IPv4 address: Linux sends from an
    address of another interface (eth1's), and that is what is advertised, as a
    connection from this host would show it (the weak host model)."""
    with host_lab() as host:
        host.link("eth0")
        host.link("eth1", "10.1.0.10/24")
        host.route("default", "dev", "eth0")
        assert host.ask()["address"] == "10.1.0.10"


def test_interface_choice_prefers_its_routable_address_to_link_local() -> None:
    with host_lab() as host:
        host.link("eth0", "169.254.1.1/16", "192.168.7.7/24")
        host.link("eth1", "169.254.2.2/16")
        host.route("default", "via", "192.168.7.1", "dev", "eth0")
        both = host.ask(choose={"interface": "eth0"})
        only = host.ask(choose={"interface": "eth1"})
        default = host.ask()
    assert both["address"] == "192.168.7.7"
    assert only["address"] == "169.254.2.2"  # nothing else there: chosen on purpose
    assert default["address"] == "192.168.7.7"


def test_pod_ip_wins_when_asked() -> None:
    with host_lab() as host:
        two_networks(host)
        host.route("default", "via", "10.1.0.1", "dev", "eth1")
        environ = {"POD_IP": "10.244.3.7", "HOST_IP": "10.9.0.1"}
        assert host.ask(environ)["address"] == "10.1.0.10"  # not asked: the route's
        asked = host.ask(environ, choose={"env": ["POD_IP", "HOST_IP"]})
        assert asked["address"] == "10.244.3.7"
        fallback = host.ask({"HOST_IP": "10.9.0.1"}, choose={"env": ["POD_IP", "HOST_IP"]})
        assert fallback["address"] == "10.9.0.1"
        unset = host.ask(choose={"env": "POD_IP"})
        assert unset["field"] == "env"


def test_ipv6_only_when_there_is_only_an_ipv6_default_route() -> None:
    with host_lab(ipv6=True) as host:
        host.link("eth0", "192.0.2.10/24")
        host.link("eth1", "fd00:1::10/64")
        host.route("-6", "default", "via", "fd00:1::1", "dev", "eth1")
        only_v6 = host.ask()
        host.route("default", "via", "192.0.2.1", "dev", "eth0")
        both = host.ask()
        by_network = host.ask(choose={"network": "fd00::/8"})
    assert only_v6["address"] == "fd00:1::10"
    assert both["address"] == "192.0.2.10"
    assert by_network["address"] == "fd00:1::10"


AGENT_TOML = """\
[backend]
url = "memory://netns"

[[service]]
name = "orders"
port = 8080
"""


def test_agent_config_chooses_in_the_namespace(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    choices = {
        "": "10.1.0.10",
        'address_interface = "eth0"': "192.0.2.10",
        'address_network = "192.0.2.0/24"': "192.0.2.10",
        'address_env = ["POD_IP"]': "10.244.3.7",
    }
    answers = {}
    with host_lab() as host:
        two_networks(host)
        host.route("default", "via", "10.1.0.1", "dev", "eth1")
        for choice in choices:
            config.write_text(AGENT_TOML + choice + "\n")
            answers[choice] = host.ask({"POD_IP": "10.244.3.7"}, agent=str(config))["address"]
        config.write_text(AGENT_TOML + 'address_network = "172.16.0.0/12"\n')
        wrong = host.ask(agent=str(config))
    assert answers == choices
    assert (wrong["field"], wrong["source"]) == ("service[0].address_network", str(config))


# The README's example under "The advertised address", read from README.md.
README_ADDRESS = readme_block("readme:address")


def test_readme_example_in_a_namespace() -> None:
    with host_lab() as host:
        two_networks(host)
        host.route("default", "via", "192.0.2.1", "dev", "eth0")
        env = {k: v for k, v in os.environ.items() if k not in ("POD_IP", "HOST_IP")}
        result = subprocess.run(
            ["ip", "netns", "exec", host.netns, sys.executable, "-c", README_ADDRESS],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
            env={**env, "POD_IP": "10.244.3.7"},
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "192.0.2.10 orders-192.0.2.10-8080",
        "10.1.0.10",
        "10.1.0.10",
        "10.244.3.7",
    ]
