"""A Flask app with the registry-agent extension, configured from FLASK_* variables.

The test sets FLASK_REGISTRY_AGENT_BACKEND, FLASK_REGISTRY_AGENT_SERVICE, ...
(``app.config.from_prefixed_env()``); ``/slow`` holds a request in flight,
touching SLOW_MARKER once it has started.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
import time

from flask import Flask, request

from registry_agent.integrations.flask import RegistryAgent

logging.basicConfig(
    stream=sys.stderr,
    level=logging.INFO,
    format=f"pid={os.getpid()} %(name)s %(levelname)s %(message)s",
)

app = Flask(__name__)
app.config.from_prefixed_env()
agent = RegistryAgent(app, health_path="/healthz")


@app.get("/healthz")
def healthz() -> str:
    return "ok"


@app.get("/slow")
def slow() -> str:
    marker = os.environ.get("SLOW_MARKER")
    if marker:
        pathlib.Path(marker).write_text("started")
    time.sleep(float(request.args.get("s", "1")))
    return "slow done"


if __name__ == "__main__":
    # Other work on this checkout must not restart the reloader's child mid-test.
    root = pathlib.Path(__file__).resolve().parent.parent.parent
    app.run(
        host="127.0.0.1",
        port=int(os.environ["PORT"]),
        debug=os.environ.get("DEBUG") == "1",
        exclude_patterns=[f"{root}/*"],
    )
