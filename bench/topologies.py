"""Clusters and partitions: recovery times from the topology tests, over repeated runs.

Runs integration/test_cluster_etcd.py, test_cluster_consul.py and
test_partitions.py (3 etcd members; 3 Consul servers and a client agent;
test hosts in network namespaces) several times and reports, per measured
step, the median and the worst run.
"""

from __future__ import annotations

import statistics

from bench.common import log, run_measured_tests

FILES = ("test_cluster_etcd.py", "test_cluster_consul.py", "test_partitions.py")


def run(quick: bool) -> list[list[str]]:
    trials = 1 if quick else 3
    log(f"topologies: {', '.join(FILES)} x {trials}")
    seen: dict[tuple[str, str], list[float]] = {}
    failed: dict[str, str] = {}
    for _ in range(trials):
        for case in run_measured_tests(*FILES):
            if not case.passed:
                failed[case.name] = case.why
            for label, seconds in case.measured:
                seen.setdefault((case.name, label), []).append(seconds)
    rows = [
        [
            name.removeprefix("test_").replace("_", " "),
            label,
            f"{statistics.median(values):.2f} s",
            f"{max(values):.2f} s",
            f"{len(values)}",
        ]
        for (name, label), values in sorted(seen.items())
    ]
    rows += [[name, f"FAILED: {why}", "-", "-", "-"] for name, why in sorted(failed.items())]
    return rows
