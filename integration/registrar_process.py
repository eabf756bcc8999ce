"""A service process that registers itself, for tests that signal or freeze a whole process.

Usage: python registrar_process.py BACKEND_URL PORT TTL [serve]
With "serve" it also answers HTTP on PORT (its port number as the body).
Prints "registered" once in the registry, then idles until a signal ends it.
"""

import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from registry_agent import Registrar, RetryPolicy, ServiceInstance


class _Answer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = str(self.server.server_address[1]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    url, port, ttl = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    if sys.argv[4:] == ["serve"]:
        server = ThreadingHTTPServer(("127.0.0.1", port), _Answer)
        threading.Thread(target=server.serve_forever, daemon=True).start()
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
