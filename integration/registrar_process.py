"""A service process that registers itself, for tests that signal or freeze a whole process.

Usage: python registrar_process.py BACKEND_URL PORT TTL
Prints "registered" once in the registry, then idles until a signal ends it.
"""

import sys
import time

from registry_agent import Registrar, RetryPolicy, ServiceInstance


def main() -> None:
    url, port, ttl = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    instance = ServiceInstance("orders", address="127.0.0.1", port=port)
    registrar = Registrar(
        url,
        instance,
        ttl=ttl,
        retry=RetryPolicy(initial=0.1, cap=1.0),
        install_signal_handlers=True,
    )
    registrar.start(wait_registered=20)
    print("registered", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
