"""Backend URLs, options and durations."""

import pytest

from registry_agent import ConfigError
from registry_agent._urls import parse_backend_url, parse_duration


def test_parse_full_url() -> None:
    url = parse_backend_url("etcd://u:p%40ss@10.0.0.1:2379,[::1]:2380/x?prefix=/s", default_port=1)
    assert url.scheme == "etcd"
    assert url.endpoints == (("10.0.0.1", 2379), ("::1", 2380))
    assert (url.username, url.password) == ("u", "p@ss")
    assert url.query == {"prefix": "/s"}
    assert url.redacted() == "etcd://10.0.0.1:2379,[::1]:2380/x"


def test_default_port_and_empty_host_list() -> None:
    assert parse_backend_url("consul://agent", default_port=8500).endpoints == (("agent", 8500),)
    assert parse_backend_url("memory://", default_port=0).endpoints == ()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("127.0.0.1:8500", "expected a URL like"),
        ("consul://h:port", "expected a port 1-65535"),
        ("consul://h:0", "expected a port 1-65535"),
        ("consul://h:70000", "expected a port 1-65535"),
        ("consul://:8500", "missing host"),
        ("etcd://::1:2379", "IPv6 addresses need brackets"),
        ("etcd://u:p@[::1:2379", "an IPv6 address in brackets"),  # a break-it run: exit 1
        ("etcd://[::1]x:2379", "an IPv6 address in brackets"),
        ("1bad://h:1", "invalid URL scheme"),
        ("consul://h:1?token=a&token=b", "given twice"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_backend_url(url, default_port=None)
    assert expected in str(info.value)
    assert info.value.field == "backend"


def test_errors_never_show_credentials_or_query() -> None:
    with pytest.raises(ConfigError) as info:
        parse_backend_url("etcd://user:hunter2@h:bad?token=s3cret", default_port=None)
    assert "hunter2" not in str(info.value)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("500ms", 0.5),
        ("1.5m", 90.0),
        ("2h", 7200.0),
        ("3", 3.0),
        (2, 2.0),
        (0.25, 0.25),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, field="ttl") == seconds


@pytest.mark.parametrize("bad", ["10 sec", "-1s", "", "s", True, None, [1]])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(bad, field="service[0].ttl")
    assert info.value.field == "service[0].ttl"
