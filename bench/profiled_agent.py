"""``python -m bench.profiled_agent OUT run -c FILE``: the agent under cProfile, phase by phase.

Profiling starts with the process. SIGUSR2 stops it and writes the stats of
the phase to ``OUT.1``, ``OUT.2``, ... in turn; SIGUSR1 starts a fresh one. The
capacity bench uses it to profile registration, the steady window and the
recovery after a wipe separately. It times the CPU of the event loop's thread
(wall time would count the idle wait in epoll). Profiling costs CPU: never
measure through it.
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
    current = [cProfile.Profile(time.thread_time)]
    written = [0]

    def start(_sig: int, _frame: FrameType | None) -> None:
        current[0] = cProfile.Profile(time.thread_time)
        current[0].enable()

    def stop(_sig: int, _frame: FrameType | None) -> None:
        current[0].disable()
        written[0] += 1
        current[0].dump_stats(f"{out}.{written[0]}")

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    current[0].enable()
    runpy.run_module("registry_agent", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
