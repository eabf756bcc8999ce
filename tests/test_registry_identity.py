"""Which registry a backend writes to, and what may be listed as a backend.

Two lanes of one registrar writing one entry take it from each other forever
(lease lost, registered again, every few seconds): the same registry spelled
twice is refused by the backends' ``registry_identity``, in the registrar and in
the agent's ``[[backend]]`` tables. Anything but URLs and Backend objects is a
ConfigError naming ``backend`` or ``backend[i]``. Pure logic: opening a backend
does no I/O, so nothing here needs a server.
"""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_registrar import INSTANCE, loop_clock, virtual_time

from registry_agent import (
    AsyncDiscovery,
    AsyncRegistrar,
    AsyncWatcher,
    ConfigError,
    RegistrationTimeout,
    RetryPolicy,
    open_backend,
)
from registry_agent._agent.config import load_config
from registry_agent._agent.runtime import AgentRuntime
from registry_agent.backend import registry_address
from registry_agent.testing.memory import MemoryBackend, MemoryRegistry

C = "consul://127.0.0.1:8500"
E = "etcd://127.0.0.1:2379"


def identity(url: str) -> object:
    return open_backend(url).registry_identity  # type: ignore[attr-defined]


# -- registry_identity ------------------------------------------------------------


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (E, f"{E}?timeout=3s"),
        (E, "etcd://LOCALHOST:2379"),
        (E, "etcd://localhost.:2379?user=u&password=p"),
        ("etcd://h:2379?format=kratos", "etcd://h:2379?format=kratos&timeout=4"),
        ("etcd://a:1,b:2", "etcd://B:2,a:1"),
        ("etcd://[::1]:2379", "etcd://[0:0::1]:2379"),
        # Two formats under one prefix write the same keys.
        (f"{E}?format=kratos&prefix=/services", E),
        (C, f"{C}?token=abc"),
        (C, "consul://LocalHost:8500?timeout=3s"),
        (f"{C}?flavor=kratos", f"{C}?flavor=go-micro"),  # one service ID per agent
        (C, f"{C}?dc=other"),  # registration goes to the agent, whatever the dc
        ("memory://x", "memory://x?shared=true"),
    ],
)
def test_one_registry_spelled_two_ways_has_one_identity(one: str, other: str) -> None:
    assert identity(one) == identity(other)
    hash(identity(one))


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (E, f"{E}?format=kratos"),  # /services vs /microservices
        (E, f"{E}?prefix=/other"),
        (f"{E}?format=go-zero", f"{E}?format=go-micro"),
        (E, "etcd://127.0.0.1:2380"),
        (E, "etcd://[::1]:2379"),
        ("etcd://a:1,b:2", "etcd://a:1"),
        (C, "consul://127.0.0.1:8501"),
        (C, "consul://10.0.0.1:8500"),
        ("memory://x", "memory://y"),
    ],
)
def test_different_registries_have_different_identities(one: str, other: str) -> None:
    assert identity(one) != identity(other)


def test_unnamed_memory_registries_are_different_registries() -> None:
    one, other = MemoryBackend(), MemoryBackend()
    assert one.registry_identity != other.registry_identity
    assert MemoryBackend(one.registry).registry_identity == one.registry_identity


# -- the registrar refuses one registry twice ----------------------------------------


@pytest.mark.parametrize(
    ("backends", "why"),
    [
        (["etcd://h:2379?format=kratos", "etcd://h:2379?format=kratos&timeout=4"], "etcd h:2379"),
        ([E, f"{E}?timeout=3s"], "etcd 127.0.0.1:2379 /services/"),
        ([E, "etcd://LOCALHOST:2379"], "etcd 127.0.0.1:2379"),
        ([C, f"{C}?token=abc"], "consul 127.0.0.1:8500"),
        ([C, "consul://localhost:8500"], "consul 127.0.0.1:8500"),
        ([f"{C}?flavor=kratos", f"{C}?flavor=go-micro"], "consul 127.0.0.1:8500"),
        (["memory://x", "memory://x?shared=true"], "memory x"),
    ],
)
def test_the_same_registry_spelled_differently_is_refused(backends: list[str], why: str) -> None:
    with pytest.raises(ConfigError) as info:
        AsyncRegistrar(["memory://another-registry", *backends], INSTANCE)
    assert info.value.field == "backend[2]"
    text = str(info.value)
    assert text.startswith("backend[2]: the same registry as backend[1] (both write to "), text
    assert why in text
    assert "abc" not in text  # a token in the URL is never shown


@pytest.mark.parametrize(
    "backends",
    [
        [E, f"{E}?format=kratos"],
        [E, f"{E}?prefix=/other"],
        [f"{E}?format=go-zero", f"{E}?format=kratos", f"{E}?format=go-micro", E, C],
    ],
)
def test_different_key_roots_on_one_etcd_are_different_registries(backends: list[str]) -> None:
    reg = AsyncRegistrar(backends, INSTANCE)
    assert len(reg.backends) == len(backends)


class _ThirdParty(MemoryBackend):
    """A backend that does not say which registry it writes to (no registry_identity)."""

    registry_identity = None  # type: ignore[assignment]


def test_a_backend_without_identity_is_compared_by_object_or_url() -> None:
    registry = MemoryRegistry()
    one, other = _ThirdParty(registry), _ThirdParty(registry)
    assert len(AsyncRegistrar([one, other], INSTANCE).backends) == 2  # cannot tell: as before
    with pytest.raises(ConfigError, match=r"same registry as backend\[0\] \(the same object\)"):
        AsyncRegistrar([one, one], INSTANCE)


def test_an_object_and_a_url_of_one_registry_are_refused() -> None:
    name = f"identity-{uuid.uuid4().hex}"
    own = MemoryBackend(MemoryRegistry.named(name))
    with pytest.raises(ConfigError, match=r"backend\[1\]: the same registry as backend\[0\]"):
        AsyncRegistrar([own, f"memory://{name}"], INSTANCE)


# -- what may be listed as a backend ------------------------------------------------

NOT_BACKENDS: list[tuple[str, Callable[[], Any], str, str]] = [
    ("None item", lambda: [C, None], "backend[1]", "got None"),
    ("int item", lambda: [C, 5], "backend[1]", "got int 5"),
    ("nested list", lambda: [[C, E]], "backend[0]", "got list"),
    ("bytes item", lambda: [C, E.encode()], "backend[1]", "got bytes"),
    ("dict", lambda: {C: 1}, "backend", "got dict"),
    ("set", lambda: {C, E}, "backend", "got set"),
    ("generator", lambda: (u for u in [C, E]), "backend", "got generator"),
    ("bytes", lambda: b"consul://x:1", "backend", "got bytes"),
    # None alone is no longer refused: it means "from the environment" (tests/test_env_config.py).
    ("int", lambda: 5, "backend", "got int 5"),
    ("a class", lambda: MemoryBackend, "backend", "got the class MemoryBackend (give an instance)"),
    ("empty list", lambda: [], "backend", "got an empty list"),
]


def _registrar(backend: Any) -> object:
    return AsyncRegistrar(backend, INSTANCE)


def _watcher(backend: Any) -> object:
    return AsyncWatcher(backend, "orders")


def _discovery(backend: Any) -> object:
    return AsyncDiscovery(backend)


@pytest.mark.parametrize("make", [_registrar, _watcher, _discovery])
@pytest.mark.parametrize(("given", "field", "words"), [case[1:] for case in NOT_BACKENDS])
def test_what_is_not_a_backend_is_refused_naming_it(
    make: Callable[[Any], object], given: Callable[[], Any], field: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        make(given())
    assert info.value.field == field
    text = str(info.value)
    assert text.startswith(f"{field}: expected a backend URL (str) or Backend object"), text
    assert words in text


def test_a_tuple_of_urls_is_a_list_of_backends() -> None:
    assert len(AsyncRegistrar(("memory://t1", "memory://t2"), INSTANCE).backends) == 2
    assert len(AsyncWatcher(("memory://t1", "memory://t2"), "orders").backends) == 2


# -- watcher and discovery option errors name the backend ----------------------------


@pytest.mark.parametrize("make", [_registrar, _watcher, _discovery])
def test_an_option_error_names_the_backend_among_several(make: Callable[[Any], object]) -> None:
    with pytest.raises(ConfigError) as info:
        make([C, f"{E}?format=nope"])
    assert info.value.field == "backend[1]"
    assert str(info.value).startswith("backend[1]: format: expected one of"), str(info.value)
    with pytest.raises(ConfigError) as alone:
        make(f"{E}?format=nope")
    assert alone.value.field == "backend.format"  # one backend: as it always was


def test_watchers_still_take_one_registry_spelled_twice() -> None:
    # Harmless there: the merged view shows each instance once.
    watcher = AsyncWatcher([E, f"{E}?timeout=3s"], "orders")
    assert len(watcher.backends) == 2


# -- RegistrationTimeout: one context --------------------------------------------------


class _Alpha(MemoryBackend):
    scheme = "alpha"


@virtual_time
async def test_a_registration_timeout_carries_the_context_of_the_backend_it_is_about() -> None:
    up = MemoryRegistry.named(f"up-{uuid.uuid4().hex}", clock=loop_clock)
    down = MemoryRegistry.named(f"down-{uuid.uuid4().hex}", clock=loop_clock)
    down.stop()
    fast = RetryPolicy(initial=0.05, cap=0.2)
    reg = AsyncRegistrar([_Alpha(up), down.url], INSTANCE, ttl=1.0, retry=fast)
    with pytest.raises(RegistrationTimeout) as info:
        await reg.start(wait_registered=1.0)
    text = str(info.value)
    assert text.count("(backend=") == 1, text
    assert text.endswith(f"(backend=memory, service=orders, instance={INSTANCE.id})"), text
    assert "stopped" in text
    assert info.value.backend == "memory"

    alone = AsyncRegistrar(down.url, INSTANCE, ttl=1.0, retry=fast)
    with pytest.raises(RegistrationTimeout) as single:
        await alone.start(wait_registered=1.0)
    assert str(single.value).count("(backend=") == 1, str(single.value)


# -- the agent's [[backend]] tables ---------------------------------------------------

SERVICE = """
[[service]]
name = "orders"
port = 8080
"""


def agent_file(tmp_path: Path, backends: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(backends) + SERVICE)
    return path


@pytest.mark.parametrize(
    ("tables", "why"),
    [
        (
            """
            [[backend]]
            url = "etcd://h:2379"
            format = "kratos"
            [[backend]]
            url = "etcd://h:2379?format=kratos"
            """,
            "etcd h:2379 /microservices/",
        ),
        (
            """
            [[backend]]
            url = "consul://127.0.0.1:8500"
            flavor = "kratos"
            [[backend]]
            url = "consul://127.0.0.1:8500"
            flavor = "go-micro"
            """,
            "consul 127.0.0.1:8500",
        ),
        (
            """
            [[backend]]
            url = "consul://127.0.0.1:8500"
            [[backend]]
            url = "etcd://127.0.0.1:2379"
            [[backend]]
            url = "etcd://LOCALHOST:2379"
            timeout = "3s"
            """,
            "etcd 127.0.0.1:2379 /services/",
        ),
    ],
)
def test_agent_backend_tables_of_one_registry_are_refused_at_load(
    tmp_path: Path, tables: str, why: str
) -> None:
    path = agent_file(tmp_path, tables)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    text = str(info.value)
    last = tables.count("[[backend]]") - 1
    assert text.startswith(
        f"{path}: backend[{last}].url: the same registry as backend[{last - 1}] "
        f"(both write to {why})"
    ), text


def test_agent_status_names_two_registries_on_one_etcd_apart(tmp_path: Path) -> None:
    path = agent_file(
        tmp_path,
        """
        [[backend]]
        url = "etcd://127.0.0.1:2379"
        [[backend]]
        url = "etcd://127.0.0.1:2379"
        format = "kratos"
        """,
    )
    runtime = AgentRuntime(load_config(path, env={}))
    assert runtime.status()["agent"]["backends"] == [
        "etcd://127.0.0.1:2379 (backend[0])",
        "etcd://127.0.0.1:2379 (backend[1])",
    ]


@pytest.mark.parametrize("host", ["127.1", "0x7f000001", "2130706433", "[::ffff:127.0.0.1]"])
def test_ipv4_shorthands_and_mapped_addresses_are_the_loopback(host: str) -> None:
    assert registry_address(host.strip("[]"), 8500) == "127.0.0.1:8500"
    with pytest.raises(ConfigError, match=r"backend\[1\].*the same registry as backend\[0\]"):
        AsyncRegistrar(["consul://127.0.0.1:8500", f"consul://{host}:8500"], INSTANCE)


def test_names_that_only_look_numeric_are_not_rewritten() -> None:
    assert registry_address("example.com", 80) == "example.com:80"
    assert registry_address("1.2.3.4.5", 80) == "1.2.3.4.5:80"
