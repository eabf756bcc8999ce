"""The FastAPI app integration/test_starlette_uvicorn.py runs under a real uvicorn.

``UVA_MODE``: ``lifespan`` (registry_lifespan wrapping the app's own lifespan),
``nosignals`` (the same with handle_signals=False: withdrawn only at the lifespan's
shutdown, after uvicorn has drained), ``plain`` (no registration: the workers of
integration/uvicorn_launch.py, whose supervisor registers).

``UVA_ADDRESS``: the address the instance advertises (default 127.0.0.1, where
uvicorn listens); ``UVA_WARN_AFTER``: seconds before registry_lifespan's WARNING
about an entry its checks keep unregistered (default: the library's).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request

from registry_agent import ServiceInstance
from registry_agent.integrations import starlette
from registry_agent.integrations.starlette import registry_lifespan

MODE = os.environ.get("UVA_MODE", "plain")
INFLIGHT = 0


@asynccontextmanager
async def app_lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    # The app's own resources: up before the instance registers, down after it left.
    yield {"opened_at": time.time()}


if "UVA_WARN_AFTER" in os.environ:
    starlette.UNREGISTERED_WARNING_AFTER = float(os.environ["UVA_WARN_AFTER"])

if MODE == "plain":
    lifespan: Any = app_lifespan
else:
    instance = ServiceInstance(
        os.environ["UVA_SERVICE"],
        address=os.environ.get("UVA_ADDRESS", "127.0.0.1"),
        port=int(os.environ["UVA_PORT"]),
        id=os.environ["UVA_SERVICE"] + "-1",
    )
    lifespan = registry_lifespan(
        os.environ["UVA_REGISTRY"],
        instance,
        lifespan=app_lifespan,
        drain_delay=float(os.environ.get("UVA_DRAIN", "0")),
        handle_signals=MODE != "nosignals",
        ttl=float(os.environ.get("UVA_TTL", "3")),
    )

app = FastAPI(lifespan=lifespan)


@app.get("/")
async def index(request: Request) -> dict[str, Any]:
    registrar = getattr(request.app.state, "registrar", None)
    return {
        "pid": os.getpid(),
        "opened_at": request.state.opened_at,
        "registered": None if registrar is None else registrar.registered,
    }


@app.get("/inflight")
async def inflight() -> dict[str, int]:
    return {"inflight": INFLIGHT}


@app.get("/slow")
async def slow(seconds: float = 2.0) -> dict[str, Any]:
    global INFLIGHT
    INFLIGHT += 1
    try:
        await asyncio.sleep(seconds)
    finally:
        INFLIGHT -= 1
    return {"slept": seconds, "pid": os.getpid()}
