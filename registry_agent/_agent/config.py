"""agent.toml: parsed once into frozen dataclasses; every error names the file and field.

The agent knows no backend's options: ``[backend]`` is ``url`` plus whatever the
backend of that scheme takes, checked by the backend itself when the file is read.
Several ``[[backend]]`` tables instead (each the same: ``url`` and that backend's
options) register every service in each registry, each healed on its own; one
file holds either form, not both.
Each check table is read by the class of its kind (``_plugins.check_class``), and
the registration options by :class:`RegistrationOptions`.

Environment overrides (they win over the file): ``REGISTRY_AGENT_BACKEND``,
``REGISTRY_AGENT_TOKEN``, ``REGISTRY_AGENT_TOKEN_FILE``, ``REGISTRY_AGENT_USER``,
``REGISTRY_AGENT_PASSWORD``, ``REGISTRY_AGENT_PASSWORD_FILE``,
``REGISTRY_AGENT_CA_FILE``, ``REGISTRY_AGENT_CERT_FILE``, ``REGISTRY_AGENT_KEY_FILE``,
``REGISTRY_AGENT_STATUS_LISTEN``, ``REGISTRY_AGENT_STATUS_TOKEN``,
``REGISTRY_AGENT_STATUS_TOKEN_FILE``, ``REGISTRY_AGENT_LOG_FORMAT``,
``REGISTRY_AGENT_LOG_LEVEL``. The backend ones (``BACKEND``, ``TOKEN*``, ``USER``,
``PASSWORD*``, ``*_FILE``) set keys of the single ``[backend]`` table; with
``[[backend]]`` tables they are refused (which table would they change?): put the
options in the tables, secrets as ``token_file``/``password_file``.
"""

from __future__ import annotations

import copy
import hashlib
import os
import stat
import tomllib
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry_agent._address import address_from_table
from registry_agent._backend import Backend
from registry_agent._env import backend_tables_from_env, env_names_backend
from registry_agent._errors import BackendNotFound, ConfigError
from registry_agent._health.base import HealthCheck
from registry_agent._identity import describe_identity, identity_of
from registry_agent._models import ServiceInstance, weight_text
from registry_agent._options import OPTION_KEYS, RegistrationOptions
from registry_agent._plugins import check_class, check_kinds, open_backend
from registry_agent._urls import (
    Table,
    as_choice,
    as_int,
    as_str,
    as_str_list,
    as_str_map,
    parse_backend_url,
    read_secret_file,
)

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
# Registration options a [[service]] table takes: all but the retry policy; the gate's
# two in its own table.
_GATE_KEYS = frozenset({"fall", "rise"})
_OPTION_KEYS = OPTION_KEYS - {"retry"}
# Backend options whose value is a credential, never printed.
_SECRET_OPTION_WORDS = ("token", "password", "secret")
# Secrets that may also be given as a file holding them (``token_file``).
_SECRET_FILE_OPTIONS = ("token", "password")


@dataclass(frozen=True)
class BackendConfig:
    """Where to register: the URL and the backend's own options (never shown by repr).

    ``settings`` is the ``[backend]`` table but ``url``, passed to the backend as
    given, except that ``token_file``/``password_file`` are read into ``token``/
    ``password`` and every ``*_file`` path is made absolute from the config's folder.
    """

    url: str
    settings: Mapping[str, Any] = field(default_factory=dict, repr=False)
    #: Digest of the contents of the files the options name: a reload with rotated
    #: certificates reconnects.
    file_digest: str = field(default="", repr=False)
    #: Where the table is in the file: ``backend``, or ``backend[i]`` for ``[[backend]]``.
    path: str = field(default="backend", compare=False)

    def options(self) -> dict[str, Any]:
        """Keyword options for ``open_backend`` (a copy of :attr:`settings`)."""
        return dict(self.settings)

    def open(self) -> Backend:
        """The backend (built, not connected); its errors name ``backend.<option>``
        (``backend[i].<option>`` for one of several)."""
        try:
            return open_backend(self.url, **self.settings)
        except ConfigError as exc:
            raise ConfigError(exc.reason, field=_backend_field(exc.field, self.path)) from None
        except BackendNotFound as exc:
            raise ConfigError(exc.message, field=f"{self.path}.url") from None

    def redacted(self) -> str:
        """The URL without credentials or options, safe to show."""
        return parse_backend_url(self.url, default_port=0).redacted()

    def secrets(self) -> list[str]:
        """Values that must never be printed."""
        found = [
            value
            for name, value in self.settings.items()
            if isinstance(value, str) and any(word in name for word in _SECRET_OPTION_WORDS)
        ]
        url = parse_backend_url(self.url, default_port=0)
        found.append(url.password or "")
        found += [v for k, v in url.query.items() if any(w in k for w in _SECRET_OPTION_WORDS)]
        return [s for s in found if s]


def _backend_field(field: str | None, path: str = "backend") -> str:
    """``field`` as a key of the backend table at ``path`` (backends name most of their
    options ``backend.<option>``)."""
    if not field or field == "backend":
        return path
    return f"{path}.{field.removeprefix('backend.')}"


@dataclass(frozen=True)
class CheckConfig:
    """One health check of a service: its kind and its table, built by that kind's class."""

    kind: str  # the key naming the kind: http, tcp, command, or a plugin's
    table: Mapping[str, Any] = field(repr=False)
    path: str = field(default="", compare=False)
    name: str = field(default="", compare=False)
    check_secrets: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @property
    def target(self) -> Any:
        """What the check probes, as written (a URL, ``host:port``, a command list)."""
        value = self.table[self.kind]
        return tuple(value) if isinstance(value, list) else value

    def secrets(self) -> list[str]:
        """Credentials this check carries: a URL's password, secret-looking header values."""
        return list(self.check_secrets)

    def build(self) -> HealthCheck:
        """The runnable check (a new one each call)."""
        return _build_check(self.kind, Table(copy.deepcopy(dict(self.table)), self.path))


def _build_check(kind: str, table: Table) -> HealthCheck:
    check = check_class(kind).from_table(table)
    table.done()
    return check


@dataclass(frozen=True)
class ServiceConfig:
    """One service to register: the instance, its registration options, its checks."""

    instance: ServiceInstance
    options: RegistrationOptions = field(default_factory=RegistrationOptions)
    checks: tuple[CheckConfig, ...] = ()

    @property
    def key(self) -> str:
        """What identifies the service across reloads."""
        return f"{self.instance.service}/{self.instance.id}"


@dataclass(frozen=True)
class AgentConfig:
    """The whole agent.toml, checked."""

    source: str
    #: Every registry, in the file's order (one for a ``[backend]`` table).
    backends: tuple[BackendConfig, ...]
    services: tuple[ServiceConfig, ...]
    status_listen: tuple[str, int] | None = ("127.0.0.1", 9750)
    log_format: str = "text"
    log_level: str = "info"
    #: Bearer token the status server requires (all but /healthz), if any.
    status_token: str | None = field(default=None, repr=False)

    @property
    def backend(self) -> BackendConfig:
        """The first (or only) backend."""
        return self.backends[0]

    def secrets(self) -> list[str]:
        """Values that must never be printed."""
        found = [secret for backend in self.backends for secret in backend.secrets()]
        if self.status_token:
            found.append(self.status_token)
        for service in self.services:
            for check in service.checks:
                found += check.secrets()
        return found


def _listen(value: Any, path: str) -> tuple[str, int] | None:
    text = as_str(value, path)
    if text in ("", "off"):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ConfigError(
            f'expected "host:port" like "127.0.0.1:9750" or "off", got {text!r}', field=path
        )
    return host.strip("[]"), int(port)


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
    backend_from_env: bool = False,
) -> AgentConfig:
    """Check a parsed TOML document (with ``env`` overrides) into an :class:`AgentConfig`.

    ``backend_from_env``: a document without ``backend`` takes the backends the
    environment names (``backends_from_env``: ``REGISTRY_AGENT_BACKEND``, else
    Consul's, else etcd's variables) instead of being refused."""
    environ = os.environ if env is None else env
    try:
        return _parse(dict(data), source, environ, base or Path.cwd(), backend_from_env)
    except ConfigError as error:
        raise _with_source(error, source) from None


def _backend_variable(name: str) -> bool:
    """Whether ``name`` is a REGISTRY_AGENT_* variable setting a [backend] key."""
    key = name.removeprefix(ENV_PREFIX)
    return name.startswith(ENV_PREFIX) and _ENV_KEYS.get(key, ("",))[0] == "backend"


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    unknown = []
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :]
        if key in _ENV_KEYS:
            table, item = _ENV_KEYS[key]
            if table == "backend" and isinstance(data.get("backend"), list):
                raise ConfigError(
                    f"{name} sets a key of the single [backend] table, and this file has "
                    "[[backend]] tables; give that option in each [[backend]] table "
                    "(a secret as token_file or password_file)",
                    field="backend",
                )
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


def _parse(
    data: dict[str, Any],
    source: str,
    env: Mapping[str, str],
    base: Path,
    backend_from_env: bool = False,
) -> AgentConfig:
    if backend_from_env and "backend" not in data:
        if not env_names_backend(env):
            raise ConfigError(
                "no [backend] table, and none in the environment: add one, or set "
                "REGISTRY_AGENT_BACKEND, CONSUL_HTTP_ADDR or ETCDCTL_ENDPOINTS",
                field="backend",
                source=source,
            )
        # The environment names the backends, its REGISTRY_AGENT_* backend keys included.
        data["backend"] = backend_tables_from_env(env)
        env = {name: value for name, value in env.items() if not _backend_variable(name)}
    unknown_env = _apply_env(data, env)
    if unknown_env:
        raise ConfigError(
            f"unknown environment variable(s) {', '.join(sorted(unknown_env))}; expected "
            + ", ".join(ENV_PREFIX + k for k in _ENV_KEYS),
            source="environment",
        )
    try:
        return _parse_tables(data, source, env, base)
    except ConfigError as exc:
        # Paths such as ``log.level`` the environment set, to the variable that set them.
        given = {".".join(_ENV_KEYS[k]): ENV_PREFIX + k for k in _ENV_KEYS if ENV_PREFIX + k in env}
        name = given.get(exc.field or "")
        if name is None:
            raise
        # The value came from the environment, not the file: name the variable.
        raise ConfigError(exc.reason, field=name, source="environment") from None


def _parse_tables(
    data: dict[str, Any], source: str, env: Mapping[str, str], base: Path
) -> AgentConfig:
    top = Table(data, "", source)
    if "backend" not in top:
        raise top.error("backend", "is required")
    backends = _backends(top.get("backend", lambda v, p: v), source, base)
    status_fields = top.table_at("status")
    listen = status_fields.get("listen", _listen, ("127.0.0.1", 9750))
    status_token = _secret(status_fields, "token", base)
    if status_token is not None and not status_token.strip():
        raise status_fields.error("token", "is empty")
    status_fields.done()
    log = top.table_at("log")
    log_format = log.get("format", as_choice("text", "json"), "text")
    levels = as_choice("debug", "info", "warning", "error")
    log_level = log.get(  # "INFO" as Python's logging spells it is fine too
        "level", lambda v, p: levels(v.lower() if isinstance(v, str) else v, p), "info"
    )
    log.done()
    raw_services = top.get("service", lambda v, p: v, [])
    top.done()
    if not isinstance(raw_services, list) or not raw_services:
        raise ConfigError("expected at least one [[service]] table", field="service", source=source)
    services = tuple(
        _service(Table(raw, f"service[{i}]", source), env, base)
        for i, raw in enumerate(raw_services)
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
    return AgentConfig(source, backends, services, listen, log_format, log_level, status_token)


def _secret(table: Table, name: str, base: Path) -> str | None:
    """``name`` or the content of ``name_file`` (one of the two), both marked read."""
    value: str | None = table.get(name, as_str)
    path: str | None = table.get(f"{name}_file", as_str)
    if value is not None and path is not None:
        raise table.error(f"{name}_file", f"give {name} or {name}_file, not both")
    if path is not None:
        value = _read_secret_file(path, table.field(f"{name}_file"), base)
    return value


def _backends(raw: Any, source: str, base: Path) -> tuple[BackendConfig, ...]:
    """One ``[backend]`` table, or several ``[[backend]]`` tables (at least one, each a
    different registry)."""
    if not isinstance(raw, list):
        return (_backend(Table(raw, "backend", source), base),)
    if not raw:
        raise ConfigError("expected at least one [[backend]] table", field="backend", source=source)
    backends: list[BackendConfig] = []
    seen: dict[Hashable, int] = {}
    for i, item in enumerate(raw):
        config = _backend(Table(item, f"backend[{i}]", source), base)
        # Two tables writing one registry would take the entries from each other
        # forever: compared by what the backend writes to (registry_identity), else
        # by the URL and options as given.
        as_given = (config.url, repr(sorted(config.settings.items())))
        identity, said = identity_of(config.open(), as_given)
        j = seen.setdefault(identity, i)
        if j != i:
            why = f" (both write to {describe_identity(identity)})" if said else ""
            raise ConfigError(
                f"the same registry as backend[{j}]{why}: each [[backend]] table names another",
                field=f"backend[{i}].url",
                source=source,
            )
        backends.append(config)
    return tuple(backends)


def _backend(table: Table, base: Path) -> BackendConfig:
    """``url``, the secrets read from their files, every other key passed to the backend."""
    url = table.require("url", as_str)
    try:
        query = parse_backend_url(url, default_port=0).query
    except ConfigError as exc:
        raise table.error("url", exc.reason) from None
    options: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for name in _SECRET_FILE_OPTIONS:
        value = _secret(table, name, base)
        if value is not None:
            options[name] = value
            given_as[name] = f"{name}_file" if f"{name}_file" in table else name
    digest = hashlib.sha256()
    for name in sorted(set(table.table) - table.used):
        value = table.get(name, lambda v, f: v)
        if name.endswith("_file"):
            value = _path_in(base)(value, table.field(name))
            digest.update(Path(value).read_bytes())
        options[name] = value
        given_as[name] = name
    table.done()
    # open_backend refuses an option given twice too; here the error can name the key.
    for name in sorted(set(options) & set(query)):
        raise table.error(given_as[name], f"also given in url (?{name}=); keep one of the two")
    config = BackendConfig(url, options, digest.hexdigest(), table.path)
    # The backend checks its options now, when the file is read, not when it is used.
    config.open()
    return config


def _path_in(base: Path) -> Callable[[Any, str], str]:
    """A path to an existing, readable file, relative to the config file's folder."""

    def convert(value: Any, path: str) -> str:
        text = as_str(value, path)
        full = Path(text) if Path(text).is_absolute() else base / text
        if not full.is_file():
            raise ConfigError(f"no such file: {full}", field=path)
        try:
            full.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {full}: {exc.strerror}", field=path) from None
        return str(full)

    return convert


def _as_weight(value: Any, field: str) -> str:
    """A whole number >= 0 (``3``, or ``"3"``), as the meta text it is kept as."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    return weight_text(value, field)


def _as_meta(value: Any, field: str) -> dict[str, str]:
    """A table of strings, but for ``weight``: a whole number >= 0 (``3`` or ``"3"``)."""
    if isinstance(value, dict) and "weight" in value and not isinstance(value["weight"], str):
        value = {**value, "weight": weight_text(value["weight"], f"{field}.weight")}
    return as_str_map(value, field)


def _service(fields: Table, environ: Mapping[str, str], base: Path | None = None) -> ServiceConfig:
    path = fields.path
    name = fields.require("name", as_str)
    instance_fields: dict[str, Any] = {
        "service": name,
        "id": fields.get("id", as_str, ""),
        # A literal, else chosen by address_network/_interface/_env, else the default route's.
        "address": address_from_table(fields, environ),
        "port": fields.require("port", as_int),
        "tags": fields.get("tags", as_str_list, ()),
        "meta": fields.get("meta", _as_meta, {}),
        "scheme": fields.get("scheme", as_str, ""),
        "version": fields.get("version", as_str, ""),
    }
    weight = fields.get("weight", _as_weight, None)
    if weight is not None:
        if "weight" in instance_fields["meta"]:
            raise fields.error("weight", "given twice: set weight or meta.weight, not both")
        instance_fields["meta"]["weight"] = weight
    try:
        instance = ServiceInstance(**instance_fields)
    except ConfigError as exc:
        inner = "name" if exc.field == "service" else exc.field
        raise ConfigError(exc.reason, field=f"{path}.{inner}" if inner else path) from None
    options = _registration_options(fields)
    raw_checks = fields.get("check", lambda v, p: v, [])
    if not isinstance(raw_checks, list):
        raise fields.error("check", "expected [[service.check]] tables")
    fields.done()
    checks = tuple(
        _check(Table(raw, f"{path}.check[{j}]", fields.source), base)
        for j, raw in enumerate(raw_checks)
    )
    return ServiceConfig(instance, options, checks)


def _registration_options(service: Table) -> RegistrationOptions:
    """The registration options of a service table: ``fall``/``rise`` under ``gate``, the
    rest beside ``name``; their defaults and checks are :class:`RegistrationOptions`'s."""
    gate = service.table_at("gate")
    given: dict[str, Any] = {}
    where: dict[str, str] = {}
    for table, keys in ((service, _OPTION_KEYS - _GATE_KEYS), (gate, _GATE_KEYS)):
        for key in sorted(keys):
            if key in table:
                given[key] = table.get(key, lambda v, f: v)
                where[key] = table.field(key)
            table.used.add(key)
    gate.done()
    try:
        return RegistrationOptions.from_mapping(given)
    except ConfigError as exc:
        field = where.get(exc.field or "", service.path)
        raise ConfigError(exc.reason, field=field, source=service.source) from None


def _check(table: Table, base: Path | None = None) -> CheckConfig:
    """A check table: exactly one key names its kind, whose class reads the rest.

    A relative ``*_file`` path in it (a gRPC check's ``ca_file``…) is made relative to
    ``base``, the config file's folder, as the backend's are.
    """
    for key, value in table.table.items():
        if base is not None and key.endswith("_file") and isinstance(value, str):
            table.table[key] = str(base / value) if value else value  # absolute stays absolute
    kinds = [kind for kind in check_kinds() if kind in table]
    if len(kinds) != 1:
        examples = [check_class(kind).example or f"{kind} = …" for kind in check_kinds()]
        raise ConfigError(
            f"expected exactly one of {', '.join(examples)}",
            field=table.path,
            source=table.source,
        )
    (kind,) = kinds
    saved = copy.deepcopy(table.table)
    check = _build_check(kind, table)
    return CheckConfig(kind, saved, table.path, check.name, check.secrets())


def _both_backend_forms(text: str, line: int) -> bool:
    """Whether TOML's complaint at ``line`` is a ``[backend]`` table beside ``[[backend]]``
    ones (TOML refuses a key declared as both a table and an array of tables)."""
    lines = [raw.split("#", 1)[0].replace(" ", "").replace("\t", "") for raw in text.splitlines()]
    if not 1 <= line <= len(lines) or lines[line - 1] not in ("[backend]", "[[backend]]"):
        return False
    # The table form may also be written inline or dotted at the top: backend = {…}, backend.url.
    table = any(text == "[backend]" or text.startswith(("backend=", "backend.")) for text in lines)
    return table and "[[backend]]" in lines


#: The largest config file read: an agent.toml is a few kilobytes.
MAX_CONFIG_BYTES = 1024 * 1024


def _read_config_file(file: Path, source: str) -> str:
    """The text of the config file ``file``: a regular file (a device such as /dev/zero
    would be read forever, a FIFO would block until a writer came) of at most
    :data:`MAX_CONFIG_BYTES`, in UTF-8; else a ConfigError naming ``source``."""
    try:
        # O_NONBLOCK: opening a FIFO does not wait for a writer; fstat then refuses it.
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror}", source=source) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError("not a regular file: expected an agent.toml file", source=source)
        with os.fdopen(fd, "rb") as handle:
            fd = -1  # closed with the handle
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror}", source=source) from None
    finally:
        if fd != -1:
            os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"too large: a config file is at most {MAX_CONFIG_BYTES} bytes (1 MiB)", source=source
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", source=source) from None


def load_config(
    path: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    backend_from_env: bool = False,
) -> AgentConfig:
    """Read and check ``path``. Raises :class:`ConfigError` with ``file:line`` or the field.

    ``backend_from_env``: see :func:`parse_config`."""
    file = Path(path)
    source = str(path)
    text = _read_config_file(file, source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        where = ""
        if "(at line " in message:
            message, _, rest = message.partition(" (at line ")
            line = rest.split(",")[0]
            where = f":{line}"
            if _both_backend_forms(text, int(line)):
                raise ConfigError(
                    "give one [backend] table or several [[backend]] tables, not both",
                    field="backend",
                    source=f"{source}{where}",
                ) from None
        raise ConfigError(f"invalid TOML: {message}", source=f"{source}{where}") from None
    except RecursionError:
        raise ConfigError("invalid TOML: nested too deeply", source=source) from None
    return parse_config(
        data, source=source, env=env, base=file.parent, backend_from_env=backend_from_env
    )
