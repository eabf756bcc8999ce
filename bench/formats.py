"""What speaking the peers' formats costs: per-entry encode/decode, and a merged view.

Pure CPU, no server: the figures say how much a watch of N entries pays per
entry in each etcd format and for each Consul flavor's payload (Consul's
reader tries every peer's rules on every entry), and what a merged view over
two registries pays for a first read of 10,000 instances and for one change.

``python -m bench.formats [--quick]``
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from registry_agent_consul._flavors import FLAVORS, read_written, write_entry
from registry_agent_etcd._formats import load_format

from bench.common import table
from registry_agent import HealthStatus, InstanceHealth, ServiceInstance
from registry_agent._events import InstanceMap, MergedView


def per_call(fn: Callable[[], object], n: int) -> float:
    """Microseconds per call of ``fn``, best of three batches of ``n``."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - started)
    return best / n * 1e6


def instance(i: int) -> ServiceInstance:
    return ServiceInstance(
        "orders",
        address=f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}",
        port=9000,
        scheme="grpc",
        version="v1.4.0",
        meta={"zone": "eu-1", "weight": "3"},
    )


def etcd_rows(n: int) -> list[tuple[str, ...]]:
    rows = []
    inst = instance(7)
    for name in ("registry-agent", "go-zero", "kratos", "go-micro"):
        fmt = load_format(name)
        entry = fmt.entry_id(inst)
        value = fmt.encode(inst, HealthStatus.PASSING, "")
        encode = per_call(lambda fmt=fmt: fmt.encode(inst, HealthStatus.PASSING, ""), n)
        decode = per_call(lambda fmt=fmt, e=entry, v=value: fmt.decode("orders", e, v), n)
        rows.append(
            (f"etcd format={name}", f"{len(value)} B", f"{encode:.1f} µs", f"{decode:.1f} µs")
        )
    return rows


def consul_rows(n: int) -> list[tuple[str, ...]]:
    rows = []
    inst = instance(7)
    for flavor in FLAVORS:
        payload = write_entry(inst, flavor)
        encode = per_call(lambda f=flavor: write_entry(inst, f), n)
        decode = per_call(lambda p=payload: read_written(p), n)
        rows.append((f"Consul flavor={flavor}", "", f"{encode:.1f} µs", f"{decode:.1f} µs"))
    return rows


def merged_rows(count: int) -> list[tuple[str, ...]]:
    first = {f"c{i}": InstanceHealth(instance(i)) for i in range(count)}
    # The second registry holds the same endpoints under other ids (a peer's format).
    second = {
        f"e{i}": InstanceHealth(ServiceInstance("orders", address=instance(i).address, port=9000))
        for i in range(count)
    }
    view = MergedView(2)
    started = time.perf_counter()
    view.apply(0, InstanceMap(first))
    held = InstanceMap(second)
    view.apply(1, held)
    first_read = time.perf_counter() - started
    # A watch hands over an evolved map, which says which ids changed.
    changed = held.evolve({"e5": InstanceHealth(second["e5"].instance, HealthStatus.CRITICAL)})
    started = time.perf_counter()
    view.apply(1, changed)
    one_change = time.perf_counter() - started
    return [
        (
            f"merged view, 2 registries x {count:,}",
            "",
            f"first read {first_read * 1e3:.0f} ms",
            f"one change {one_change * 1e6:.0f} µs",
        )
    ]


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    n = 2_000 if quick else 20_000
    rows = etcd_rows(n) + consul_rows(n) + merged_rows(2_000 if quick else 10_000)
    print(table(rows, ["what", "value", "encode / first read", "decode / one change"]))


if __name__ == "__main__":
    main(sys.argv[1:])
