"""Flask extension and Django app: settings, errors naming the key, no server no registration.

Serving behaviour (registration while a real server serves, shutdown order) is
proven against real Consul and etcd in integration/test_flask_server.py and
test_django_server.py; these tests use the in-memory registry only where no
real backend behaviour is asserted.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from flask import Flask

from registry_agent import ConfigError, ServiceInstance
from registry_agent.integrations._devserver import InFlight
from registry_agent.integrations.flask import RegistryAgent
from registry_agent.testing.memory import MemoryRegistry


def _app(**config: Any) -> Flask:
    app = Flask("orders")
    for key, value in config.items():
        app.config[f"REGISTRY_AGENT_{key}"] = value
    return app


@pytest.fixture
def registry() -> MemoryRegistry:
    return MemoryRegistry.named(f"flask-{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize(
    ("config", "kwargs", "message"),
    [
        ({}, {}, 'app.config["REGISTRY_AGENT_BACKEND"]: required'),
        (
            {"BACKEND": "memory://x", "PORT": "eighty"},
            {},
            "app.config[\"REGISTRY_AGENT_PORT\"]: expected an integer 1-65535, got 'eighty'",
        ),
        (
            {"BACKEND": "memory://x", "TTL": 0.1},
            {},
            'app.config["REGISTRY_AGENT_TTL"]: must be at least',
        ),
        (
            {"BACKEND": "memory://x", "COLOUR": "blue"},
            {},
            'app.config["REGISTRY_AGENT_COLOUR"]: unknown setting',
        ),
        ({"BACKEND": "memory://x"}, {"port": 0}, "RegistryAgent(port=…): expected an integer"),
        (
            {"BACKEND": "memory://x"},
            {"health_path": "healthz"},
            "RegistryAgent(health_path=…): expected a path starting with '/'",
        ),
        (
            {"BACKEND": "memory://x"},
            {"drain_delay": "soon"},
            'RegistryAgent(drain_delay=…): expected a duration like "2s"',
        ),
        ({"BACKEND": 8500}, {}, 'app.config["REGISTRY_AGENT_BACKEND"]: expected a registry URL'),
        (
            {"BACKEND": "nope://127.0.0.1"},
            {},
            "app.config[\"REGISTRY_AGENT_BACKEND\"]: no backend for scheme 'nope'",
        ),
        (
            {"BACKEND": "consul://127.0.0.1:8500?bogus=1"},
            {},
            "app.config[\"REGISTRY_AGENT_BACKEND\"]: unknown option(s) 'bogus' for consul://",
        ),
    ],
)
def test_flask_bad_settings_name_the_key(
    config: dict[str, Any], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        RegistryAgent(_app(**config), **kwargs)
    assert message in str(raised.value)


def test_flask_unknown_keyword_is_named() -> None:
    with pytest.raises(ConfigError, match=r"RegistryAgent\(colour=…\): unknown keyword"):
        RegistryAgent(colour="blue")


def test_flask_keywords_override_config_and_service_defaults_to_the_app_name() -> None:
    ext = RegistryAgent(_app(BACKEND="memory://x", PORT=8080, TAGS=["a"]), port=9090)
    assert ext.settings is not None
    instance = ext.settings.make_instance("0.0.0.0", 5000)
    assert (instance.service, instance.port, instance.tags) == ("orders", 9090, ("a",))
    # A server bound to every address: the default advertised address, not "0.0.0.0".
    assert instance.address != "0.0.0.0"
    assert ext.settings.make_instance("127.0.0.1", 5000).address == "127.0.0.1"


def test_flask_health_path_checks_the_served_port_on_loopback() -> None:
    ext = RegistryAgent(_app(BACKEND="memory://x"), health_path="/healthz")
    assert ext.settings is not None
    (check,) = ext.settings.checks_for("0.0.0.0", 5001)
    assert "http://127.0.0.1:5001/healthz" in check.name
    (check,) = ext.settings.checks_for("::", 5001)
    assert "http://[::1]:5001/healthz" in check.name


def test_flask_test_client_never_registers_but_start_does(registry: MemoryRegistry) -> None:
    app = _app(BACKEND=registry.url, SERVICE="orders", ADDRESS="127.0.0.1")
    app.add_url_rule("/", "index", lambda: "hi")
    ext = RegistryAgent(app)
    assert app.test_client().get("/").data == b"hi"
    assert ext.registrar is None
    assert registry.snapshot("orders").instances == {}

    with pytest.raises(ConfigError, match=r'REGISTRY_AGENT_PORT"\]: required'):
        ext.start()
    registrar = ext.start(port=8080, wait_registered=5)
    try:
        assert ext.registrar is registrar
        (health,) = registry.snapshot("orders").instances.values()
        assert health.instance == ServiceInstance("orders", address="127.0.0.1", port=8080)
    finally:
        ext.stop()
    assert registry.snapshot("orders").instances == {}
    assert ext.registrar is None


def test_flask_init_app_later() -> None:
    ext = RegistryAgent(service="orders")
    with pytest.raises(RuntimeError, match="init_app"):
        ext.start(port=1)
    app = _app(BACKEND="memory://x")
    ext.init_app(app)
    assert app.extensions["registry_agent"] is ext
    assert ext.settings is not None
    assert ext.settings.service == "orders"


def test_in_flight_counts_until_the_response_is_closed() -> None:
    closed: list[bool] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            return iter([b"a", b"b"])

        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        return Body()

    in_flight = InFlight()
    wrapped = in_flight.wrap(app)
    body = wrapped({}, lambda *a: None)
    assert in_flight.count == 1
    assert not in_flight.wait_idle(0.01)
    assert b"".join(body) == b"ab"
    body.close()  # type: ignore[attr-defined]
    body.close()  # type: ignore[attr-defined]  # twice: counted once
    assert (in_flight.count, closed) == (0, [True, True])
    assert in_flight.wait_idle(0.01)

    def failing(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        in_flight.wrap(failing)({}, lambda *a: None)
    assert in_flight.count == 0


@pytest.fixture
def django_settings() -> Any:
    from django.conf import settings

    if not settings.configured:
        settings.configure()
    return settings


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "settings.REGISTRY_AGENT: required"),
        ("consul://x", "settings.REGISTRY_AGENT: expected a dict"),
        ({"backend": "memory://x"}, 'settings.REGISTRY_AGENT["service"]: required'),
        (
            {"backend": "memory://x", "service": "orders", "port": "eighty"},
            "settings.REGISTRY_AGENT[\"port\"]: expected an integer 1-65535, got 'eighty'",
        ),
        (
            {"backend": "memory://x", "service": "orders", "checks": "http"},
            'settings.REGISTRY_AGENT["checks"]: expected a list of checks',
        ),
        (
            {"backend": "memory://x", "service": "orders", "rise": 0},
            'settings.REGISTRY_AGENT["rise"]: expected a whole number >= 1',
        ),
        (
            {"service": "orders"},
            'settings.REGISTRY_AGENT["backend"]: required',
        ),
    ],
)
def test_django_bad_settings_name_the_key(django_settings: Any, value: Any, message: str) -> None:
    from django.test import override_settings

    from registry_agent.integrations.django import _check_settings, load_settings

    with override_settings(REGISTRY_AGENT=value):
        if value is None:
            del django_settings.REGISTRY_AGENT
        with pytest.raises(ConfigError) as raised:
            load_settings()
        assert message in str(raised.value)
        (error,) = _check_settings()
        assert error.id == "registry_agent.E001"
        assert message in error.msg


def test_django_good_settings(django_settings: Any) -> None:
    from django.test import override_settings

    from registry_agent.integrations.django import _check_settings, asgi_app, load_settings

    value = {"backend": "memory://x", "service": "orders", "ttl": "6s", "tags": ["v1"]}
    with override_settings(REGISTRY_AGENT=value):
        assert _check_settings() == []
        settings = load_settings()
        assert settings.options.ttl == 6.0
        assert settings.make_instance("127.0.0.1", 8000).tags == ("v1",)
        with pytest.raises(ConfigError, match=r'REGISTRY_AGENT\["port"\]: required under an ASGI'):
            asgi_app(object())
