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

import click
import pytest
from click.testing import CliRunner
from flask import Flask

from registry_agent import (
    ConfigError,
    EnvBackendURL,
    HttpCheck,
    ServiceInstance,
    advertised_address,
)
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


_ENV_BACKEND_VARIABLES = ("REGISTRY_AGENT_BACKEND", "CONSUL_HTTP_ADDR", "ETCDCTL_ENDPOINTS")


@pytest.fixture(autouse=True)
def no_backend_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings alone, whatever the environment running the tests holds."""
    for variable in _ENV_BACKEND_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.parametrize(
    ("config", "kwargs", "message"),
    [
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


def test_flask_without_a_backend_serves_its_test_client_and_start_names_the_variables() -> None:
    """No backend anywhere: required only to register (12-factor: CI, build steps)."""
    app = _app(SERVICE="orders")
    app.add_url_rule("/", "index", lambda: "hi")
    ext = RegistryAgent(app, health_path="/healthz")
    assert ext.settings is not None
    assert ext.settings.backend is None
    assert app.test_client().get("/").data == b"hi"
    assert ext.registrar is None
    with pytest.raises(ConfigError) as raised:
        ext.start(port=8080)
    text = str(raised.value)
    assert text.startswith('app.config["REGISTRY_AGENT_BACKEND"]: required to register'), text
    for variable in _ENV_BACKEND_VARIABLES:
        assert variable in text
    assert ext.registrar is None
    # Given, but invalid: refused at once, as before.
    with pytest.raises(ConfigError, match=r"REGISTRY_AGENT_BACKEND\"\]: no backend for scheme"):
        RegistryAgent(_app(BACKEND="nope://x"))


def test_flask_backend_from_the_environment_carries_its_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:8501")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "s3cret-token")
    ext = RegistryAgent(_app())
    assert ext.settings is not None
    backend = ext.settings.backend
    # Passed through as backends_from_env gives it: the text safe to print, the token beside.
    assert isinstance(backend, EnvBackendURL)
    assert backend.startswith("consul://127.0.0.1:8501")
    assert "s3cret" not in backend
    assert backend.options == {"token": "s3cret-token"}
    # Several URLs: the list; the setting wins over the environment.
    monkeypatch.setenv("REGISTRY_AGENT_BACKEND", "memory://a memory://b")
    ext = RegistryAgent(_app())
    assert ext.settings is not None
    assert ext.settings.backend == ["memory://a", "memory://b"]
    ext = RegistryAgent(_app(BACKEND="memory://c"))
    assert ext.settings is not None
    assert ext.settings.backend == "memory://c"


def test_flask_a_bad_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:99999")
    with pytest.raises(ConfigError, match=r"^environment: CONSUL_HTTP_ADDR: expected a port"):
        RegistryAgent(_app())


def test_flask_bad_settings_under_a_click_command_are_a_click_error() -> None:
    """flask run shows it as one line, ``Error: …``, exit 2 (a ConfigError still)."""
    runner = CliRunner()

    @click.command()
    def serve() -> None:
        RegistryAgent(_app(BACKEND="memory://x"), health_path="healthz")

    result = runner.invoke(serve, [])
    assert result.exit_code == 2
    assert result.output == (
        "Error: RegistryAgent(health_path=…): expected a path starting with '/', "
        "e.g. '/healthz', got 'healthz'\n"
    )
    assert isinstance(result.exception, SystemExit)
    # Outside a click command: the plain ConfigError.
    with pytest.raises(ConfigError) as raised:
        RegistryAgent(_app(BACKEND="memory://x"), health_path="healthz")
    assert type(raised.value) is ConfigError


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
    assert isinstance(check, HttpCheck)
    assert "http://127.0.0.1:5001/healthz" in check.name
    (check,) = ext.settings.checks_for("::", 5001)
    assert isinstance(check, HttpCheck)
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
            {"service": "orders", "backend": "nope://x"},
            "settings.REGISTRY_AGENT[\"backend\"]: no backend for scheme 'nope'",
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


async def test_django_without_a_backend_checks_clean_and_asgi_startup_names_it(
    django_settings: Any,
) -> None:
    """No backend anywhere: no system check error (migrate, check run); required to serve."""
    from django.test import override_settings

    from registry_agent.integrations.django import _check_settings, asgi_app, load_settings

    expected = (
        'settings.REGISTRY_AGENT["backend"]: required to register: a registry URL such as '
        "'consul://127.0.0.1:8500' or a list of them; or, in the environment, "
        "REGISTRY_AGENT_BACKEND, or Consul's CONSUL_HTTP_ADDR, or etcd's ETCDCTL_ENDPOINTS "
        "(none is set)"
    )
    with override_settings(REGISTRY_AGENT={"service": "orders", "port": 8123}):
        assert _check_settings() == []
        settings = load_settings()
        assert settings.backend is None
        with pytest.raises(ConfigError) as raised:
            settings.require_backend()
        assert str(raised.value) == expected
        app = asgi_app(object())  # importing asgi.py does not fail
    received = [{"type": "lifespan.startup"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return received.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan"}, receive, send)
    assert sent == [{"type": "lifespan.startup.failed", "message": expected}]


def test_django_backend_from_the_environment(
    django_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.test import override_settings

    from registry_agent.integrations.django import _check_settings, load_settings

    monkeypatch.setenv("ETCDCTL_ENDPOINTS", "http://127.0.0.1:2379")
    monkeypatch.setenv("ETCDCTL_USER", "app:pa ss")
    with override_settings(REGISTRY_AGENT={"service": "orders"}):
        assert _check_settings() == []
        backend = load_settings().backend
        assert isinstance(backend, EnvBackendURL)
        assert backend.startswith("etcd://")
        assert "pa ss" not in backend
        assert backend.options.get("password") == "pa ss"
    monkeypatch.setenv("ETCDCTL_ENDPOINTS", "ftp://127.0.0.1:2379")
    with override_settings(REGISTRY_AGENT={"service": "orders"}):
        (error,) = _check_settings()
        assert error.id == "registry_agent.E001"
        assert error.msg.startswith("environment: ETCDCTL_ENDPOINTS: "), error.msg


def test_django_asgi_checks_probe_the_advertised_address(django_settings: Any) -> None:
    """uvicorn's bind host is unknown to the app: the check probes what is advertised."""
    from django.test import override_settings

    from registry_agent.integrations.django import _asgi_registration, load_settings

    value = {"backend": "memory://x", "service": "orders", "port": 8123}
    with override_settings(REGISTRY_AGENT={**value, "health_path": "/healthz"}):
        instance, (check,) = _asgi_registration(load_settings())
    assert instance.address == advertised_address()
    assert f"http://{instance.address}:8123/healthz" in check.name
    with override_settings(
        REGISTRY_AGENT={**value, "health_path": "/healthz", "address": "127.0.0.2"}
    ):
        instance, (check,) = _asgi_registration(load_settings())
    assert "http://127.0.0.2:8123/healthz" in check.name
    with override_settings(REGISTRY_AGENT=value):
        # No health_path: registry_lifespan's serving_check, on the advertised address too.
        assert _asgi_registration(load_settings())[1] == []
