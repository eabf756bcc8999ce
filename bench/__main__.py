"""python -m bench [--quick]: every figure of DESIGN §8 and the §6 fault matrix, as tables.

``python -m bench soak [--minutes 10] [--seed N]``: the chaos soak (see bench/soak.py).
"""

from __future__ import annotations

import logging
import platform
import sys
import time

from bench import capacity, faults, propagation, recovery, topologies, watch_scale
from bench.common import table


def main() -> int:
    if sys.argv[1:2] == ["soak"]:
        from bench import soak

        return soak.main(sys.argv[2:])
    quick = "--quick" in sys.argv
    # The registrars' own warnings (restarts are the point here) would drown the tables.
    logging.basicConfig(level=logging.ERROR)
    started = time.monotonic()
    print(f"# registry-agent benchmarks ({'quick' if quick else 'full'} run)\n")
    print(
        f"machine: {platform.machine()}, {platform.python_implementation()} "
        f"{platform.python_version()}, {sys.platform}; servers: Consul 1.8.7 -dev, etcd 3.5.16\n"
    )
    rows = propagation.run(quick) + recovery.run(quick)
    cap_rows, cap_details = capacity.run(quick)
    scale_rows, scale_details = watch_scale.run(quick)
    print("## Figures (median and p95 over the trials; goals from DESIGN §8)\n")
    print(table([r.cells() for r in rows + cap_rows + scale_rows]))
    print("\n## Capacity: one agent process, TTL 10 s, no checks (floor: raw client)\n")
    print(table(cap_details, capacity.SUMMARY_HEADER))
    print("\n## Watch scale: one service\n")
    print(table(scale_details, ["backend", "instances", "initial snapshot", "watcher memory"]))
    print("\n## Fault matrix (DESIGN §6, real servers)\n")
    print(table(faults.run(), ["scenario", "consul", "etcd"]))
    print("\n## Clusters and partitions (integration topology tests, repeated)\n")
    print(table(topologies.run(quick), ["scenario", "step", "median", "worst", "runs"]))
    print(f"\ntotal time: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
