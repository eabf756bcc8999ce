"""Test hosts on one machine: network namespaces joined by bridges, made and removed by tests.

Each host is a network namespace with one veth per network it joins; each
network is a bridge in this namespace, which also gets an address on it, so
the test process reaches every host. Addresses are loopback ones
(127.X.Y.Z, with ``route_localnet`` on the bridges and inside the hosts): no
packet is meant for, or can reach, anything beyond this machine. Cutting a
host's link on a network drops everything it sends or receives there, as a
pulled cable; healing restores it. Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_LOCK = Path(tempfile.gettempdir()) / "registry-agent-netns.lock"


def _ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def _sysctl(netns: str | None, name: str) -> None:
    path = f"/proc/sys/{name.replace('.', '/')}"
    if netns is None:
        Path(path).write_text("1")
    else:
        _ip("netns", "exec", netns, "sh", "-c", f"echo 1 > {path}")


def unavailable_reason() -> str | None:
    """Why this machine cannot make test hosts, or None when it can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (the ip command)"
    probe = f"ra-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (RuntimeError, OSError) as exc:
        return f"cannot create a network namespace here: {exc}"
    with contextlib.suppress(RuntimeError, OSError):
        _ip("netns", "del", probe)
    return None


def require_netns() -> None:
    """Skip (with the reason) where namespaces cannot exist; in CI, fail instead."""
    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"partition tests must run in CI: {reason}")
    pytest.skip(reason)


@dataclass
class Host:
    """One test host: a namespace and its address on each network it joins."""

    name: str
    netns: str
    addresses: dict[str, str] = field(default_factory=dict)
    #: network -> the veth end in this namespace on that network's bridge.
    links: dict[str, str] = field(default_factory=dict)

    def address(self, network: str | None = None) -> str:
        """The host's address on ``network`` (its only one if omitted)."""
        if network is None:
            (only,) = self.addresses.values()
            return only
        return self.addresses[network]


class TestNet:
    """Bridges ("networks") and namespaces ("hosts") for one test; :meth:`close` removes all."""

    __test__ = False  # not a test class, despite the name

    def __init__(self) -> None:
        self._lock = open(_LOCK, "w")  # noqa: SIM115 - held for the net's lifetime
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            used = set(re.findall(r"inet 127\.(\d+)\.", _ip("-o", "addr", "show")))
            self._octet = next(str(n) for n in range(100, 250) if str(n) not in used)
            self.tag = os.urandom(2).hex()
        except BaseException:
            self._release()
            raise
        self.networks: dict[str, tuple[str, int]] = {}  # name -> (bridge, third octet)
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []

    def _release(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def network(self, name: str) -> str:
        """Create a network; returns this (test) process's address on it."""
        index = len(self.networks)
        bridge = f"rb{self.tag}{index}"
        _ip("link", "add", bridge, "type", "bridge")
        self.networks[name] = (bridge, index)
        _sysctl(None, f"net.ipv4.conf.{bridge}.route_localnet")
        address = f"127.{self._octet}.{index}.254"
        _ip("addr", "add", f"{address}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        # Our 127.<octet> block is now visible to other workers: they pick another.
        self._release()
        return address

    def host(self, name: str, *networks: str) -> Host:
        """Create a host joined to ``networks``."""
        number = len(self.hosts) + 1
        netns = f"ra{self.tag}-{name}"
        _ip("netns", "add", netns)
        self._namespaces.append(netns)
        _ip("-n", netns, "link", "set", "lo", "up")
        _sysctl(netns, "net.ipv4.conf.all.route_localnet")
        host = Host(name, netns)
        for network in networks:
            bridge, index = self.networks[network]
            outside, inside = f"rv{self.tag}{number}{index}", f"eth{index}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", netns)
            _ip("link", "set", outside, "master", bridge, "up")
            address = f"127.{self._octet}.{index}.{number}"
            _ip("-n", netns, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", netns, "link", "set", inside, "up")
            host.addresses[network] = address
            host.links[network] = outside
        self.hosts[name] = host
        return host

    def cut(self, host: Host, network: str | None = None) -> None:
        """Pull ``host``'s cable on ``network`` (every network if omitted)."""
        for name in [network] if network else list(host.links):
            _ip("link", "set", host.links[name], "down")

    def heal(self, host: Host, network: str | None = None) -> None:
        """Plug it back in."""
        for name in [network] if network else list(host.links):
            _ip("link", "set", host.links[name], "up")

    def command(self, host: Host, *argv: str) -> list[str]:
        """``argv`` run on ``host``."""
        return ["ip", "netns", "exec", host.netns, *argv]

    def close(self) -> None:
        """Remove every host and network (veths first: a namespace frees its own lazily)."""
        for host in self.hosts.values():
            for link in host.links.values():
                with contextlib.suppress(RuntimeError, OSError):
                    _ip("link", "del", link)
        for netns in self._namespaces:
            with contextlib.suppress(RuntimeError, OSError):
                _ip("netns", "del", netns)
        for bridge, _ in self.networks.values():
            with contextlib.suppress(RuntimeError, OSError):
                _ip("link", "del", bridge)
        self._release()


@contextlib.contextmanager
def netlab() -> Iterator[TestNet]:
    """A :class:`TestNet`, skipped (or failed in CI) where namespaces are impossible."""
    require_netns()
    net = TestNet()
    try:
        yield net
    finally:
        net.close()
