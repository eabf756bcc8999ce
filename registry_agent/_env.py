"""The backends named by the environment, for code given no backend.

In this order (the first that is set decides; an empty variable is unset):

1. ``REGISTRY_AGENT_BACKEND``: one backend URL, or several separated by whitespace
   or commas (a comma inside an etcd URL's host list, ``etcd://a:2379,b:2379``,
   stays in that URL: only a comma before another ``scheme://`` separates). With
   one URL, ``REGISTRY_AGENT_TOKEN``/``_TOKEN_FILE``, ``_USER``,
   ``_PASSWORD``/``_PASSWORD_FILE``, ``_CA_FILE``, ``_CERT_FILE``, ``_KEY_FILE``
   are its options, as for the agent's ``[backend]``.
2. Consul's own variables, when ``CONSUL_HTTP_ADDR`` is set.
3. etcd's (``etcdctl``'s), when ``ETCDCTL_ENDPOINTS`` is set.

Both 2 and 3 set (and not 1) is an error naming both: which registry a service
lands in must not depend on which CLI happened to be configured in the shell.

Secrets (a token, a password) are never put into the URL text: each URL returned
is safe to print, and carries its secret options beside its text (an
:class:`EnvBackendURL`), which :func:`~registry_agent.open_backend` and every
constructor taking a backend URL use.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

from registry_agent._errors import BackendNotFound, ConfigError
from registry_agent._urls import parse_backend_url, parse_duration, read_secret_file

__all__ = [
    "ENV_BACKEND",
    "EnvBackendURL",
    "backend_tables_from_env",
    "backends_from_env",
    "carried_options",
    "env_names_backend",
]

#: The variable naming the backend(s).
ENV_BACKEND = "REGISTRY_AGENT_BACKEND"
_SOURCE = "environment"
log = logging.getLogger("registry_agent")

# REGISTRY_AGENT_* options of a single REGISTRY_AGENT_BACKEND URL (as the agent's).
_OWN_OPTIONS = {
    "REGISTRY_AGENT_TOKEN": "token",
    "REGISTRY_AGENT_TOKEN_FILE": "token_file",
    "REGISTRY_AGENT_USER": "user",
    "REGISTRY_AGENT_PASSWORD": "password",
    "REGISTRY_AGENT_PASSWORD_FILE": "password_file",
    "REGISTRY_AGENT_CA_FILE": "ca_file",
    "REGISTRY_AGENT_CERT_FILE": "cert_file",
    "REGISTRY_AGENT_KEY_FILE": "key_file",
}
_SECRETS = frozenset({"token", "password"})
# Where a secret is written inside a URL's text: a query value (up to the next ``&``
# or the next URL of the list), and a user:password@ (from the scheme to the ``@``).
_SECRET_VALUE = re.compile(r"[?&](?:token|password)=")
_VALUE_END = re.compile(r"&|[\s,]+[A-Za-z][A-Za-z0-9+.-]*://")

# Consul's client variables the backend has no option for: set, they are an error
# (silently ignoring a namespace or a disabled verification would register elsewhere
# or fail in a confusing way).
_CONSUL_UNSUPPORTED = {
    "CONSUL_NAMESPACE": "Consul Enterprise namespaces are not supported by the consul backend",
    "CONSUL_PARTITION": "Consul Enterprise admin partitions are not supported",
    "CONSUL_HTTP_AUTH": "HTTP basic auth is not supported (use an ACL token)",
    "CONSUL_CAPATH": "a CA directory is not supported: give one PEM bundle as CONSUL_CACERT",
    "CONSUL_TLS_SERVER_NAME": "a TLS server name other than the address's host is not supported",
}
# etcdctl's variables that change nothing on the wire (its output, its API version 3).
_ETCD_HARMLESS = frozenset({"ETCDCTL_WRITE_OUT", "ETCDCTL_HEX", "ETCDCTL_DEBUG", "ETCDCTL_API"})
# The variable that holds each option of a URL built from Consul's variables
# (an error about an option names it, not CONSUL_HTTP_ADDR).
_CONSUL_VARIABLES = {
    "ca_file": "CONSUL_CACERT",
    "cert_file": "CONSUL_CLIENT_CERT",
    "key_file": "CONSUL_CLIENT_KEY",
    "token": "CONSUL_HTTP_TOKEN",
    "token_file": "CONSUL_HTTP_TOKEN_FILE",
}
#: etcd's --grpc-keepalive-min-time default, below which the etcd backend refuses a
#: keepalive_time (etcd answers more frequent pings with GOAWAY). etcdctl's own
#: default (2s) is below it: ETCDCTL_KEEPALIVE_TIME under it is raised to it.
ETCD_KEEPALIVE_FLOOR = 5.0
_raised_keepalives: set[str] = set()
_ETCD_MAPPED = {
    "ETCDCTL_ENDPOINTS": "",
    "ETCDCTL_USER": "user",
    "ETCDCTL_PASSWORD": "password",
    "ETCDCTL_CACERT": "ca_file",
    "ETCDCTL_CERT": "cert_file",
    "ETCDCTL_KEY": "key_file",
    "ETCDCTL_INSECURE_SKIP_TLS_VERIFY": "",
    "ETCDCTL_INSECURE_TRANSPORT": "",
    "ETCDCTL_COMMAND_TIMEOUT": "timeout",
    "ETCDCTL_KEEPALIVE_TIME": "keepalive_time",
    "ETCDCTL_KEEPALIVE_TIMEOUT": "keepalive_timeout",
}

_TRUE = frozenset({"1", "t", "true", "yes", "on"})
_FALSE = frozenset({"0", "f", "false", "no", "off"})
# Where REGISTRY_AGENT_BACKEND separates two URLs: whitespace, or a comma before a scheme.
_SEPARATOR = re.compile(r"\s+|\s*,\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)|\s*,\s*$")


class EnvBackendURL(str):
    """A backend URL read from the environment: its text holds no secret (safe to
    print); :attr:`options` holds the secrets given beside it (``token``,
    ``password``), which :func:`~registry_agent.open_backend` and the constructors
    taking a URL pass to the backend. A string made from it (``url + "…"``) is a
    plain ``str`` without them."""

    options: Mapping[str, Any]

    def __new__(cls, text: str, options: Mapping[str, Any] | None = None) -> EnvBackendURL:
        url = super().__new__(cls, text)
        url.options = dict(options or {})
        return url

    def __reduce__(self) -> tuple[Any, ...]:
        return (EnvBackendURL, (str(self), dict(self.options)))


def carried_options(url: object) -> dict[str, Any]:
    """The secret options an :class:`EnvBackendURL` carries (``{}`` for any other)."""
    return dict(url.options) if isinstance(url, EnvBackendURL) else {}


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _bool(env: Mapping[str, str], name: str) -> bool | None:
    value = _get(env, name)
    if value is None:
        return None
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigError(f"expected true or false, got {value!r}", field=name, source=_SOURCE)


def backends_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """The backend URLs the environment names (``os.environ`` unless ``environ``).

    ``REGISTRY_AGENT_BACKEND`` first, else Consul's variables (``CONSUL_HTTP_ADDR``
    with or without ``http://``/``https://``, ``CONSUL_HTTP_SSL``,
    ``CONSUL_HTTP_TOKEN``/``CONSUL_HTTP_TOKEN_FILE``, ``CONSUL_CACERT``,
    ``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY``, ``CONSUL_HTTP_SSL_VERIFY``), else
    etcdctl's (``ETCDCTL_ENDPOINTS``, ``ETCDCTL_USER`` as ``user`` or
    ``user:password``, ``ETCDCTL_PASSWORD``, ``ETCDCTL_CACERT``, ``ETCDCTL_CERT``,
    ``ETCDCTL_KEY``, ``ETCDCTL_INSECURE_TRANSPORT``,
    ``ETCDCTL_INSECURE_SKIP_TLS_VERIFY``, ``ETCDCTL_COMMAND_TIMEOUT``,
    ``ETCDCTL_KEEPALIVE_TIME``/``_TIMEOUT``).

    Each URL is checked as the backend would check it (no connection is made).
    Raises :class:`ConfigError` (source ``environment``, field the variable) when
    nothing is set, when both Consul's and etcd's are, and for a value or a setting
    the backend cannot honour (``CONSUL_NAMESPACE``, skipping TLS verification…).
    The URLs hold no secret: a token or password travels beside the text
    (:class:`EnvBackendURL`).
    """
    env = os.environ if environ is None else environ
    own = _get(env, ENV_BACKEND)
    if own is not None:
        return _own(own, env)
    consul = _get(env, "CONSUL_HTTP_ADDR")
    etcd = _get(env, "ETCDCTL_ENDPOINTS")
    if consul is not None and etcd is not None:
        raise ConfigError(
            "both CONSUL_HTTP_ADDR and ETCDCTL_ENDPOINTS are set; set "
            f"{ENV_BACKEND} to the registry to use (or to both, separated by a space)",
            field=ENV_BACKEND,
            source=_SOURCE,
        )
    if consul is not None:
        return [_checked(_consul(consul, env), "CONSUL_HTTP_ADDR", _CONSUL_VARIABLES)]
    if etcd is not None:
        return [_checked(_etcd(etcd, env), "ETCDCTL_ENDPOINTS", _etcd_variables(env))]
    raise ConfigError(
        "no backend given and none in the environment: set "
        f"{ENV_BACKEND} (e.g. consul://127.0.0.1:8500 or etcd://127.0.0.1:2379), "
        "or Consul's CONSUL_HTTP_ADDR, or etcd's ETCDCTL_ENDPOINTS",
        field=ENV_BACKEND,
        source=_SOURCE,
    )


def _pieces(text: str) -> list[tuple[int, str]]:
    """The URLs of ``REGISTRY_AGENT_BACKEND``, each with its offset in ``text``."""
    found: list[tuple[int, str]] = []
    pos = 0
    for sep in _SEPARATOR.finditer(text):
        if sep.start() > pos:
            found.append((pos, text[pos : sep.start()]))
        pos = max(pos, sep.end())
    if pos < len(text):
        found.append((pos, text[pos:]))
    return found


def _hidden(text: str) -> list[bool]:
    """Which characters of ``text`` may be a secret: a ``token=``/``password=`` value,
    and whatever lies between a scheme's ``://`` (or the start) and an ``@`` (more
    than the user:password@ when in doubt: this only decides what an error shows)."""
    hidden = [False] * len(text)
    starts = [m.end() for m in re.finditer("://", text)]
    for at, char in enumerate(text):
        if char == "@":
            begin = max((s for s in starts if s <= at), default=0)
            hidden[begin:at] = [True] * (at - begin)
    for m in _SECRET_VALUE.finditer(text):
        stop = _VALUE_END.search(text, m.end())
        end = stop.start() if stop else len(text)
        hidden[m.end() : end] = [True] * (end - m.end())
    return hidden


def _masked(text: str, hidden: list[bool]) -> str:
    """``text`` with each run of hidden characters shown as ``***``."""
    out: list[str] = []
    for char, secret in zip(text, hidden, strict=True):
        if not secret:
            out.append(char)
        elif not out or out[-1] != "***":
            out.append("***")
    return "".join(out)


def _unparsable(url: str, hidden: list[bool], reason: str) -> str:
    """The reason ``url`` does not parse, showing none of its hidden characters."""
    if not any(hidden):
        return reason
    shown = _masked(url, hidden)
    try:
        parse_backend_url(shown, default_port=0)
    except ConfigError as exc:
        return f"{exc.reason} (*** hides what may be a password or token)"
    return (
        f"cannot read {shown!r} (*** hides what may be a password or token): "
        "percent-encode a '/', '?', '#', '@', '&', space or comma in it (%2F, %3F, "
        f"%23, %40, %26, %20, %2C), or give it as REGISTRY_AGENT_TOKEN/_PASSWORD"
    )


def _split_secrets(
    url: str, hidden: list[bool], where: str
) -> tuple[str, dict[str, str], dict[str, str]]:
    """``url`` without a user:password@ or a ``token``/``password`` in its query, the
    options it gave that way that may be shown (``user``), and its secrets."""
    failed: str | None
    try:
        parsed = parse_backend_url(url, default_port=0)
    except ConfigError as exc:
        failed = exc.reason
    else:
        failed = None
    if failed is not None:  # raised here, it has no __context__ quoting the URL
        raise ConfigError(_unparsable(url, hidden, failed), field=where, source=_SOURCE)
    scheme, _, rest = url.partition("://")
    base, question, query_text = rest.partition("?")
    netloc = base.partition("#")[0].partition("/")[0]
    if "@" in netloc:  # as parse_backend_url reads it
        base = base[len(netloc.rsplit("@", 1)[0]) + 1 :]
    if "@" in base:  # a password holding '/' or '#' read as a path: not our URL
        reason = _unparsable(url, hidden, f"an '@' after the host in {url!r}")
        raise ConfigError(reason, field=where, source=_SOURCE)
    shown: dict[str, str] = {}
    secrets: dict[str, str] = {}
    for option, value in (("user", parsed.username), ("password", parsed.password)):
        if value is None:
            continue
        if option in parsed.query:
            raise ConfigError(
                f"{option} is given both before the URL's '@' and in its query; keep one",
                field=where,
                source=_SOURCE,
            )
        (secrets if option in _SECRETS else shown)[option] = value
    kept: list[str] = []
    for item in query_text.split("&") if question else []:
        key = urllib.parse.unquote_plus(item.partition("=")[0])
        if key in _SECRETS and key in parsed.query:
            secrets[key] = parsed.query[key]
        else:
            kept.append(item)
    text = f"{scheme}://{base}" + ("?" + "&".join(kept) if kept else "")
    return text, shown, secrets


def _own(text: str, env: Mapping[str, str]) -> list[str]:
    pieces = _pieces(text)
    given = {name: value for name in _OWN_OPTIONS if (value := _get(env, name)) is not None}
    if given and len(pieces) > 1:
        raise ConfigError(
            f"{', '.join(sorted(given))} set the options of one backend, and "
            f"{ENV_BACKEND} names {len(pieces)}; give the options in each URL's query "
            "(a secret through the backend's own variables or a token_file)",
            field=min(given),
            source=_SOURCE,
        )
    for name in ("TOKEN", "PASSWORD"):
        both = [f"REGISTRY_AGENT_{name}", f"REGISTRY_AGENT_{name}_FILE"]
        if all(item in given for item in both):
            raise ConfigError(
                f"give {both[0]} or {both[1]}, not both", field=both[1], source=_SOURCE
            )
    hidden = _hidden(text)
    found: list[str] = []
    many = len(pieces) > 1
    for i, (offset, url) in enumerate(pieces):
        where = f"{ENV_BACKEND}[{i}]" if many else ENV_BACKEND
        bare, query, secrets = _split_secrets(url, hidden[offset : offset + len(url)], where)
        in_url = set(parse_backend_url(bare, default_port=0).query) | set(query) | set(secrets)
        variables: dict[str, str] = {}
        for name, value in given.items():
            option = _OWN_OPTIONS[name]
            if option == "password_file":
                option, value = "password", read_secret_file(value, field=name)
            if option in in_url:
                raise ConfigError(
                    f"{option} is also given in the URL; keep one of the two",
                    field=name,
                    source=_SOURCE,
                )
            (secrets if option in _SECRETS else query)[option] = value
            variables[option] = name
        found.append(_checked(_with_query(bare, query, secrets), where, variables))
    return found


def _with_query(url: str, query: Mapping[str, str], secrets: Mapping[str, str]) -> EnvBackendURL:
    if query:
        joiner = "&" if "?" in url else "?"
        url = url + joiner + urllib.parse.urlencode(sorted(query.items()))
    return EnvBackendURL(url, secrets)


def _checked(
    url: EnvBackendURL, where: str, variables: Mapping[str, str] | None = None
) -> EnvBackendURL:
    """``url`` once its backend accepts it (built, not connected), else a ConfigError
    naming the variable: the one holding the option at fault (``variables``, option
    to variable), else ``where``."""
    from registry_agent._plugins import open_backend  # the plugins import this module

    try:
        open_backend(url)
    except ConfigError as exc:
        option = (exc.field or "").removeprefix("backend").removeprefix(".")
        if option in (variables or {}):
            raise ConfigError(exc.reason, field=(variables or {})[option], source=_SOURCE) from None
        reason = f"{option}: {exc.reason}" if option else exc.reason
        raise ConfigError(reason, field=where, source=_SOURCE) from None
    except BackendNotFound as exc:
        raise ConfigError(exc.message, field=where, source=_SOURCE) from None
    return url


def _address(text: str, name: str, schemes: tuple[str, ...]) -> tuple[str, str]:
    """``(scheme, host:port)`` of ``[scheme://]host[:port]`` (scheme ``""`` if none)."""
    shown = _masked(text, _hidden(text))  # a user:password@ is not echoed
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    scheme = scheme.lower()
    if scheme and scheme not in schemes:
        raise ConfigError(
            f"expected host:port or {' or '.join(s + '://host:port' for s in schemes)}, "
            f"got {shown!r}",
            field=name,
            source=_SOURCE,
        )
    rest = rest.rstrip("/")
    if not rest or any(c in rest for c in "/?#@ "):
        raise ConfigError(f"expected host:port, got {shown!r}", field=name, source=_SOURCE)
    return scheme, rest


def _consul(addr: str, env: Mapping[str, str]) -> EnvBackendURL:
    for name, why in _CONSUL_UNSUPPORTED.items():
        if _get(env, name) is not None:
            raise ConfigError(why, field=name, source=_SOURCE)
    if _bool(env, "CONSUL_HTTP_SSL_VERIFY") is False:
        raise ConfigError(
            "turning TLS verification off is not supported; give the CA that signed "
            "the agent's certificate as CONSUL_CACERT",
            field="CONSUL_HTTP_SSL_VERIFY",
            source=_SOURCE,
        )
    scheme, hostport = _address(addr, "CONSUL_HTTP_ADDR", ("http", "https"))
    # As Consul's api package: CONSUL_HTTP_SSL=true makes it https, false changes nothing.
    if _bool(env, "CONSUL_HTTP_SSL"):
        scheme = "https"
    query: dict[str, str] = {}
    if scheme:
        query["scheme"] = scheme
    for name, option in (
        ("CONSUL_CACERT", "ca_file"),
        ("CONSUL_CLIENT_CERT", "cert_file"),
        ("CONSUL_CLIENT_KEY", "key_file"),
    ):
        if (value := _get(env, name)) is not None:
            query[option] = value
    secrets: dict[str, str] = {}
    token = _get(env, "CONSUL_HTTP_TOKEN")
    token_file = _get(env, "CONSUL_HTTP_TOKEN_FILE")
    # As the consul backend's own default: the token wins over the token file.
    if token is not None:
        secrets["token"] = token
    elif token_file is not None:
        query["token_file"] = token_file
    return _with_query(f"consul://{hostport}", query, secrets)


def _etcd(endpoints: str, env: Mapping[str, str]) -> EnvBackendURL:
    for name in sorted(env):
        known = name in _ETCD_MAPPED or name in _ETCD_HARMLESS
        if name.startswith("ETCDCTL_") and not known and _get(env, name) is not None:
            raise ConfigError(
                "the etcd backend has no such setting; unset it, or set "
                f"{ENV_BACKEND} to an etcd:// URL with the options you need",
                field=name,
                source=_SOURCE,
            )
    api = _get(env, "ETCDCTL_API")
    if api is not None and api != "3":
        raise ConfigError(
            f"expected 3 (etcd's v3 API), got {api!r}", field="ETCDCTL_API", source=_SOURCE
        )
    if _bool(env, "ETCDCTL_INSECURE_SKIP_TLS_VERIFY"):
        raise ConfigError(
            "skipping TLS verification is not supported; give the CA that signed the "
            "members' certificates as ETCDCTL_CACERT",
            field="ETCDCTL_INSECURE_SKIP_TLS_VERIFY",
            source=_SOURCE,
        )
    hosts: list[str] = []
    schemes: set[str] = set()
    for item in (part.strip() for part in endpoints.split(",")):
        if not item:
            continue
        scheme, hostport = _address(item, "ETCDCTL_ENDPOINTS", ("http", "https"))
        schemes.add(scheme or "http")
        hosts.append(hostport)
    if not hosts:
        raise ConfigError(
            f"expected host:port[,host:port…], got {endpoints!r}",
            field="ETCDCTL_ENDPOINTS",
            source=_SOURCE,
        )
    if len(schemes) > 1:
        raise ConfigError(
            "mixes http:// and https:// endpoints; give all members one scheme",
            field="ETCDCTL_ENDPOINTS",
            source=_SOURCE,
        )
    query: dict[str, str] = {}
    secrets: dict[str, str] = {}
    for name in ("ETCDCTL_CACERT", "ETCDCTL_CERT", "ETCDCTL_KEY", "ETCDCTL_COMMAND_TIMEOUT"):
        if (value := _get(env, name)) is not None:
            query[_ETCD_MAPPED[name]] = value
    if (value := _get(env, "ETCDCTL_KEEPALIVE_TIME")) is not None:
        query["keepalive_time"] = _keepalive_time(value)
    if (value := _get(env, "ETCDCTL_KEEPALIVE_TIMEOUT")) is not None:
        query["keepalive_timeout"] = value
    tls_files = any(option in query for option in ("ca_file", "cert_file", "key_file"))
    if ("https" in schemes or _bool(env, "ETCDCTL_INSECURE_TRANSPORT") is False) and not tls_files:
        query["tls"] = "true"  # TLS with the system CA store
    user = env.get("ETCDCTL_USER", "").strip() or None
    password = env.get("ETCDCTL_PASSWORD") or None
    if user is not None:
        name, colon, inline = user.partition(":")
        if colon and password is not None:
            raise ConfigError(
                "ETCDCTL_USER holds user:password and ETCDCTL_PASSWORD is set too; give one",
                field="ETCDCTL_PASSWORD",
                source=_SOURCE,
            )
        if not name:
            raise ConfigError(
                "expected user or user:password, got an empty user name",
                field="ETCDCTL_USER",
                source=_SOURCE,
            )
        query["user"] = name
        if colon:
            password = inline
    elif password is not None:
        raise ConfigError(
            "ETCDCTL_PASSWORD is set without ETCDCTL_USER", field="ETCDCTL_PASSWORD", source=_SOURCE
        )
    if password:
        secrets["password"] = password
    return _with_query(f"etcd://{','.join(hosts)}", query, secrets)


def _keepalive_time(value: str) -> str:
    """ETCDCTL_KEEPALIVE_TIME as the etcd backend takes it: under etcd's
    --grpc-keepalive-min-time (etcdctl's own default, 2s, is) it is raised to it,
    said once at INFO: pinging more often, a long watch would get GOAWAY."""
    try:
        seconds = parse_duration(value, field="ETCDCTL_KEEPALIVE_TIME")
    except ConfigError as exc:
        raise ConfigError(exc.reason, field=exc.field, source=_SOURCE) from None
    if not 0 < seconds < ETCD_KEEPALIVE_FLOOR:
        return value
    if value not in _raised_keepalives:
        _raised_keepalives.add(value)
        log.info(
            "ETCDCTL_KEEPALIVE_TIME=%s raised to %gs: etcd answers pings more frequent "
            "than its --grpc-keepalive-min-time (5s by default) with GOAWAY",
            value,
            ETCD_KEEPALIVE_FLOOR,
        )
    return f"{ETCD_KEEPALIVE_FLOOR:g}s"


def _etcd_variables(env: Mapping[str, str]) -> dict[str, str]:
    """The variable holding each option of the URL :func:`_etcd` builds."""
    variables = {option: name for name, option in _ETCD_MAPPED.items() if option}
    if _get(env, "ETCDCTL_PASSWORD") is None:
        variables["password"] = "ETCDCTL_USER"  # user:password, or none at all
    return variables


def backend_tables_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any] | list[Any]:
    """The backends the environment names as agent.toml would hold them: one
    ``[backend]`` table (``{"url": …, "token": …}``) or a list of ``[[backend]]``
    tables, the secrets as keys beside ``url``."""
    tables = [{"url": str(url), **carried_options(url)} for url in backends_from_env(environ)]
    return tables[0] if len(tables) == 1 else tables


def env_names_backend(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a variable naming a backend is set (``REGISTRY_AGENT_BACKEND``,
    ``CONSUL_HTTP_ADDR``, ``ETCDCTL_ENDPOINTS``)."""
    env = os.environ if environ is None else environ
    return any(_get(env, name) for name in (ENV_BACKEND, "CONSUL_HTTP_ADDR", "ETCDCTL_ENDPOINTS"))
