"""The fault matrix: every DESIGN §6 scenario x both backends, pass/fail and recovery time.

It runs the integration tests that reproduce each scenario on real servers
(integration/test_healing.py) and reads their results and measured times from
pytest's JUnit report: one set of scenarios, tested and benchmarked alike.
"""

from __future__ import annotations

import re

from bench.common import log, run_measured_tests

SCENARIOS = [
    ("1. registry restarted empty", "test_registry_restarted_empty"),
    ("2. registry down longer than the TTL", "test_registry_down_longer_than_ttl"),
    ("3. registry unreachable at startup", "test_registry_unreachable_at_startup"),
    ("4. process frozen past the TTL", "test_process_frozen_past_ttl"),
    ("5. entry deleted by someone else", "test_entry_deleted_by_someone_else_is_repaired"),
    ("6. health fails, then recovers", "test_health_fails_then_recovers"),
    ("7. flapping health", "test_flapping_health_causes_no_storm"),
    ("8. SIGTERM / stop()", "test_sigterm_deregisters_before_exit"),
    ("8. stop() with a frozen registry", "test_stop_is_bounded_when_the_registry_hangs"),
    ("9. kill -9", "test_kill_9_gone_within_ttl"),
    ("10. garbage under our prefix", "test_garbage_under_our_prefix_changes_nothing"),
]


def run() -> list[list[str]]:
    log("fault matrix: integration/test_healing.py on real Consul and etcd")
    results: dict[tuple[str, str], list[str]] = {}
    passed: dict[tuple[str, str], bool] = {}
    for case in run_measured_tests("test_healing.py"):
        match = re.fullmatch(r"(test_\w+?)\[(consul|etcd)(?:-(\w+))?\]", case.name)
        if not match:
            continue
        name, backend, _variant = match.groups()
        key = (name, backend)
        passed[key] = passed.get(key, True) and case.passed
        for label, seconds in case.measured:
            results.setdefault(key, []).append(f"{label} {seconds:.2f}s")
    rows = []
    for title, name in SCENARIOS:
        row = [title]
        for backend in ("consul", "etcd"):
            key = (name, backend)
            if key not in passed:
                row.append("not run")
                continue
            measured = "; ".join(results.get(key, [])) or "-"
            row.append(("pass" if passed[key] else "FAIL") + f" ({measured})")
        rows.append(row)
    return rows
