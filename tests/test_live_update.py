"""Live updates (``registrar.update``) and integer weights: the pure parts and the memory backend.

The same behaviour on real Consul and etcd: integration/test_live_update.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from registry_agent_consul._backend import ConsulBackend
from registry_agent_consul._flavors import read_instance, read_written, write_entry

from registry_agent import (
    AsyncRegistrar,
    AsyncWatcher,
    CallableCheck,
    ConfigError,
    GateState,
    HealthStatus,
    InstanceHealth,
    Lease,
    Registrar,
    RegistrarEvent,
    RegistrarEventKind,
    Rejected,
    RetryPolicy,
    ServiceInstance,
    WatchEvent,
)
from registry_agent._agent.config import load_config
from registry_agent._agent.runtime import AgentRuntime, open_configured_backend, updates_in_place
from registry_agent._health.gate import Desired
from registry_agent._options import RegistrationOptions
from registry_agent._reconcile import Step, next_step
from registry_agent._registrar import updated_instance
from registry_agent._registration import Registration
from registry_agent._select import weight_of
from registry_agent.testing.memory import MemoryBackend, MemoryRegistry, SharedMemoryBackend

FAST = RetryPolicy(initial=0.05, cap=0.2)
INSTANCE = ServiceInstance("orders", address="127.0.0.1", port=8080, tags=("v1",), meta={"a": "1"})
K = RegistrarEventKind


async def eventually(predicate: Callable[[], bool], *, within: float) -> float:
    """Poll ``predicate`` every 20 ms until true; the seconds it took (fails after ``within``)."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < within, f"not true within {within}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


# -- weights ------------------------------------------------------------------------------


def test_an_integer_weight_is_kept_as_its_text() -> None:
    instance = ServiceInstance("orders", address="127.0.0.1", port=1, meta={"weight": 3})  # type: ignore[dict-item]
    assert instance.meta == {"weight": "3"}
    assert weight_of(instance) == 3
    assert instance == ServiceInstance("orders", address="127.0.0.1", port=1, meta={"weight": "3"})
    zero = ServiceInstance("orders", address="127.0.0.1", port=1, meta={"weight": 0})  # type: ignore[dict-item]
    assert zero.meta["weight"] == "0"


@pytest.mark.parametrize("bad", [True, False, -1, 2.5, None])
def test_a_bad_weight_names_meta_weight(bad: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        ServiceInstance("orders", address="127.0.0.1", port=1, meta={"weight": bad})
    assert caught.value.field == "meta.weight"


def test_update_values_replace_whole_and_weight_goes_into_meta() -> None:
    new = updated_instance(INSTANCE, weight=5)
    assert (new.tags, dict(new.meta)) == (("v1",), {"a": "1", "weight": "5"})
    new = updated_instance(new, meta={"b": "2"})  # meta replaces: the weight with it
    assert dict(new.meta) == {"b": "2"}
    new = updated_instance(new, tags=["v2", "canary"], meta={"b": 2 and "2", "weight": 7})
    assert (new.tags, dict(new.meta)) == (("v2", "canary"), {"b": "2", "weight": "7"})
    assert (new.service, new.id, new.address, new.port) == (
        INSTANCE.service,
        INSTANCE.id,
        INSTANCE.address,
        INSTANCE.port,
    )
    for kwargs, where in (
        ({"weight": True}, "weight"),
        ({"weight": -2}, "weight"),
        ({"tags": "v2"}, "tags"),
        ({"tags": [1]}, "tags[0]"),
        ({"meta": ["a"]}, "meta"),
        ({"meta": {"x": 1}}, "meta.x"),
    ):
        with pytest.raises(ConfigError) as caught:
            updated_instance(INSTANCE, **kwargs)
        assert caught.value.field == where, kwargs


def test_consul_writes_native_weights_and_reads_a_peers() -> None:
    weighted = ServiceInstance("orders", address="127.0.0.1", port=1, meta={"weight": 4})  # type: ignore[dict-item]
    for flavor in ("registry-agent", "spring", "kratos", "go-micro"):
        payload = write_entry(weighted, flavor)
        assert payload["Weights"] == {"Passing": 4, "Warning": 1}, flavor
    # No weight, a weight 0 (Consul refuses Passing 0) or not a number (only an instance
    # read back, from_dict, can carry one): Consul's default.
    for meta in ({}, {"weight": "0"}, {"weight": "heavy"}):
        plain = ServiceInstance.from_dict(
            {"service": "orders", "address": "127.0.0.1", "port": 1, "meta": meta}
        )
        assert "Weights" not in write_entry(plain), meta
    # Ours reads back as itself (the meta already says the weight).
    assert read_written(write_entry(weighted)) == weighted
    # A peer's native weight, with no meta weight: the meta weight Discovery honours.
    common: dict[str, Any] = {
        "service": "orders",
        "id": "o1",
        "address": "10.0.0.1",
        "port": 80,
        "tags": (),
        "tagged_addresses": {},
    }
    peer = read_instance(**common, meta={}, weights={"Passing": 10, "Warning": 1})
    assert peer.meta == {"weight": "10"}
    assert weight_of(peer) == 10
    # Consul's default weight, garbage, or a meta weight that says otherwise: as is.
    assert read_instance(**common, meta={}, weights={"Passing": 1, "Warning": 1}).meta == {}
    assert read_instance(**common, meta={}, weights={"Passing": "x"}).meta == {}
    assert read_instance(**common, meta={}, weights=[3]).meta == {}
    said = read_instance(**common, meta={"weight": "2"}, weights={"Passing": 10})
    assert said.meta == {"weight": "2"}


def test_consul_refuses_a_weight_it_cannot_hold() -> None:
    # Consul's native weight is also the DNS SRV weight: 16 bits, 65535 at most (Consul
    # answers 400 to anything larger, on every write).
    backend = ConsulBackend.from_url("consul://127.0.0.1:1", {})
    top = ServiceInstance("orders", address="127.0.0.1", port=1, meta={"weight": 65535})  # type: ignore[dict-item]
    backend.validate(top)
    for weight in (65536, 2**31 - 1, 2**40):
        huge = ServiceInstance("orders", address="127.0.0.1", port=1, meta={"weight": weight})  # type: ignore[dict-item]
        with pytest.raises(Rejected, match=r"meta\.weight: Consul takes weights up to 65535"):
            backend.validate(huge)


def test_the_agent_and_load_registrars_refuse_a_weight_consul_cannot_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from registry_agent import load_registrars
    from registry_agent._cli import main

    path = tmp_path / "agent.toml"
    service = '[backend]\nurl = "consul://127.0.0.1:1"\n[[service]]\nname = "orders"\nport = 1\n'
    path.write_text(f'{service}address = "127.0.0.1"\nweight = 65536\n')
    with pytest.raises(ConfigError) as caught:
        load_registrars(path)
    assert caught.value.field == "service[0]"
    assert "meta.weight: Consul takes weights up to 65535, got 65536" in str(caught.value)
    assert str(path) in str(caught.value)
    assert main(["check", "-c", str(path)]) == 2
    said = capsys.readouterr().err
    assert f"{path}: service[0]: meta.weight: Consul takes weights up to 65535" in said, said
    path.write_text(f'{service}address = "127.0.0.1"\nweight = 65535\n')
    (registrar,) = load_registrars(path)
    assert registrar.instance.meta["weight"] == "65535"


@pytest.mark.parametrize("bad", ["-1", "abc", " 3", "3 ", "3.0", "", "+3", "\u0663"])
def test_a_text_weight_that_is_not_a_whole_number_names_meta_weight(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ServiceInstance("orders", address="127.0.0.1", port=1, meta={"weight": bad})
    assert caught.value.field == "meta.weight"
    assert (
        ServiceInstance("orders", address="127.0.0.1", port=1, meta={"weight": "07"}).meta["weight"]
        == "07"
    )
    with pytest.raises(ConfigError) as caught:
        updated_instance(INSTANCE, meta={"weight": bad})
    assert caught.value.field == "meta.weight"


def test_an_agent_meta_weight_that_is_not_a_whole_number_names_the_field(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.toml"
    for given in ('"-5"', '"abc"', "-5", '"3.0"'):
        path.write_text(
            '[backend]\nurl = "consul://127.0.0.1:1"\n[[service]]\nname = "orders"\n'
            f'port = 1\naddress = "127.0.0.1"\nmeta = {{ weight = {given} }}\n'
        )
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert caught.value.field == "service[0].meta.weight", given


@pytest.mark.parametrize("odd", ["-1", "abc", " 3", "3.0"])
def test_a_peers_text_weight_is_read_as_it_is(odd: str) -> None:
    # What another tool (or an older release) wrote is read, never refused (weighted
    # choice reads it leniently: weight_of).
    data = {"service": "orders", "address": "127.0.0.1", "port": 1, "meta": {"weight": odd}}
    read = ServiceInstance.from_dict(data)
    assert dict(read.meta) == {"weight": odd}
    assert read.to_dict()["meta"] == {"weight": odd}
    common: dict[str, Any] = {"service": "orders", "id": "o1", "address": "10.0.0.1", "port": 80}
    assert ServiceInstance.from_registry(**common, meta={"weight": odd}).meta == {"weight": odd}
    consul = read_instance(**common, tags=(), tagged_addresses={}, meta={"weight": odd})
    assert consul.meta == {"weight": odd}
    # from_dict checks the rest as the constructor does.
    with pytest.raises(ConfigError) as caught:
        ServiceInstance.from_dict({**data, "port": 0})
    assert caught.value.field == "port"
    with pytest.raises(ConfigError) as caught:
        ServiceInstance.from_dict({**data, "meta": {"weight": odd, "n": 3}})
    assert caught.value.field == "meta.n"


# -- the pure decisions ----------------------------------------------------------------------


def test_next_step_orders_the_rewrite() -> None:
    passing, critical = HealthStatus.PASSING, HealthStatus.CRITICAL
    at: dict[str, Any] = {"now": 10.0, "heartbeat_due": 5.0, "verify_due": 5.0}
    # Held as wanted, both a read-back and a heartbeat due: the rewrite first.
    assert next_step(Desired.PASSING, passing, rewrite=True, **at)[0] is Step.UPDATE
    # A wrong status is fixed first; no entry: registered (with the new values).
    assert next_step(Desired.PASSING, critical, rewrite=True, **at)[0] is Step.SET_STATUS
    assert next_step(Desired.PASSING, None, rewrite=True, **at)[0] is Step.REGISTER
    # Withdrawn: removed, not rewritten; expired: counted lost first.
    assert next_step(Desired.ABSENT, passing, rewrite=True, **at)[0] is Step.DEREGISTER
    expired = next_step(Desired.PASSING, passing, rewrite=True, expires_at=9.0, **at)
    assert expired[0] is Step.EXPIRED


def _held(reg: Registration, now: float) -> None:
    assert reg.next(Desired.PASSING, now) is Step.REGISTER
    lease = Lease(reg.writing, 10.0, 1, "memory")
    reg.succeeded(Step.REGISTER, now, lease)


def test_registration_rewrites_in_place_and_keeps_its_counters() -> None:
    options = RegistrationOptions.build({"ttl": 10.0})
    reg = Registration(options, INSTANCE, "memory")
    _held(reg, 0.0)
    assert reg.written == INSTANCE
    assert not reg.rewrite_due
    new = updated_instance(INSTANCE, tags=["v2"])
    reg.update(new)
    assert reg.rewrite_due
    assert reg.next(Desired.PASSING, 1.0) is Step.UPDATE
    assert reg.writing == new
    # A read-back that was in flight before the rewrite finds the old entry: ours, not lost.
    changes, _ = reg.succeeded(Step.VERIFY, 1.0, InstanceHealth(INSTANCE))
    assert changes == []
    assert reg.lease is not None
    assert reg.counters.lease_losses == 0
    changes, pause = reg.succeeded(Step.UPDATE, 1.0, Lease(new, 10.0, 1, "memory"))
    assert [(c.kind, c.detail) for c in changes] == [(K.UPDATED, "tags=[v2] meta={a=1}")]
    assert pause is None
    assert reg.written == new
    assert not reg.rewrite_due
    # Read back at once, and it matches the new values.
    assert reg.next(Desired.PASSING, 1.0) is Step.VERIFY
    changes, _ = reg.succeeded(Step.VERIFY, 1.0, InstanceHealth(new))
    assert changes == []
    assert (reg.counters.registrations, reg.counters.lease_losses) == (1, 0)
    # Someone else's values are still a change to repair.
    reg.next(Desired.PASSING, 100.0)
    changes, _ = reg.succeeded(Step.VERIFY, 100.0, InstanceHealth(INSTANCE))
    assert [c.kind for c in changes if hasattr(c, "kind")] == [K.LEASE_LOST]


def test_a_rewrite_that_fails_is_retried_and_one_that_finds_no_lease_registers() -> None:
    from registry_agent import BackendUnavailable, LeaseLost

    reg = Registration(RegistrationOptions.build({"ttl": 10.0, "retry": FAST}), INSTANCE, "memory")
    _held(reg, 0.0)
    new = updated_instance(INSTANCE, weight=2)
    reg.update(new)
    assert reg.next(Desired.PASSING, 1.0) is Step.UPDATE
    down = BackendUnavailable("down", backend="memory")
    changes, pause = reg.failed(Step.UPDATE, down, 1.0)
    assert [c.kind for c in changes if hasattr(c, "kind")] == [K.BACKEND_UNAVAILABLE]
    assert pause is not None
    assert pause > 0
    assert reg.rewrite_due
    assert reg.next(Desired.PASSING, 1.0 + pause) is Step.UPDATE  # the new values not lost
    _changes, _ = reg.failed(Step.UPDATE, LeaseLost("gone", backend="memory"), 2.0)
    assert reg.next(Desired.PASSING, 2.0) is Step.REGISTER
    assert reg.writing == new


# -- a registrar on the memory backend --------------------------------------------------------


@contextlib.asynccontextmanager
async def watching(backend: MemoryBackend) -> AsyncIterator[list[WatchEvent]]:
    events: list[WatchEvent] = []
    async with AsyncWatcher(backend, "orders", retry=FAST) as watcher:

        async def collect() -> None:
            async for event in watcher:
                events.append(event)

        task = asyncio.create_task(collect())
        try:
            yield events
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.mark.parametrize("shared", [False, True])
async def test_update_while_registered_is_one_updated_event(shared: bool) -> None:
    backend = SharedMemoryBackend(MemoryRegistry()) if shared else MemoryBackend(MemoryRegistry())
    seen: list[RegistrarEvent] = []
    registrar = AsyncRegistrar(
        backend, INSTANCE, ttl=1.0, retry=FAST, on_event=seen.append, shared_liveness=shared
    )
    async with watching(backend) as events:
        await registrar.start(wait_registered=5)
        await eventually(lambda: [e.type for e in events] == ["added"], within=5)
        before = registrar.counters.to_dict()
        started = time.monotonic()
        await registrar.update(tags=["v2"], meta={"zone": "eu"}, weight=3)
        await eventually(lambda: len(events) == 2, within=5)
        took = time.monotonic() - started
        await asyncio.sleep(1.5)  # a TTL more: heartbeats and read-backs see nothing to repair
        assert [e.type for e in events] == ["added", "updated"]
        assert events[1].instance.tags == ("v2",)
        assert events[1].instance.meta == {"zone": "eu", "weight": "3"}
        assert [e.kind for e in seen].count(K.UPDATED) == 1
        after = registrar.counters.to_dict()
        assert after["registrations"] == before["registrations"] == 1
        assert after["lease_losses"] == after["reregistrations"] == 0
        assert after["heartbeats_ok"] >= before["heartbeats_ok"]
        assert registrar.instance.tags == ("v2",)
        assert registrar.ready
        await registrar.stop()
    print(f"memory update seen by the watcher after {took * 1000:.1f} ms")


async def test_update_while_withdrawn_is_used_at_the_next_registration() -> None:
    backend = MemoryBackend(MemoryRegistry())
    healthy = True
    check = CallableCheck(lambda: healthy, name="app", interval=0.05)
    seen: list[RegistrarEvent] = []
    registrar = AsyncRegistrar(
        backend, INSTANCE, ttl=1.0, retry=FAST, checks=[check], rise=1, fall=1, on_event=seen.append
    )
    await registrar.start(wait_registered=5)
    healthy = False
    await eventually(lambda: registrar.state is GateState.WITHDRAWN, within=5)
    await eventually(lambda: not registrar.registered, within=5)
    await registrar.update(tags=["v3"])
    assert (await backend.list("orders")).instances == {}  # nothing written while withdrawn
    healthy = True
    await eventually(lambda: registrar.ready, within=5)
    entry = (await backend.list("orders")).instances[INSTANCE.id]
    assert entry.instance.tags == ("v3",)
    assert K.UPDATED not in [e.kind for e in seen]  # registered with it, not rewritten
    await registrar.stop()


async def test_update_before_start_and_rejected_values_raise_before_anything_is_sent() -> None:
    backend = MemoryBackend(MemoryRegistry())
    registrar = AsyncRegistrar(backend, INSTANCE, ttl=1.0, retry=FAST)
    await registrar.update(meta={"b": "2"})
    await registrar.start(wait_registered=5)
    assert (await backend.list("orders")).instances[INSTANCE.id].instance.meta == {"b": "2"}
    with pytest.raises(ConfigError) as caught:
        await registrar.update(weight=-1)
    assert caught.value.field == "weight"
    await registrar.stop()
    # A backend's own validation (Consul: no '.' in a meta key), without any I/O.
    consul = ConsulBackend.from_url("consul://127.0.0.1:1", {})
    on_consul = AsyncRegistrar(consul, INSTANCE, ttl=1.0)
    with pytest.raises(Rejected, match=r"meta\.a\.b"):
        await on_consul.update(meta={"a.b": "x"})
    assert on_consul.instance == INSTANCE
    await consul.close()


async def test_update_while_the_registry_is_down_is_applied_when_it_answers() -> None:
    class Flaky(MemoryBackend):
        down = False

        async def register(self, instance: ServiceInstance, **kwargs: Any) -> Lease:
            if self.down:
                from registry_agent import BackendUnavailable

                raise BackendUnavailable("down", backend="memory")
            return await super().register(instance, **kwargs)

    backend = Flaky(MemoryRegistry())
    registrar = AsyncRegistrar(backend, INSTANCE, ttl=5.0, retry=FAST)
    await registrar.start(wait_registered=5)
    backend.down = True
    await registrar.update(tags=["v9"])
    await asyncio.sleep(0.5)  # retried with backoff meanwhile
    assert registrar.status()["last_error"]
    assert (await backend.list("orders")).instances[INSTANCE.id].instance.tags == ("v1",)
    backend.down = False
    await eventually(
        lambda: backend.registry.snapshot("orders").instances[INSTANCE.id].instance.tags == ("v9",),
        within=5,
    )
    assert registrar.counters.lease_losses == 0
    await registrar.stop()


def test_blocking_registrar_update() -> None:
    backend = MemoryBackend(MemoryRegistry())
    registrar = Registrar(backend, INSTANCE, ttl=1.0, retry=FAST)
    registrar.update(weight=2)  # before start: no thread
    registrar.start(wait_registered=5)
    try:
        registrar.update(tags=["b"])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            entry = backend.registry.snapshot("orders").instances[INSTANCE.id].instance
            if entry.tags == ("b",):
                break
            time.sleep(0.02)
        assert entry.tags == ("b",)
        assert entry.meta == {"a": "1", "weight": "2"}
        with pytest.raises(ConfigError):
            registrar.update(weight=True)
    finally:
        registrar.stop()


# -- the agent's SIGHUP ----------------------------------------------------------------------


def _agent_file(path: Path, registry: str, extra: str, ttl: str = "10s") -> None:
    path.write_text(
        f'[backend]\nurl = "memory://{registry}"\n[status]\nlisten = "off"\n'
        f'[[service]]\nname = "orders"\naddress = "127.0.0.1"\nport = 80\nttl = "{ttl}"\n{extra}'
    )


def test_agent_config_takes_an_integer_weight(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    for extra, meta in (
        ("weight = 3\n", {"weight": "3"}),
        ('weight = "4"\nmeta = { zone = "eu" }\n', {"weight": "4", "zone": "eu"}),
        ('meta = { weight = 5, zone = "eu" }\n', {"weight": "5", "zone": "eu"}),
    ):
        _agent_file(path, "cfg", extra)
        assert load_config(path, env={}).services[0].instance.meta == meta, extra
    for extra, where in (
        ("weight = true\n", "service[0].weight"),
        ("weight = -1\n", "service[0].weight"),
        ('weight = "x"\n', "service[0].weight"),
        ("meta = { weight = -1 }\n", "service[0].meta.weight"),
        ('weight = 2\nmeta = { weight = "2" }\n', "service[0].weight"),
    ):
        _agent_file(path, "cfg", extra)
        with pytest.raises(ConfigError) as caught:
            load_config(path, env={})
        assert caught.value.field == where, extra


def test_what_a_reload_updates_in_place(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    _agent_file(path, "x", 'tags = ["a"]\n')
    old = load_config(path, env={}).services[0]
    for extra, in_place in (
        ('tags = ["b"]\n', True),
        ('tags = ["a"]\nmeta = { zone = "eu" }\n', True),
        ('tags = ["a"]\nweight = 3\n', True),
        ('tags = ["a"]\n', False),  # nothing changed: nothing to do
        ('tags = ["b"]\nversion = "2"\n', False),
        ('tags = ["b"]\non_unhealthy = "critical"\n', False),
        ('tags = ["b"]\n[[service.check]]\ntcp = "127.0.0.1:1"\n', False),
    ):
        _agent_file(path, "x", extra)
        new = load_config(path, env={}).services[0]
        assert updates_in_place(old, new) is in_place, extra
    _agent_file(path, "x", 'tags = ["b"]\n')
    text = path.read_text().replace("port = 80", "port = 81")
    path.write_text(text)
    assert updates_in_place(old, load_config(path, env={}).services[0]) is False


async def test_a_reload_that_changes_only_tags_keeps_the_registrar(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "agent.toml"
    _agent_file(path, "reload-live", 'tags = ["a"]\n', ttl="1s")
    runtime = AgentRuntime(load_config(path, env={}))
    runtime._turn = asyncio.Lock()
    runtime.backend = open_configured_backend(runtime.config)
    await runtime._start_service(runtime.config.services[0])
    ((_, registrar),) = runtime.registrars.values()
    assert await registrar.wait_registered(5)
    backend = runtime.backends[0]
    assert isinstance(backend, MemoryBackend)
    async with watching(backend) as events:
        await eventually(lambda: [e.type for e in events] == ["added"], within=5)
        await asyncio.sleep(0.7)  # a heartbeat or two to count
        before = registrar.counters.to_dict()
        _agent_file(path, "reload-live", 'tags = ["b"]\nweight = 2\n', ttl="1s")
        with caplog.at_level(logging.INFO, "registry_agent.agent"):
            await runtime.reload()
        took = await eventually(lambda: len(events) == 2, within=5)
        await asyncio.sleep(1.2)  # more than the TTL: no withdrawal, no loss
        ((_, still),) = runtime.registrars.values()
        assert still is registrar
        assert [e.type for e in events] == ["added", "updated"]
        assert events[1].instance.tags == ("b",)
        assert events[1].instance.meta == {"weight": "2"}
        after = registrar.counters.to_dict()
        assert after["registrations"] == before["registrations"] == 1
        assert after["heartbeats_ok"] > before["heartbeats_ok"]
        assert after["deregistrations"] == after["lease_losses"] == 0
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reloaded")]
        assert lines == ["reloaded: 0 added, 0 changed, 0 removed, 0 unchanged, 1 updated in place"]
        assert runtime.config.services[0].instance.tags == ("b",)
        # Then a change of identity-bound settings restarts it, as before.
        _agent_file(path, "reload-live", 'tags = ["b"]\nweight = 2\n', ttl="2s")
        await runtime.reload()
        ((_, restarted),) = runtime.registrars.values()
        assert restarted is not registrar
        await runtime.shutdown()
    print(f"agent reload: tags change seen by a watcher after {took * 1000:.1f} ms")
