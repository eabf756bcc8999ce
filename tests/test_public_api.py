"""The public surface: complete, sorted, and every name documented."""

import inspect

import registry_agent


def test_all_is_sorted_and_complete() -> None:
    # Submodules (testing, backend) are public too, but not names of the package.
    public = {
        name
        for name, obj in vars(registry_agent).items()
        if not name.startswith("_") and not inspect.ismodule(obj)
    }
    exported = set(registry_agent.__all__) - {"__version__"}
    assert registry_agent.__all__ == sorted(registry_agent.__all__)
    assert exported == public


def test_every_public_name_has_a_docstring() -> None:
    for name in registry_agent.__all__:
        obj = getattr(registry_agent, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), name


def test_error_tree() -> None:
    from registry_agent import (
        BackendError,
        BackendNotFound,
        BackendUnavailable,
        ConfigError,
        LeaseLost,
        RegistryError,
        Rejected,
        RevisionCompacted,
    )

    for cls in (ConfigError, BackendNotFound, BackendError):
        assert issubclass(cls, RegistryError)
    for cls in (BackendUnavailable, LeaseLost, RevisionCompacted, Rejected):
        assert issubclass(cls, BackendError)
    err = LeaseLost("gone", backend="etcd", service="orders", instance="orders-1")
    assert str(err) == "gone (backend=etcd, service=orders, instance=orders-1)"


def test_the_backend_kit_is_sorted_documented_and_complete() -> None:
    import registry_agent.backend as kit

    public = {
        name
        for name, obj in vars(kit).items()
        if not name.startswith("_") and not inspect.ismodule(obj)
    }
    assert kit.__all__ == sorted(kit.__all__, key=lambda n: (not n.isupper(), n))
    assert set(kit.__all__) == public
    for name in kit.__all__:
        obj = getattr(kit, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), name


def test_the_backend_kit_names_what_the_shipped_backends_use() -> None:
    # Each shipped backend satisfies the protocols the kit declares.
    from registry_agent_consul import ConsulBackend
    from registry_agent_etcd import EtcdBackend

    from registry_agent.backend import Backend, ConnectionAware, TLSFiles, opt_duration

    for cls in (ConsulBackend, EtcdBackend):
        backend = cls()
        assert isinstance(backend, Backend)
        assert isinstance(backend, ConnectionAware)
    assert opt_duration("wait", "2s") == 2.0
    assert not TLSFiles().enabled


def test_a_kit_converter_names_the_backend_field() -> None:
    import pytest

    from registry_agent import ConfigError
    from registry_agent.backend import opt_choice, take_options

    with pytest.raises(ConfigError) as info:
        take_options("zk", {"mode": "fast"}, {"mode": opt_choice("safe", "quick")})
    assert info.value.field == "backend.mode"
    assert "expected one of safe, quick" in info.value.reason
