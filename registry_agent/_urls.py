"""Checked values from user input: backend URLs, durations, options and config tables.

One set of converters, ``as_*(value, field)``, each raising a :class:`ConfigError`
that names ``field``; ``opt_*(name, value)`` are the same converters for a
backend option named ``backend.<name>``; :class:`Table` reads one config table
with them and refuses the keys nobody read.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry_agent._errors import ConfigError

__all__ = [
    "BackendURL",
    "Option",
    "Table",
    "as_bool",
    "as_choice",
    "as_duration",
    "as_int",
    "as_str",
    "as_str_list",
    "as_str_map",
    "describe",
    "opt_bool",
    "opt_choice",
    "opt_duration",
    "opt_str",
    "option",
    "parse_backend_url",
    "parse_duration",
    "read_secret_file",
    "take_options",
]

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
        if not sep or (port_text and not port_text.startswith(":")):
            raise ConfigError(
                f"expected an IPv6 address in brackets, the port after them ([::1]:port): {url!r}",
                field="backend",
            )
        port_text = port_text.removeprefix(":")
    elif part.count(":") == 1:
        host, port_text = part.split(":")
    elif ":" in part:
        raise ConfigError(
            f"IPv6 addresses need brackets, the port after them ([::1]:port): {url!r}",
            field="backend",
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


#: A converter of one value: ``convert(value, field)`` returns it checked or raises
#: a :class:`ConfigError` naming ``field``.
Convert = Callable[[Any, str], Any]
#: A backend option's converter: ``convert(name, value)``, errors naming ``backend.<name>``.
Option = Callable[[str, Any], Any]


def describe(value: Any) -> str:
    """What kind of value ``value`` is, for an error message that must not echo it."""
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def as_str(value: Any, field: str) -> str:
    """A string."""
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {describe(value)}", field=field)
    return value


def as_duration(value: Any, field: str) -> float:
    """A duration above zero: seconds, or a string like ``"10s"``, ``"500ms"``, ``"1m"``."""
    seconds = parse_duration(value, field=field)
    if seconds <= 0:
        raise ConfigError(f'expected a duration above zero like "2s", got {value!r}', field=field)
    return seconds


def as_bool(value: Any, field: str) -> bool:
    """A boolean (``true``/``false``/``1``/``0``/``yes``/``no``/``on``/``off`` as text)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise ConfigError(f"expected true or false, got {value!r}", field=field)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def as_int(value: Any, field: str) -> int:
    """A whole number (not a boolean, not text)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"expected a whole number, got {value!r}", field=field)
    return value


def as_str_list(value: Any, field: str) -> tuple[str, ...]:
    """A list of strings, as a tuple."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"expected a list of strings, got {value!r}", field=field)
    return tuple(value)


def as_str_map(value: Any, field: str) -> dict[str, str]:
    """A table of strings; a bad value is named ``field.key``."""
    if not isinstance(value, dict):
        raise ConfigError(f"expected a table of strings, got {describe(value)}", field=field)
    for key, item in value.items():
        if not isinstance(item, str):
            raise ConfigError(f"expected a string, got {describe(item)}", field=f"{field}.{key}")
    return dict(value)


def as_choice(*choices: str) -> Convert:
    """A converter accepting only one of ``choices``."""

    def convert(value: Any, field: str) -> str:
        if value not in choices:
            raise ConfigError(f"expected one of {', '.join(choices)}, got {value!r}", field=field)
        return str(value)

    return convert


def option(convert: Convert) -> Option:
    """``convert`` as a backend option converter: its errors name ``backend.<name>``."""

    def convert_option(name: str, value: Any) -> Any:
        return convert(value, f"backend.{name}")

    convert_option.__doc__ = convert.__doc__
    return convert_option


#: A backend option that must be a string.
opt_str: Option = option(as_str)
#: A backend option holding a duration above zero: seconds or ``"10s"``.
opt_duration: Option = option(as_duration)
#: A backend option holding a boolean (``true``/``false``/``1``/``0`` in a URL).
opt_bool: Option = option(as_bool)


def opt_choice(*choices: str) -> Option:
    """A backend option that must be one of ``choices``."""
    return option(as_choice(*choices))


def take_options(
    scheme: str, given: Mapping[str, Any], spec: Mapping[str, Option]
) -> dict[str, Any]:
    """Convert ``given`` options with ``spec``'s converters; unknown names are errors.

    The error for one unknown option names its field (``backend.<name>``).
    """
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for {scheme}://; "
            f"expected one of: {', '.join(sorted(spec))}",
            field=f"backend.{unknown[0]}" if len(unknown) == 1 else "backend",
        )
    return {name: spec[name](name, value) for name, value in given.items()}


def read_secret_file(path: str | Path, *, field: str) -> str:
    """A token or password kept in a file (surrounding whitespace removed)."""
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", field=field) from None
    except (ValueError, UnicodeDecodeError):  # a NUL in the path, or not text
        raise ConfigError(f"cannot read {path!r} as text", field=field) from None


class Table:
    """One table of a config file being read: each key converted, errors naming its path.

    ``path`` is where the table sits (``service[2].check[0]``); :meth:`done`
    refuses every key that no :meth:`get` or :meth:`require` asked for.
    """

    def __init__(self, table: Any, path: str = "", source: str | None = None) -> None:
        if not isinstance(table, dict):
            raise ConfigError(
                f"expected a table, got {describe(table)}", field=path or None, source=source
            )
        self.table: dict[str, Any] = table
        self.path = path
        self.source = source
        self.used: set[str] = set()

    def __contains__(self, key: object) -> bool:
        return key in self.table

    def field(self, key: str) -> str:
        """The full path of ``key``."""
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> ConfigError:
        """An error about ``key``."""
        return ConfigError(message, field=self.field(key), source=self.source)

    def get(self, key: str, convert: Convert, default: Any = None) -> Any:
        """``key`` converted, or ``default`` when absent."""
        self.used.add(key)
        if key not in self.table:
            return default
        return convert(self.table[key], self.field(key))

    def require(self, key: str, convert: Convert) -> Any:
        """``key`` converted; its absence is an error."""
        if key not in self.table:
            raise ConfigError("is required", field=self.field(key), source=self.source)
        return self.get(key, convert)

    def table_at(self, key: str) -> Table:
        """The table under ``key`` (empty when absent), read the same way."""
        return Table(self.get(key, lambda v, f: v, {}), self.field(key), self.source)

    def done(self) -> None:
        """Refuse the keys nobody read."""
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(unknown)}; expected: {', '.join(sorted(self.used))}",
                field=self.path or None,
                source=self.source,
            )

    @contextmanager
    def naming_fields(self) -> Iterator[None]:
        """Errors of a constructor fed from this table name the key they are about.

        A constructor names a parameter (``"http"``, or ``"check <name>: interval"``);
        when that parameter is a key of this table the error names its path, else
        the table's.
        """
        try:
            yield
        except ConfigError as exc:
            if exc.field is not None and exc.field.startswith(f"{self.path}.") and self.path:
                raise
            key = (exc.field or "").rpartition(": ")[2]
            field = self.field(key) if key in self.table else (self.path or None)
            raise ConfigError(exc.reason, field=field, source=self.source) from None
