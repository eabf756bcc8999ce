"""agent.toml: parsed once into frozen dataclasses; every error names the file and field.

Environment overrides (they win over the file): ``REGISTRY_AGENT_BACKEND``,
``REGISTRY_AGENT_TOKEN``, ``REGISTRY_AGENT_TOKEN_FILE``, ``REGISTRY_AGENT_USER``,
``REGISTRY_AGENT_PASSWORD``, ``REGISTRY_AGENT_PASSWORD_FILE``,
``REGISTRY_AGENT_STATUS_LISTEN``, ``REGISTRY_AGENT_STATUS_TOKEN``,
``REGISTRY_AGENT_STATUS_TOKEN_FILE``, ``REGISTRY_AGENT_LOG_FORMAT``,
``REGISTRY_AGENT_LOG_LEVEL``.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry_agent._errors import ConfigError
from registry_agent._health.checks import CommandCheck, HealthCheck, HttpCheck, TcpCheck
from registry_agent._health.gate import OnUnhealthy
from registry_agent._models import ServiceInstance
from registry_agent._registrar import HEARTBEAT_FLOOR, TTL_FLOOR
from registry_agent._urls import parse_backend_url, parse_duration, read_secret_file

__all__ = [
    "AgentConfig",
    "BackendConfig",
    "CheckConfig",
    "ServiceConfig",
    "load_config",
    "parse_config",
]

ENV_PREFIX = "REGISTRY_AGENT_"
_ENV_KEYS = {
    "BACKEND": ("backend", "url"),
    "TOKEN": ("backend", "token"),
    "TOKEN_FILE": ("backend", "token_file"),
    "USER": ("backend", "user"),
    "PASSWORD": ("backend", "password"),
    "PASSWORD_FILE": ("backend", "password_file"),
    "CA_FILE": ("backend", "ca_file"),
    "CERT_FILE": ("backend", "cert_file"),
    "KEY_FILE": ("backend", "key_file"),
    "STATUS_LISTEN": ("status", "listen"),
    "STATUS_TOKEN": ("status", "token"),
    "STATUS_TOKEN_FILE": ("status", "token_file"),
    "LOG_FORMAT": ("log", "format"),
    "LOG_LEVEL": ("log", "level"),
}
# Variables with our prefix that are not agent settings (tests, tools).
_ENV_OTHER = {"SERVERS_BIN", "SERVERS_DIR", "CONSUL_URL", "ETCD_URL"}
# Header values of HTTP checks that are credentials, masked like the backend's.
_SECRET_HEADER_WORDS = ("auth", "token", "key", "secret", "cookie", "password")


@dataclass(frozen=True)
class BackendConfig:
    """Where to register, and the credentials (never shown by repr)."""

    url: str
    #: None: the backend's own default (5s), or the URL's ``?timeout=``.
    timeout: float | None = None
    token: str | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    #: Digest of the TLS files' contents: a reload with rotated certificates reconnects.
    tls_digest: str = field(default="", repr=False)

    def options(self) -> dict[str, Any]:
        """Keyword options for ``open_backend``."""
        scheme = parse_backend_url(self.url, default_port=0).scheme
        options: dict[str, Any] = {}
        if self.timeout is not None:
            options["timeout"] = self.timeout
        if self.token is not None:
            options["token"] = self.token
        for name in ("ca_file", "cert_file", "key_file"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        if scheme == "etcd":
            if self.user is not None:
                options["user"] = self.user
            if self.password is not None:
                options["password"] = self.password
        return options

    def secrets(self) -> list[str]:
        """Values that must never be printed."""
        found = [s for s in (self.token, self.password) if s]
        url = parse_backend_url(self.url, default_port=0)
        found += [s for s in (url.password, url.query.get("token"), url.query.get("password")) if s]
        return found


@dataclass(frozen=True)
class CheckConfig:
    """One health check of a service."""

    kind: str  # http, tcp or command
    target: str | tuple[str, ...]
    interval: float = 5.0
    timeout: float = 2.0
    method: str = "GET"
    expect_status: tuple[int, int] = (200, 399)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    name: str | None = None
    #: Variables given to a command check (its only environment besides a safe few).
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    def secrets(self) -> list[str]:
        """Credentials this check carries: a URL's password, secret-looking header values."""
        found = [
            value
            for name, value in self.headers.items()
            if any(word in name.lower() for word in _SECRET_HEADER_WORDS)
        ]
        if self.kind == "http":
            userinfo = urllib.parse.urlsplit(str(self.target)).netloc.rpartition("@")[0]
            if userinfo:
                user, _, password = userinfo.partition(":")
                secret = password or user  # a lone user name is often a token
                found += [secret, urllib.parse.unquote(secret)]
        return [s for s in found if s]

    def build(self) -> HealthCheck:
        """The runnable check."""
        common: dict[str, Any] = {"interval": self.interval, "timeout": self.timeout}
        if self.name:
            common["name"] = self.name
        if self.kind == "http":
            low, high = self.expect_status
            return HttpCheck(
                str(self.target),
                method=self.method,
                expect_status=range(low, high + 1),
                headers=self.headers,
                **common,
            )
        if self.kind == "tcp":
            host, _, port = str(self.target).rpartition(":")
            return TcpCheck(host.strip("[]"), int(port), **common)
        if self.env:
            common["env"] = dict(self.env)
        return CommandCheck(list(self.target), **common)


@dataclass(frozen=True)
class ServiceConfig:
    """One service to register, with its checks and gate."""

    instance: ServiceInstance
    ttl: float = 10.0
    heartbeat: float | None = None
    on_unhealthy: OnUnhealthy = OnUnhealthy.DEREGISTER
    fall: int = 3
    rise: int = 2
    #: None: the backend's own setting (``consul://…?deregister_critical_after=5m``, else 60s).
    deregister_critical_after: float | None = None
    checks: tuple[CheckConfig, ...] = ()

    @property
    def key(self) -> str:
        """What identifies the service across reloads."""
        return f"{self.instance.service}/{self.instance.id}"


@dataclass(frozen=True)
class AgentConfig:
    """The whole agent.toml, checked."""

    source: str
    backend: BackendConfig
    services: tuple[ServiceConfig, ...]
    status_listen: tuple[str, int] | None = ("127.0.0.1", 9750)
    log_format: str = "text"
    log_level: str = "info"
    #: Bearer token the status server requires (all but /healthz), if any.
    status_token: str | None = field(default=None, repr=False)

    def secrets(self) -> list[str]:
        """Values that must never be printed."""
        found = self.backend.secrets()
        if self.status_token:
            found.append(self.status_token)
        for service in self.services:
            for check in service.checks:
                found += check.secrets()
        return found


class _Fields:
    """Reads one TOML table; remembers which keys were used so the rest are errors."""

    def __init__(self, table: Any, path: str, source: str) -> None:
        if not isinstance(table, dict):
            raise ConfigError(
                f"expected a table, got {_kind(table)}", field=path or None, source=source
            )
        self.table = table
        self.path = path
        self.source = source
        self.used: set[str] = set()

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, field=self.field(key), source=self.source)

    def get(self, key: str, convert: Callable[[Any, str], Any], default: Any = None) -> Any:
        self.used.add(key)
        if key not in self.table:
            return default
        return convert(self.table[key], self.field(key))

    def require(self, key: str, convert: Callable[[Any, str], Any]) -> Any:
        if key not in self.table:
            raise ConfigError("is required", field=self.field(key), source=self.source)
        return self.get(key, convert)

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(unknown)}; expected: {', '.join(sorted(self.used))}",
                field=self.path or None,
                source=self.source,
            )


def _kind(value: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _duration(value: Any, path: str) -> float:
    seconds = parse_duration(value, field=path)
    if seconds <= 0:
        raise ConfigError(f'expected a duration above zero like "2s", got {value!r}', field=path)
    return seconds


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {_kind(value)}", field=path)
    return value


def _int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"expected a whole number, got {value!r}", field=path)
    return value


def _str_list(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"expected a list of strings, got {value!r}", field=path)
    return tuple(value)


def _str_map(value: Any, path: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"expected a table of strings, got {_kind(value)}", field=path)
    for key, item in value.items():
        if not isinstance(item, str):
            raise ConfigError(f"expected a string, got {item!r}", field=f"{path}.{key}")
    return dict(value)


def _listen(value: Any, path: str) -> tuple[str, int] | None:
    text = _str(value, path)
    if text in ("", "off"):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ConfigError(
            f'expected "host:port" like "127.0.0.1:9750" or "off", got {text!r}', field=path
        )
    return host.strip("[]"), int(port)


def _choice(*choices: str) -> Callable[[Any, str], str]:
    def convert(value: Any, path: str) -> str:
        if value not in choices:
            raise ConfigError(f"expected one of {', '.join(choices)}, got {value!r}", field=path)
        return str(value)

    return convert


def _status_range(value: Any, path: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, str) and "-" in value:
        low, _, high = value.partition("-")
        if low.strip().isdigit() and high.strip().isdigit():
            return int(low), int(high)
    raise ConfigError(
        f'expected a status like 200 or a range like "200-399", got {value!r}', field=path
    )


def _read_secret_file(path_text: str, field: str, base: Path) -> str:
    path = Path(path_text)
    return read_secret_file(path if path.is_absolute() else base / path, field=field)


def _with_source(error: ConfigError, source: str) -> ConfigError:
    if error.source:
        return error
    return ConfigError(error.reason, field=error.field, source=source)


def parse_config(
    data: Mapping[str, Any],
    *,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    base: Path | None = None,
) -> AgentConfig:
    """Check a parsed TOML document (with ``env`` overrides) into an :class:`AgentConfig`."""
    try:
        return _parse(dict(data), source, os.environ if env is None else env, base or Path.cwd())
    except ConfigError as error:
        raise _with_source(error, source) from None


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    unknown = []
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :]
        if key in _ENV_KEYS:
            table, item = _ENV_KEYS[key]
            section = data.setdefault(table, {})
            if isinstance(section, dict):
                section[item] = value
                if item in ("token", "token_file"):
                    section.pop("token_file" if item == "token" else "token", None)
                if item in ("password", "password_file"):
                    section.pop("password_file" if item == "password" else "password", None)
                if table == "status" and item in ("token", "token_file"):
                    section.pop("token_file" if item == "token" else "token", None)
        elif key not in _ENV_OTHER:
            unknown.append(name)
    return unknown


def _parse(data: dict[str, Any], source: str, env: Mapping[str, str], base: Path) -> AgentConfig:
    unknown_env = _apply_env(data, env)
    if unknown_env:
        raise ConfigError(
            f"unknown environment variable(s) {', '.join(sorted(unknown_env))}; expected "
            + ", ".join(ENV_PREFIX + k for k in _ENV_KEYS),
            source="environment",
        )
    top = _Fields(data, "", source)
    backend = _backend(_Fields(top.require("backend", lambda v, p: v), "backend", source), base)
    status = top.get("status", lambda v, p: v, {})
    status_fields = _Fields(status, "status", source)
    listen = status_fields.get("listen", _listen, ("127.0.0.1", 9750))
    status_token = status_fields.get("token", _str)
    status_token_file = status_fields.get("token_file", _str)
    if status_token is not None and status_token_file is not None:
        raise status_fields.error("token_file", "give token or token_file, not both")
    if status_token_file is not None:
        status_token = _read_secret_file(status_token_file, status_fields.field("token_file"), base)
    if status_token is not None and not status_token.strip():
        raise status_fields.error("token", "is empty")
    status_fields.done()
    log = _Fields(top.get("log", lambda v, p: v, {}), "log", source)
    log_format = log.get("format", _choice("text", "json"), "text")
    log_level = log.get("level", _choice("debug", "info", "warning", "error"), "info")
    log.done()
    raw_services = top.get("service", lambda v, p: v, [])
    top.done()
    if not isinstance(raw_services, list) or not raw_services:
        raise ConfigError("expected at least one [[service]] table", field="service", source=source)
    services = tuple(
        _service(_Fields(raw, f"service[{i}]", source)) for i, raw in enumerate(raw_services)
    )
    seen: dict[str, int] = {}
    for i, svc in enumerate(services):
        if svc.key in seen:
            raise ConfigError(
                f"same id as service[{seen[svc.key]}] ({svc.instance.id}); give each an id",
                field=f"service[{i}].id",
                source=source,
            )
        seen[svc.key] = i
    return AgentConfig(source, backend, services, listen, log_format, log_level, status_token)


def _backend(fields: _Fields, base: Path) -> BackendConfig:
    url = fields.require("url", _str)
    try:
        query = parse_backend_url(url, default_port=0).query
    except ConfigError as exc:
        raise fields.error("url", exc.reason) from None
    timeout = fields.get("timeout", _duration)
    token = fields.get("token", _str)
    token_file = fields.get("token_file", _str)
    if token is not None and token_file is not None:
        raise fields.error("token_file", "give token or token_file, not both")
    if token_file is not None:
        token = _read_secret_file(token_file, fields.field("token_file"), base)
    user = fields.get("user", _str)
    password = fields.get("password", _str)
    password_file = fields.get("password_file", _str)
    if password is not None and password_file is not None:
        raise fields.error("password_file", "give password or password_file, not both")
    if password_file is not None:
        password = _read_secret_file(password_file, fields.field("password_file"), base)
    tls = {name: fields.get(name, _path_in(base)) for name in ("ca_file", "cert_file", "key_file")}
    fields.done()
    digest = hashlib.sha256()
    for name, path in tls.items():
        if path is not None:
            try:
                digest.update(Path(path).read_bytes())
            except OSError as exc:
                raise fields.error(name, f"cannot read {path}: {exc.strerror}") from None
    config = BackendConfig(
        url, timeout, token, user, password, **tls, tls_digest=digest.hexdigest()
    )
    # open_backend refuses an option given twice too; here the error can name the key.
    for name in sorted(set(config.options()) & set(query)):
        given = f"{name}_file" if f"{name}_file" in fields.table else name
        raise fields.error(given, f"also given in url (?{name}=); keep one of the two")
    return config


def _path_in(base: Path) -> Callable[[Any, str], str]:
    """A path to an existing file, relative to the config file's folder."""

    def convert(value: Any, path: str) -> str:
        text = _str(value, path)
        full = Path(text) if Path(text).is_absolute() else base / text
        if not full.is_file():
            raise ConfigError(f"no such file: {full}", field=path)
        return str(full)

    return convert


def _service(fields: _Fields) -> ServiceConfig:
    path = fields.path
    name = fields.require("name", _str)
    instance_fields: dict[str, Any] = {
        "service": name,
        "id": fields.get("id", _str, ""),
        "address": fields.get("address", _str, ""),
        "port": fields.require("port", _int),
        "tags": fields.get("tags", _str_list, ()),
        "meta": fields.get("meta", _str_map, {}),
    }
    try:
        instance = ServiceInstance(**instance_fields)
    except ConfigError as exc:
        inner = "name" if exc.field == "service" else exc.field
        raise ConfigError(exc.reason, field=f"{path}.{inner}" if inner else path) from None
    ttl = fields.get("ttl", _duration, 10.0)
    # The registrar's own floors, named here by file and field.
    if ttl < TTL_FLOOR:
        raise fields.error(
            "ttl", f"must be at least {TTL_FLOOR:g}s (heartbeats every ttl/3), got {ttl:g}s"
        )
    heartbeat = fields.get("heartbeat", _duration)
    if heartbeat is not None and heartbeat < HEARTBEAT_FLOOR:
        raise fields.error(
            "heartbeat",
            f"must be at least {HEARTBEAT_FLOOR:g}s (at most 4 renewals a second), "
            f"got {heartbeat:g}s",
        )
    if heartbeat is not None and heartbeat > ttl / 3:
        raise fields.error("heartbeat", f"must be at most ttl/3 ({ttl / 3:g}s), got {heartbeat:g}s")
    on_unhealthy = OnUnhealthy(
        fields.get("on_unhealthy", _choice("deregister", "critical"), "deregister")
    )
    deregister_after = fields.get("deregister_critical_after", _duration)
    if deregister_after is not None and deregister_after < 60:
        raise fields.error(
            "deregister_critical_after", f"Consul's floor is 60s, got {deregister_after:g}s"
        )
    gate = _Fields(fields.get("gate", lambda v, p: v, {}), f"{path}.gate", fields.source)
    fall = gate.get("fall", _positive_int, 3)
    rise = gate.get("rise", _positive_int, 2)
    gate.done()
    raw_checks = fields.get("check", lambda v, p: v, [])
    if not isinstance(raw_checks, list):
        raise fields.error("check", "expected [[service.check]] tables")
    fields.done()
    checks = tuple(
        _check(_Fields(raw, f"{path}.check[{j}]", fields.source))
        for j, raw in enumerate(raw_checks)
    )
    names = [c.build().name for c in checks]
    if len(set(names)) != len(names):
        raise fields.error("check", "two checks probe the same target; give them distinct names")
    return ServiceConfig(
        instance, ttl, heartbeat, on_unhealthy, fall, rise, deregister_after, checks
    )


def _positive_int(value: Any, path: str) -> int:
    number = _int(value, path)
    if number < 1:
        raise ConfigError(f"expected a whole number >= 1, got {number}", field=path)
    return number


def _check(fields: _Fields) -> CheckConfig:
    kinds = [k for k in ("http", "tcp", "command") if k in fields.table]
    if len(kinds) != 1:
        raise ConfigError(
            'expected exactly one of http = "http://…", tcp = "host:port", command = ["…"]',
            field=fields.path,
            source=fields.source,
        )
    kind = kinds[0]
    if kind == "command":
        target: str | tuple[str, ...] = fields.get("command", _str_list)
        if not target:
            raise fields.error("command", 'expected a non-empty list like ["pg_isready", "-q"]')
    else:
        target = fields.get(kind, _str)
    if kind == "tcp":
        host, sep, port = str(target).rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise fields.error("tcp", f'expected "host:port" like "127.0.0.1:8080", got {target!r}')
    if kind == "http" and not str(target).startswith(("http://", "https://")):
        raise fields.error("http", f"expected an http:// or https:// URL, got {target!r}")
    interval = fields.get("interval", _duration, 5.0)
    timeout = fields.get("timeout", _duration, 2.0)
    name = fields.get("name", _str)
    method = "GET"
    expect: tuple[int, int] = (200, 399)
    headers: dict[str, str] = {}
    env: dict[str, str] = {}
    if kind == "http":
        method = fields.get("method", _choice("GET", "HEAD", "POST"), "GET")
        expect = fields.get("expect_status", _status_range, (200, 399))
        headers = fields.get("headers", _str_map, {})
    if kind == "command":
        env = fields.get("env", _env_map, {})
    fields.done()
    return CheckConfig(kind, target, interval, timeout, method, expect, headers, name, env)


def _env_map(value: Any, path: str) -> dict[str, str]:
    env = _str_map(value, path)
    for key in env:
        if not key or "=" in key or "\0" in key:
            raise ConfigError(f"not a valid variable name: {key!r}", field=f"{path}.{key}")
    return env


def load_config(
    path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
) -> AgentConfig:
    """Read and check ``path``. Raises :class:`ConfigError` with ``file:line`` or the field."""
    file = Path(path)
    source = str(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror}", source=source) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", source=source) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        where = ""
        if "(at line " in message:
            message, _, rest = message.partition(" (at line ")
            line = rest.split(",")[0]
            where = f":{line}"
        raise ConfigError(f"invalid TOML: {message}", source=f"{source}{where}") from None
    except RecursionError:
        raise ConfigError("invalid TOML: nested too deeply", source=source) from None
    return parse_config(data, source=source, env=env, base=file.parent)
