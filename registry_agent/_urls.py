"""Parsing backend URLs and their options into checked values."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry_agent._errors import ConfigError

__all__ = ["BackendURL", "Option", "parse_backend_url", "parse_duration", "take_options"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object, *, field: str) -> float:
    """Seconds from a number or a string like ``"500ms"``, ``"10s"``, ``"1m"``."""
    if isinstance(value, bool):
        raise ConfigError(f'expected a duration like "2s", got {value!r}', field=field)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(f'expected a duration like "2s" or "500ms", got {value!r}', field=field)
    if seconds < 0 or seconds != seconds:
        raise ConfigError(f"expected a positive duration, got {value!r}", field=field)
    return seconds


@dataclass(frozen=True, slots=True)
class BackendURL:
    """A parsed ``scheme://host:port,host:port/path?query`` backend URL."""

    scheme: str
    endpoints: tuple[tuple[str, int], ...]
    path: str
    query: Mapping[str, str]
    username: str | None
    password: str | None
    text: str

    def redacted(self) -> str:
        """The URL without credentials, safe to log."""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.endpoints)
        return f"{self.scheme}://{hosts}{self.path}"


def parse_backend_url(url: str, *, default_port: int | None = None) -> BackendURL:
    """Split a backend URL; raises :class:`ConfigError` naming what is wrong."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            f"expected a URL like consul://127.0.0.1:8500 or etcd://127.0.0.1:2379, got {url!r}",
            field="backend",
        )
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    # Error messages show the URL without credentials or query (it may hold a token).
    shown = f"{scheme}://{rest.partition('?')[0].rpartition('@')[2]}"
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise ConfigError(f"invalid URL scheme {scheme!r} in {shown!r}", field="backend")
    rest, _, query_text = rest.partition("?")
    rest = rest.partition("#")[0]
    netloc, slash, tail = rest.partition("/")
    path = slash + tail
    username = password = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, _, pw = userinfo.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(pw) if pw else None
    endpoints: list[tuple[str, int]] = []
    for part in filter(None, netloc.split(",")):
        host, port = _split_host_port(part, shown, default_port)
        endpoints.append((host, port))
    try:
        pairs = urllib.parse.parse_qsl(query_text, keep_blank_values=True, strict_parsing=False)
    except ValueError as exc:
        raise ConfigError(f"invalid query string in {shown!r}: {exc}", field="backend") from None
    query: dict[str, str] = {}
    for key, value in pairs:
        if key in query:
            raise ConfigError(f"option {key!r} given twice in {shown!r}", field="backend")
        query[key] = value
    return BackendURL(scheme, tuple(endpoints), path, query, username, password, url)


def _split_host_port(part: str, url: str, default_port: int | None) -> tuple[str, int]:
    if part.startswith("["):
        host, sep, port_text = part[1:].partition("]")
        port_text = port_text.removeprefix(":") if sep else ""
    elif part.count(":") == 1:
        host, port_text = part.split(":")
    elif ":" in part:
        raise ConfigError(
            f"IPv6 addresses need brackets, as in [::1]:2379: {url!r}", field="backend"
        )
    else:
        host, port_text = part, ""
    if not host:
        raise ConfigError(f"missing host in {url!r}", field="backend")
    if not port_text:
        if default_port is None:
            raise ConfigError(f"missing port in {url!r}", field="backend")
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"expected a port 1-65535, got {port_text!r} in {url!r}", field="backend")
    return host, int(port_text)


Option = Callable[[str, Any], Any]


def take_options(
    scheme: str, given: Mapping[str, Any], spec: Mapping[str, Option]
) -> dict[str, Any]:
    """Convert ``given`` options with ``spec``'s converters; unknown names are errors."""
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for {scheme}://; "
            f"expected one of: {', '.join(sorted(spec))}",
            field="backend",
        )
    return {name: spec[name](name, value) for name, value in given.items()}


def read_secret_file(path: str | Path, *, field: str) -> str:
    """A token or password kept in a file (surrounding whitespace removed)."""
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", field=field) from None


def opt_str(name: str, value: Any) -> str:
    """An option that must be a string."""
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {value!r}", field=f"backend.{name}")
    return value


def opt_duration(name: str, value: Any) -> float:
    """An option holding a duration: seconds or ``"10s"``."""
    seconds = parse_duration(value, field=f"backend.{name}")
    if seconds <= 0:
        raise ConfigError(f"expected a duration above zero, got {value!r}", field=f"backend.{name}")
    return seconds


def opt_bool(name: str, value: Any) -> bool:
    """An option holding a boolean (``true``/``false``/``1``/``0`` in a URL)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    }:
        return value.lower() in {"1", "true", "yes", "on"}
    raise ConfigError(f"expected true or false, got {value!r}", field=f"backend.{name}")


def opt_choice(*choices: str) -> Option:
    """An option that must be one of ``choices``."""

    def convert(name: str, value: Any) -> str:
        if value not in choices:
            raise ConfigError(
                f"expected one of {', '.join(choices)}, got {value!r}", field=f"backend.{name}"
            )
        return str(value)

    return convert
