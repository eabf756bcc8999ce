"""A registrar that handled SIGTERM/SIGINT gives them back on stop: the handler that was
there before (a server's) gets the next signal, instead of SIG_DFL killing the process
while the server drains."""

from __future__ import annotations

import os
import signal
from types import FrameType

from registry_agent import AsyncRegistrar, ServiceInstance


async def test_stop_puts_the_previous_handlers_back() -> None:
    seen: list[int] = []

    def server_handler(sig: int, frame: FrameType | None) -> None:
        seen.append(sig)

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for sig in before:
            signal.signal(sig, server_handler)
        instance = ServiceInstance("orders", address="127.0.0.1", port=8080)
        registrar = AsyncRegistrar(
            "memory://signal-restore", instance, install_signal_handlers=True
        )
        await registrar.start(wait_registered=5)
        assert signal.getsignal(signal.SIGTERM) is not server_handler  # ours while running
        await registrar.stop()
        assert signal.getsignal(signal.SIGTERM) is server_handler
        assert signal.getsignal(signal.SIGINT) is server_handler
        os.kill(os.getpid(), signal.SIGTERM)  # reaches the server's handler, not SIG_DFL
        assert seen == [signal.SIGTERM]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
