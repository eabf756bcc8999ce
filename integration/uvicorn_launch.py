"""``python -m integration.uvicorn_launch``: integration/uvicorn_app.py under uvicorn's
supervisor with ``UVA_WORKERS`` workers, registered once by the supervisor
(registry_agent.integrations.uvicorn.run). The instance is built without an address
or id: run() advertises the host it binds (127.0.0.1), not the default route's."""

from __future__ import annotations

import logging
import os

from registry_agent import ServiceInstance
from registry_agent.integrations.uvicorn import run

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    service = os.environ["UVA_SERVICE"]
    port = int(os.environ["UVA_PORT"])
    run(
        "integration.uvicorn_app:app",
        os.environ["UVA_REGISTRY"],
        ServiceInstance(service, port=port),
        workers=int(os.environ.get("UVA_WORKERS", "2")),
        drain_delay=float(os.environ.get("UVA_DRAIN", "0")),
        ttl=float(os.environ.get("UVA_TTL", "3")),
    )
