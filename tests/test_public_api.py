"""The public surface: complete, sorted, and every name documented."""

import inspect

import registry_agent


def test_all_is_sorted_and_complete() -> None:
    public = {name for name in vars(registry_agent) if not name.startswith("_")}
    exported = set(registry_agent.__all__) - {"__version__"}
    assert registry_agent.__all__ == sorted(registry_agent.__all__)
    assert exported == public - {"testing"}


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
