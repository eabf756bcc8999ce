"""RegistrationOptions: each default and each check written once, errors naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from registry_agent import AsyncRegistrar, ConfigError, Registrar, RetryPolicy, ServiceInstance
from registry_agent._health.gate import OnUnhealthy
from registry_agent._options import OPTION_KEYS, RegistrationOptions

INSTANCE = ServiceInstance("orders", address="127.0.0.1", port=8080)


def test_defaults() -> None:
    options = RegistrationOptions()
    assert options.ttl == 10.0
    assert options.heartbeat is None
    assert options.heartbeat_interval == pytest.approx(10 / 3)
    assert options.verify_interval == 10.0
    assert (options.fall, options.rise) == (3, 2)
    assert options.on_unhealthy is OnUnhealthy.DEREGISTER
    assert options.deregister_critical_after is None
    assert options.retry == RetryPolicy()


def test_values_are_normalised() -> None:
    options = RegistrationOptions.build({"ttl": 6, "on_unhealthy": "critical", "retry": None})
    assert isinstance(options.ttl, float)
    assert options.heartbeat_interval == 2.0
    assert options.on_unhealthy is OnUnhealthy.CRITICAL
    assert options.retry == RetryPolicy()


@pytest.mark.parametrize(
    ("args", "field", "words"),
    [
        ({"ttl": 0.5}, "ttl", "at least 1s"),
        ({"ttl": True}, "ttl", "number of seconds"),
        ({"ttl": float("nan")}, "ttl", "number of seconds"),
        ({"ttl": "10"}, "ttl", "number of seconds"),
        ({"heartbeat": 0.1}, "heartbeat", "at least 0.25s"),
        ({"ttl": 3, "heartbeat": 1.5}, "heartbeat", "at most ttl/3"),
        ({"fall": 0}, "fall", ">= 1"),
        ({"rise": 1.5}, "rise", ">= 1"),
        ({"rise": True}, "rise", ">= 1"),
        ({"on_unhealthy": "panic"}, "on_unhealthy", '"deregister" or "critical"'),
        ({"deregister_critical_after": 0}, "deregister_critical_after", "above zero"),
        ({"deregister_critical_after": -5}, "deregister_critical_after", "at least"),
        # Ceilings: what the registries refuse anyway, on every retry (a break-it run).
        ({"ttl": 86401}, "ttl", "at most 86400s (a day), got 86401s"),
        ({"ttl": 1e300}, "ttl", "at most 86400s"),
        ({"deregister_critical_after": 4e7}, "deregister_critical_after", "31536000s (a year)"),
        ({"retry": 3}, "retry", "RetryPolicy"),
        ({"tll": 5}, "tll", "unknown option"),
    ],
)
def test_bad_values_name_the_field(args: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        RegistrationOptions.build(args)
    assert info.value.field == field
    assert words in info.value.reason


def test_no_backend_floor_here() -> None:
    # Consul's 60 s floor is the Consul backend's rule; etcd has none.
    assert RegistrationOptions(deregister_critical_after=10).deregister_critical_after == 10.0


def test_from_mapping_parses_durations_and_names_fields_under_a_prefix() -> None:
    table = {"ttl": "6s", "heartbeat": "500ms", "fall": 2, "deregister_critical_after": "2m"}
    options = RegistrationOptions.from_mapping(table, field_prefix="service[3]")
    assert (options.ttl, options.heartbeat, options.fall) == (6.0, 0.5, 2)
    assert options.deregister_critical_after == 120.0
    for bad, field in (
        ({"ttl": "0.5s"}, "service[3].ttl"),
        ({"ttl": "soon"}, "service[3].ttl"),
        ({"ttl": "3s", "heartbeat": "2s"}, "service[3].heartbeat"),
        ({"colour": "red"}, "service[3].colour"),
        ({"retry": 1}, "service[3].retry"),
    ):
        with pytest.raises(ConfigError) as info:
            RegistrationOptions.from_mapping(bad, field_prefix="service[3]")
        assert info.value.field == field, bad
        assert str(info.value).startswith(f"{field}: ")


def test_replace_validates_again() -> None:
    options = RegistrationOptions(ttl=6)
    assert options.replace(fall=5).fall == 5
    with pytest.raises(ConfigError) as info:
        options.replace(heartbeat=4)
    assert info.value.field == "heartbeat"


def test_option_keys_match_the_dataclass() -> None:
    assert set(RegistrationOptions.__dataclass_fields__) == OPTION_KEYS


def test_registrars_take_the_options_and_keywords_override_them() -> None:
    base = RegistrationOptions(ttl=6, fall=4)
    reg = AsyncRegistrar("memory://options", INSTANCE, options=base, rise=5)
    assert reg.options == base.replace(rise=5)
    assert (reg.ttl, reg.heartbeat_interval, reg.gate.fall, reg.gate.rise) == (6.0, 2.0, 4, 5)
    blocking = Registrar("memory://options", INSTANCE, ttl=3, on_unhealthy="critical")
    assert blocking._async.options == RegistrationOptions(ttl=3, on_unhealthy=OnUnhealthy.CRITICAL)


def test_registrar_names_an_unknown_keyword() -> None:
    with pytest.raises(ConfigError) as info:
        AsyncRegistrar("memory://options", INSTANCE, tll=5)  # type: ignore[call-arg]
    assert info.value.field == "tll"


def test_checks_of_one_name_say_how_to_name_them() -> None:
    # A break-it run: two `command = ["sh", "-c", …]` checks were refused as
    # "check names must be unique, got ['command sh', 'command sh']", with no word of
    # the `name` key that fixes it.
    from registry_agent import CommandCheck

    checks = [CommandCheck(["sh", "-c", "true"]), CommandCheck(["sh", "-c", "exit 0"])]
    with pytest.raises(ConfigError) as info:
        AsyncRegistrar("memory://names", INSTANCE, checks=checks)
    assert info.value.field == "checks"
    assert 'name = "…"' in info.value.reason
    assert "['command sh', 'command sh']" in info.value.reason
