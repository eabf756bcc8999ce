"""Living inside apps (issue 15): what a caller sees while a server starts and stops,
live updates, and what the in-process metrics and the advertised address cost.

* Shutdown order and gaps under the real servers (uvicorn, its --workers supervisor,
  gunicorn with workers, flask run, Django runserver) and live updates: the
  integration tests that measure them, run ``rounds`` times on 2 workers; each
  measured figure's median and worst over every run.
* ``RegistryCollector``: one scrape of N registrars (memory backend, registered),
  and the collector's memory per registrar.
* ``advertised_address()``: the default-route lookup, per call.

``python -m bench.inside_apps [--quick]``
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import tracemalloc
from collections import defaultdict

from prometheus_client import CollectorRegistry, generate_latest

from bench.common import log, run_measured_tests, table
from registry_agent import AsyncRegistrar, RegistryCollector, ServiceInstance, advertised_address

TESTS = (
    "test_starlette_uvicorn.py",
    "test_gunicorn_registration.py",
    "test_flask_server.py",
    "test_django_server.py",
    "test_live_update.py",
)


def measured_rows(rounds: int) -> list[list[str]]:
    samples: dict[tuple[str, str], list[float]] = defaultdict(list)
    failed: list[str] = []
    for i in range(rounds):
        log(f"framework and live-update tests, round {i + 1} of {rounds}")
        for result in run_measured_tests(*TESTS):
            if not result.passed:
                failed.append(result.name)
            for what, seconds in result.measured:
                samples[(result.name, what)].append(seconds)
    rows = [
        [name, what, str(len(v)), f"{statistics.median(v):.3f} s", f"{max(v):.3f} s"]
        for (name, what), v in sorted(samples.items())
    ]
    if failed:
        rows.append(["(failed runs)", ", ".join(sorted(set(failed))), "", "", ""])
    return rows


async def _registered(n: int) -> list[AsyncRegistrar]:
    registrars = [
        AsyncRegistrar(
            "memory://bench-collector",
            ServiceInstance(f"svc{i % 50}", address="10.0.0.5", port=1024 + i),
        )
        for i in range(n)
    ]
    await asyncio.gather(*(r.start(wait_registered=30) for r in registrars))
    return registrars


def collector_rows(sizes: tuple[int, ...]) -> list[list[str]]:
    rows = []
    for n in sizes:

        async def measure(n: int = n) -> list[str]:
            registrars = await _registered(n)
            tracemalloc.start()
            registry = CollectorRegistry()
            collector = RegistryCollector(registrars, registry=registry)
            held = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            times = []
            for _ in range(5):
                started = time.perf_counter()
                size = len(generate_latest(registry))
                times.append(time.perf_counter() - started)
            registry.unregister(collector)
            await asyncio.gather(*(r.stop() for r in registrars))
            return [
                f"scrape of {n} registrars",
                f"{statistics.median(times) * 1000:.1f} ms",
                f"{max(times) * 1000:.1f} ms",
                f"{size / 1024:.0f} KiB exposition, collector holds {held / n:.0f} B/registrar",
            ]

        rows.append(asyncio.run(measure()))
    return rows


def address_row() -> list[str]:
    n = 2000
    started = time.perf_counter()
    for _ in range(n):
        advertised_address()
    per = (time.perf_counter() - started) / n
    return ["advertised_address() (default route)", f"{per * 1e6:.0f} µs", "", advertised_address()]


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    print("## Inside apps: shutdown order, gaps, live updates (real servers)\n")
    print(
        table(
            measured_rows(1 if quick else 3),
            ["test", "measured", "n", "median", "worst"],
        )
    )
    print("\n## In-process metrics and the advertised address (CPU only)\n")
    rows = [*collector_rows((100,) if quick else (100, 1000)), address_row()]
    print(table(rows, ["what", "median", "worst", "note"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
