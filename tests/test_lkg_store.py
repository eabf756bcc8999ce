"""The last-known-good store: round trip, atomic writes, forgiving loads, permissions, names."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from registry_agent import ConfigError, HealthStatus, InstanceHealth, ServiceInstance
from registry_agent._lkg import (
    FORMAT,
    VERSION,
    LastKnownGood,
    LastKnownGoodStore,
    file_name,
)


def healths(n: int, service: str = "orders") -> list[InstanceHealth]:
    statuses = [HealthStatus.PASSING, HealthStatus.WARNING, HealthStatus.CRITICAL]
    return [
        InstanceHealth(
            ServiceInstance(
                service=service,
                address="127.0.0.1",
                port=9000 + i,
                id=f"{service}-{i}",
                tags=("v2", f"t{i}"),
                meta={"zone": "eu-1a", "weight": "3"},
                scheme="http",
                version="1.2.3",
            ),
            statuses[i % 3],
            note=f"check output {i}",
        )
        for i in range(n)
    ]


def test_round_trip_keeps_instances_health_and_time(tmp_path: Path) -> None:
    store = LastKnownGoodStore(tmp_path / "lkg")
    saved = healths(3)
    # As read from a registry: another tool's entry (an id with ':', no port) and a node.
    peer = ServiceInstance.from_registry(
        service="orders", id="peer:1", address="10.0.0.9", port=0, node="n1", meta={"w": "x"}
    )
    saved.append(InstanceHealth(peer, HealthStatus.PASSING))
    before = time.time()
    path = store.save("orders", saved)
    loaded = store.load("orders")
    assert loaded is not None
    assert loaded.path == path == store.path_for("orders")
    assert loaded.service == "orders"
    assert list(loaded.instances) == saved  # instance fields and status (note is not compared)
    assert [h.instance.node for h in loaded.instances] == ["", "", "", "n1"]
    assert [h.instance.meta["weight"] for h in loaded.instances[:3]] == ["3"] * 3
    assert before - 1 <= loaded.saved_at <= time.time() + 1
    assert loaded.saved_at_text.endswith("Z")
    assert 0 <= loaded.age() < 60


def test_empty_set_is_saved_and_loaded_as_a_fact(tmp_path: Path) -> None:
    store = LastKnownGoodStore(tmp_path)
    store.save("orders", [])
    loaded = store.load("orders")
    assert loaded is not None
    assert loaded.instances == ()


def test_missing_file_is_none_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert LastKnownGoodStore(tmp_path / "nothing-here").load("orders") is None
    assert caplog.records == []


def test_file_holds_only_instances_and_their_status(tmp_path: Path) -> None:
    store = LastKnownGoodStore(tmp_path)
    path = store.save("orders", healths(2), now=1_790_000_000.0)
    document = json.loads(path.read_text())
    assert set(document) == {"format", "version", "service", "saved_at", "instances"}
    assert document["format"] == FORMAT
    assert document["version"] == VERSION
    assert document["saved_at"] == "2026-09-21T14:13:20Z"
    assert all(set(entry) == {"instance", "status"} for entry in document["instances"])
    assert "check output" not in path.read_text()  # a check's output is not kept


def test_later_save_replaces_the_set(tmp_path: Path) -> None:
    store = LastKnownGoodStore(tmp_path)
    store.save("orders", healths(3))
    store.save("orders", healths(1))
    loaded = store.load("orders")
    assert loaded is not None
    assert len(loaded.instances) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [file_name("orders")]  # no leftovers


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LastKnownGoodStore(tmp_path)
    store.save("orders", healths(2))

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        store.save("orders", healths(5))
    monkeypatch.undo()
    loaded = store.load("orders")
    assert loaded is not None
    assert len(loaded.instances) == 2
    assert [p.name for p in tmp_path.iterdir()] == [file_name("orders")]


def test_concurrent_writers_and_readers_only_ever_see_whole_sets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Two writers (as two processes sharing the directory would) and a reader, bounded.
    sizes = (1, 40)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(size: int) -> None:
        store = LastKnownGoodStore(tmp_path)
        try:
            for _ in range(150):
                store.save("orders", healths(size))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    reader_store = LastKnownGoodStore(tmp_path)
    seen: list[int] = []
    reader_store.save("orders", healths(sizes[0]))
    threads = [threading.Thread(target=writer, args=(size,)) for size in sizes]
    with caplog.at_level(logging.WARNING, logger="registry_agent"):
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            loaded = reader_store.load("orders")
            assert loaded is not None
            seen.append(len(loaded.instances))
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not errors
    assert set(seen) <= set(sizes)
    assert len(seen) > 10
    assert caplog.records == []  # never a half-written file
    assert [p.name for p in tmp_path.iterdir()] == [file_name("orders")]


def test_directory_is_created_0700_whatever_the_umask(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b" / "lkg"
    old = os.umask(0)
    try:
        path = LastKnownGoodStore(directory).save("orders", healths(1))
    finally:
        os.umask(old)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_existing_directory_is_left_as_it_is_and_an_open_one_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    os.chmod(directory, 0o777)
    store = LastKnownGoodStore(directory)
    with caplog.at_level(logging.WARNING, logger="registry_agent"):
        store.save("orders", healths(1))
        store.save("orders", healths(2))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o777
    warnings = [r for r in caplog.records if "writable by other users" in r.getMessage()]
    assert len(warnings) == 1  # once, not per save


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x00\xff garbage", "not UTF-8"),
        (b'{"format": "registry-agent/last-known-good", "vers', "not valid JSON"),
        (b"[1, 2, 3]", "not a last-known-good file"),
        (b'{"format": "something-else", "version": 1}', "not a last-known-good file"),
        (
            json.dumps(
                {"format": FORMAT, "version": 99, "service": "orders", "saved_at": "", "x": 1}
            ).encode(),
            "version 99",
        ),
        (
            json.dumps(
                {
                    "format": FORMAT,
                    "version": 1,
                    "service": "orders",
                    "saved_at": "yesterday",
                    "instances": [],
                }
            ).encode(),
            "saved_at",
        ),
        (
            json.dumps(
                {
                    "format": FORMAT,
                    "version": 1,
                    "service": "orders",
                    "saved_at": "2026-01-01T00:00:00Z",
                    "instances": [{"instance": {"service": "orders", "id": "x"}, "status": "ok"}],
                }
            ).encode(),
            "instances[0].status",
        ),
        (
            json.dumps(
                {
                    "format": FORMAT,
                    "version": 1,
                    "service": "orders",
                    "saved_at": "2026-01-01T00:00:00Z",
                    "instances": [
                        {
                            "instance": {"service": "orders", "id": "x", "port": "80"},
                            "status": "passing",
                        }
                    ],
                }
            ).encode(),
            "instances[0] is not a valid instance",
        ),
    ],
)
def test_corrupt_or_foreign_file_is_a_warning_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, why: str
) -> None:
    store = LastKnownGoodStore(tmp_path)
    store.path_for("orders").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="registry_agent"):
        assert store.load("orders") is None
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert why in record.getMessage()
    assert str(store.path_for("orders")) in record.getMessage()


def test_another_services_file_copied_in_is_foreign(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LastKnownGoodStore(tmp_path)
    store.save("payments", healths(2, "payments"))
    store.path_for("payments").rename(store.path_for("orders"))
    with caplog.at_level(logging.WARNING, logger="registry_agent"):
        assert store.load("orders") is None
    assert "holds service 'payments', not 'orders'" in caplog.text


def test_unreadable_entries_are_warnings_not_crashes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LastKnownGoodStore(tmp_path)
    store.path_for("orders").mkdir()  # a directory where the file should be
    (tmp_path / "elsewhere.json").write_text("{}")
    store.path_for("payments").symlink_to(tmp_path / "elsewhere.json")  # not followed
    with caplog.at_level(logging.WARNING, logger="registry_agent"):
        assert store.load("orders") is None
        assert store.load("payments") is None
    assert len(caplog.records) == 2
    assert all("cannot be read" in r.getMessage() for r in caplog.records)


def test_oversized_file_is_not_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("registry_agent._lkg.MAX_FILE_BYTES", 1000)
    store = LastKnownGoodStore(tmp_path)
    store.save("orders", healths(20))
    with caplog.at_level(logging.WARNING, logger="registry_agent"):
        assert store.load("orders") is None
    assert "larger than 1000 bytes" in caplog.text


def test_file_names_are_safe_distinct_and_readable() -> None:
    names = ["orders", "Orders", "ORDERS", "a.b", "a_b", "a-b", ".", "..", "x" * 256, "_"]
    files = [file_name(n) for n in names]
    assert len(set(files)) == len(files)
    assert len({f.lower() for f in files}) == len(files)  # case-insensitive file systems
    for name in files:
        assert "/" not in name
        assert "\\" not in name
        assert not name.startswith(".")
        assert name.endswith(".json")
        assert len(name.encode()) <= 255
    assert file_name("orders").startswith("orders.")
    assert file_name("orders") == file_name("orders")  # stable across runs


def test_services_with_related_names_keep_their_own_sets(tmp_path: Path) -> None:
    store = LastKnownGoodStore(tmp_path)
    store.save("Orders", healths(1, "Orders"))
    store.save("orders", healths(2, "orders"))
    upper, lower = store.load("Orders"), store.load("orders")
    assert upper is not None
    assert lower is not None
    assert (len(upper.instances), len(lower.instances)) == (1, 2)


def test_bad_configuration_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for directory in (a_file, 42, b"/tmp/x", ""):
        with pytest.raises(ConfigError) as caught:
            LastKnownGood(directory)  # type: ignore[arg-type]
        assert caught.value.field == "last_known_good"
    for max_age in (0, -1, "5", float("nan"), float("inf"), True):
        with pytest.raises(ConfigError) as caught:
            LastKnownGood(tmp_path, max_age=max_age)  # type: ignore[arg-type]
        assert caught.value.field == "last_known_good_max_age"
    assert LastKnownGood(tmp_path, max_age=30).max_age == 30.0
    assert LastKnownGood(str(tmp_path)).max_age is None


def document(service: str = "orders", **changes: object) -> dict[str, object]:
    data: dict[str, object] = {
        "format": FORMAT,
        "version": VERSION,
        "service": service,
        "saved_at": "2026-01-01T00:00:00Z",
        "instances": [
            {
                "instance": {"service": service, "id": "a", "address": "127.0.0.1", "port": 80},
                "status": "passing",
            }
        ],
    }
    data.update(changes)
    return data


@pytest.mark.parametrize(
    "content",
    [
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps(document(instances=[{"instance": "x" * 10, "status": "passing"}])).encode(),
        # Deep inside an instance's meta: parsed, then refused while decoding.
        b'{"format": "registry-agent/last-known-good", "version": 1, "service": "orders", '
        b'"saved_at": "2026-01-01T00:00:00Z", "instances": [{"status": "passing", "instance": '
        b'{"service": "orders", "id": "a", "port": 80, "meta": '
        + b'{"k": ' * 50_000
        + b"1"
        + b"}" * 50_000
        + b"}}]}",
    ],
    ids=["deep-list", "instance-not-object", "deep-meta"],
)
def test_a_hostile_file_is_a_warning_every_time_never_an_exception(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    store = LastKnownGoodStore(tmp_path)
    store.path_for("orders").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="registry_agent"):
        for _ in range(3):
            assert store.load("orders") is None
    assert len(caplog.records) == 3
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert all(str(store.path_for("orders")) in r.getMessage() for r in caplog.records)


def test_a_fifo_in_place_of_the_file_is_refused_without_blocking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LastKnownGoodStore(tmp_path)
    os.mkfifo(store.path_for("orders"))
    outcome: list[object] = []
    with caplog.at_level(logging.WARNING, logger="registry_agent"):
        reader = threading.Thread(target=lambda: outcome.append(store.load("orders")), daemon=True)
        reader.start()
        reader.join(5.0)  # generous: it returns at once; a blocked open() never would
        assert not reader.is_alive(), "load() blocked on a FIFO"
    assert outcome == [None]
    (record,) = caplog.records
    assert "not a regular file (a FIFO)" in record.getMessage()


def test_a_directory_in_place_of_the_file_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LastKnownGoodStore(tmp_path)
    store.path_for("orders").mkdir()
    with caplog.at_level(logging.WARNING, logger="registry_agent"):
        assert store.load("orders") is None
    (record,) = caplog.records
    assert "not a regular file (a directory)" in record.getMessage()


def test_a_saved_at_in_the_future_is_invalid_beyond_a_clock_skew(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LastKnownGoodStore(tmp_path)
    path = store.path_for("orders")
    ahead = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    path.write_text(json.dumps(document(saved_at=ahead)))
    with caplog.at_level(logging.WARNING, logger="registry_agent"):
        assert store.load("orders") is None
    (record,) = caplog.records
    assert "ahead of this clock" in record.getMessage()
    slightly = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
    path.write_text(json.dumps(document(saved_at=slightly)))
    saved = store.load("orders")  # within the clock skew allowed: used, age 0
    assert saved is not None
    assert saved.age() == 0.0


def test_duplicates_count_once_and_a_non_utc_offset_is_read(tmp_path: Path) -> None:
    store = LastKnownGoodStore(tmp_path)
    entry = {
        "instance": {"service": "orders", "id": "a", "address": "127.0.0.1", "port": 80},
        "status": "passing",
    }
    other = {
        "instance": {"service": "orders", "id": "b", "address": "127.0.0.1", "port": 0},
        "status": "passing",
    }
    store.path_for("orders").write_text(
        json.dumps(
            document(instances=[entry, entry, other, entry], saved_at="2026-01-01T05:00:00+05:00")
        )
    )
    saved = store.load("orders")
    assert saved is not None
    assert [h.instance.id for h in saved.instances] == ["a", "b"]
    assert saved.saved_at_text == "2026-01-01T00:00:00Z"


def test_unreachable_is_an_outage_not_a_refusal_or_a_tls_failure() -> None:
    import ssl

    from registry_agent import BackendUnavailable, Rejected, Throttled
    from registry_agent._errors import BackendError, LeaseLost
    from registry_agent._lkg import unreachable

    assert unreachable(None)  # no answer at all
    assert unreachable(BackendUnavailable("Consul agent at http://x unreachable: refused"))
    assert unreachable(Throttled("Consul answered 503"))
    assert unreachable(BackendUnavailable("Consul answered 500: boom"))
    assert not unreachable(Rejected("permission denied for service 'orders'"))
    assert not unreachable(BackendError("something else"))
    assert not unreachable(LeaseLost("gone"))
    assert not unreachable(BackendUnavailable("TLS with Consul agent at https://x failed: ..."))
    wrapped = BackendUnavailable("watch failed: SSLCertVerificationError")
    wrapped.__cause__ = ssl.SSLCertVerificationError("certificate verify failed")
    assert not unreachable(wrapped)
