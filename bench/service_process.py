"""A process that registers itself and idles: the victim of the crash benchmark.

Usage: python service_process.py BACKEND_URL PORT TTL
"""

import sys
import time

from registry_agent import Registrar, ServiceInstance


def main() -> None:
    url, port, ttl = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    registrar = Registrar(
        url, ServiceInstance("bench-crash", address="127.0.0.1", port=port), ttl=ttl
    )
    registrar.start(wait_registered=20)
    print("registered", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
