"""registry_lifespan and the uvicorn launcher: arguments, the lifespan's order, the signal hook.

The registry here is the in-memory backend (what is written, and when); the real
servers and a real uvicorn are in integration/test_starlette_uvicorn.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.applications import Starlette

from registry_agent import AsyncRegistrar, ConfigError, HttpCheck, ServiceInstance
from registry_agent.integrations import uvicorn as uvicorn_integration
from registry_agent.integrations.starlette import registry_lifespan, serving_check
from registry_agent.testing.memory import MemoryBackend, MemoryRegistry

INSTANCE = ServiceInstance("orders", address="127.0.0.1", port=8000, id="orders-1")


async def _ids(backend: MemoryBackend) -> list[str]:
    snapshot = await backend.list("orders")
    return [h.instance.id for h in snapshot.instances.values()]


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend(MemoryRegistry())


@pytest.fixture
def restore_signals() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"drain_delay": -1}, "drain_delay"),
        ({"drain_delay": "1s"}, "drain_delay"),
        ({"drain_delay": float("nan")}, "drain_delay"),
        ({"stop_timeout": 0}, "stop_timeout"),
        ({"wait_registered": -2}, "wait_registered"),
        ({"install_signal_handlers": True}, "install_signal_handlers"),
        ({"lifespan": "app_lifespan"}, "lifespan"),
        ({"ttl": "ten"}, "ttl"),
        ({"checks": HttpCheck("http://127.0.0.1:8000/", interval=1)}, "checks"),
        ({"checks": "http://127.0.0.1:8000/"}, "checks"),
        ({"drain": 1}, "drain"),
    ],
)
def test_bad_arguments_are_config_errors(
    backend: MemoryBackend, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        registry_lifespan(backend, INSTANCE, **kwargs)
    assert caught.value.field == field


def test_the_default_check_connects_to_the_instance() -> None:
    check = serving_check(INSTANCE, interval=0.5)
    assert (check.name, check.host, check.port, check.interval) == (
        "serving",
        "127.0.0.1",
        8000,
        0.5,
    )


async def test_lifespan_order_state_and_registrar(backend: MemoryBackend) -> None:
    order: list[str] = []

    @asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        order.append("app up")
        yield {"db": "connected"}
        order.append(f"app down, registered: {await _ids(backend)}")

    app = Starlette(lifespan=registry_lifespan(backend, INSTANCE, lifespan=app_lifespan, checks=()))
    async with app.router.lifespan_context(app) as state:
        assert state == {"db": "connected"}
        registrar = app.state.registrar
        assert isinstance(registrar, AsyncRegistrar)
        assert await registrar.wait_registered(5)
        assert await _ids(backend) == ["orders-1"]
    # The app's own lifespan ended after the instance had left.
    assert order == ["app up", "app down, registered: []"]
    assert str(registrar.state) == "stopped"


async def test_no_checks_given_waits_for_the_port(backend: MemoryBackend) -> None:
    """The default check: nothing listens on the port, so nothing is registered."""
    closed = ServiceInstance("orders", address="127.0.0.1", port=1, id="orders-1")
    app = SimpleNamespace(state=SimpleNamespace())
    async with registry_lifespan(backend, closed, rise=1)(app):
        await asyncio.sleep(1.5)
        assert await _ids(backend) == []
        assert app.state.registrar.status()["checks"]["serving"]["up"] is False


async def test_sigterm_withdraws_then_waits_then_hands_on(
    backend: MemoryBackend, restore_signals: None
) -> None:
    seen: list[tuple[str, float, list[str]]] = []

    def server_handler(sig: int, frame: Any) -> None:  # what uvicorn installs
        seen.append((signal.Signals(sig).name, time.monotonic(), []))

    signal.signal(signal.SIGTERM, server_handler)
    app = SimpleNamespace(state=SimpleNamespace())
    lifespan = registry_lifespan(backend, INSTANCE, checks=(), drain_delay=0.4)
    async with lifespan(app):
        registrar = app.state.registrar
        assert await registrar.wait_registered(5)
        assert signal.getsignal(signal.SIGTERM) is not server_handler  # hooked
        sent = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):
            if await _ids(backend) == []:
                break
            await asyncio.sleep(0.01)
        gone = time.monotonic()
        assert await _ids(backend) == []
        assert seen == []  # the server has not heard of it yet: drain_delay
        for _ in range(300):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert [name for name, _, _ in seen] == ["SIGTERM"]
        assert seen[0][1] - gone >= 0.35
        assert seen[0][1] - sent < 3.0
        # Handed on: the server's handler is back for any later signal.
        assert signal.getsignal(signal.SIGTERM) is server_handler


async def test_a_second_signal_goes_to_the_server_at_once(
    backend: MemoryBackend, restore_signals: None
) -> None:
    heard: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: heard.append(signal.Signals(s).name))
    app = SimpleNamespace(state=SimpleNamespace())
    async with registry_lifespan(backend, INSTANCE, checks=(), drain_delay=30)(app):
        assert await app.state.registrar.wait_registered(5)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.2)
        assert heard == []  # waiting out drain_delay
        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)  # impatient: skip the rest
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.01)
        assert heard == ["SIGINT"]
        assert time.monotonic() - started < 1.0
    # The lifespan's end does not wait out the 30 s either.
    assert time.monotonic() - started < 5.0
    assert heard == ["SIGINT"]


async def test_signals_the_loop_owns_are_left_to_the_server(
    backend: MemoryBackend, restore_signals: None
) -> None:
    """hypercorn's way (loop.add_signal_handler): its handler keeps the signal, and the
    instance is withdrawn at the lifespan's shutdown."""
    loop = asyncio.get_running_loop()
    heard: list[str] = []
    loop.add_signal_handler(signal.SIGTERM, heard.append, "server")
    try:
        app = SimpleNamespace(state=SimpleNamespace())
        async with registry_lifespan(backend, INSTANCE, checks=())(app):
            assert await app.state.registrar.wait_registered(5)
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):
                if heard:
                    break
                await asyncio.sleep(0.01)
            assert heard == ["server"]
            assert await _ids(backend) == ["orders-1"]  # still there: withdrawn below
        assert await _ids(backend) == []
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def test_handle_signals_false_leaves_them_alone(
    backend: MemoryBackend, restore_signals: None
) -> None:
    def handler(sig: int, frame: Any) -> None:
        pass

    signal.signal(signal.SIGTERM, handler)
    app = SimpleNamespace(state=SimpleNamespace())
    async with registry_lifespan(backend, INSTANCE, checks=(), handle_signals=False)(app):
        assert signal.getsignal(signal.SIGTERM) is handler
    assert await _ids(backend) == []


async def test_the_lifespan_runs_again_with_a_fresh_registrar(backend: MemoryBackend) -> None:
    lifespan = registry_lifespan(backend, INSTANCE, checks=())
    registrars = []
    for _ in range(2):
        app = SimpleNamespace(state=SimpleNamespace())
        async with lifespan(app):
            assert await app.state.registrar.wait_registered(5)
            registrars.append(app.state.registrar)
        assert await _ids(backend) == []
    assert registrars[0] is not registrars[1]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"app": object()}, "app"),
        ({"app": "no_colon"}, "app"),
        ({"workers": 0}, "workers"),
        ({"workers": True}, "workers"),
        ({"port": 70000}, "port"),
        ({"health_path": "health"}, "health_path"),
        ({"drain_delay": -0.5}, "drain_delay"),
        ({"install_signal_handlers": True}, "install_signal_handlers"),
        ({"uvicorn_options": {"port": 1}}, "uvicorn_options.port"),
        ({"uvicorn_options": {"reload": True}}, "uvicorn_options.reload"),
        ({"host": 127}, "host"),
        ({"checks": HttpCheck("http://127.0.0.1:8000/", interval=1)}, "checks"),
        ({"drain": 1}, "drain"),
    ],
)
def test_uvicorn_run_bad_arguments(
    backend: MemoryBackend, kwargs: dict[str, Any], field: str
) -> None:
    args: dict[str, Any] = {"app": "pkg.mod:app", **kwargs}
    app = args.pop("app")
    with pytest.raises(ConfigError) as caught:
        uvicorn_integration.run(app, backend, INSTANCE, **args)
    assert caught.value.field == field


@pytest.mark.parametrize("launcher", ["registry_lifespan", "run"])
def test_misuse_is_one_config_error(backend: MemoryBackend, launcher: str) -> None:
    """A name where the instance goes, a keyword that does not exist (every accepted
    keyword listed, the launcher's own included), no port at all."""

    def call(instance: Any, **kwargs: Any) -> None:
        if launcher == "run":
            uvicorn_integration.run("pkg.mod:app", backend, instance, **kwargs)
        else:
            registry_lifespan(backend, instance, **kwargs)

    with pytest.raises(ConfigError) as caught:
        call("orders")
    assert caught.value.field == "instance"
    with pytest.raises(ConfigError) as caught:
        call(INSTANCE, drain=1)
    listed = str(caught.value).split("expected one of ", 1)[1].split(", ")
    own = {"drain_delay", "stop_timeout"} | (
        {"health_path", "uvicorn_options", "workers"} if launcher == "run" else {"lifespan"}
    )
    assert {"checks", "ttl", "rise", "on_event", *own} <= set(listed), listed
    assert "install_signal_handlers" not in listed
    with pytest.raises(ConfigError) as caught:
        ServiceInstance("orders", address="127.0.0.1")
    assert str(caught.value) == "port: expected an integer 1-65535 (the port is required)"


async def test_answering_check_passes_on_any_http_answer() -> None:
    """A 404 is an answer (a worker serves); a server that says nothing is not."""
    replies = [b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", b""]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(replies.pop(0))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        check = uvicorn_integration.answering_check("0.0.0.0", port, path="/health")
        first = await check.run()
        second = await check.run()
        await check.aclose()
    assert first.ok, first
    assert "404" in first.detail
    assert not second.ok
