"""A tiny HTTP service for the demo: GET /healthz answers 200 while FLAG_FILE exists, else 503.

Usage: python sample_service.py PORT FLAG_FILE
"""

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    port, flag = int(sys.argv[1]), Path(sys.argv[2])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            healthy = flag.exists() or self.path != "/healthz"
            body = b"ok\n" if healthy else b"unhealthy\n"
            self.send_response(200 if healthy else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
