"""``python -m bench.profiled_agent OUT.prof run -c FILE``: the agent under cProfile on demand.

SIGUSR1 starts profiling the event loop's thread (its CPU time), SIGUSR2 stops and writes
the stats to OUT.prof, so the capacity bench profiles the steady window only,
not start-up and registration. Profiling costs CPU: never measure through it.
"""

from __future__ import annotations

import cProfile
import runpy
import signal
import sys
import time
from types import FrameType


def main() -> None:
    out, sys.argv = sys.argv[1], ["registry-agent", *sys.argv[2:]]
    # CPU time of the loop's thread: wall time would count the idle wait in epoll.
    profile = cProfile.Profile(time.thread_time)

    def start(_sig: int, _frame: FrameType | None) -> None:
        profile.enable()

    def stop(_sig: int, _frame: FrameType | None) -> None:
        profile.disable()
        profile.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    runpy.run_module("registry_agent", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
