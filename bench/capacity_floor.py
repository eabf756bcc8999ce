"""The capacity floor: a raw client holding N registrations with the least work possible.

``python -m bench.capacity_floor {etcd|consul} URL COUNT TTL`` registers COUNT
entries shaped like the agent's (service ``cap``), prints ``registered
<seconds>`` (the raw registration time), then keeps them alive until SIGTERM:

- etcd (aetcd): one lease, the entries put in transactions of 128 operations
  (etcd's default ``--max-txn-ops``), one keepalive every ttl/3 on one
  long-lived LeaseKeepAlive stream;
- Consul (httpx): one heartbeat service with the TTL check, each service
  registered with an alias check to it (16 PUTs in flight: more only slow the agent down), one
  ``check/pass`` every ttl/3.

It does nothing else: no verification, no healing. The bench measures its CPU
and RSS beside the agent's, on a server of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from urllib.parse import urlsplit

SERVICE = "cap"
PREFIX = f"/services/{SERVICE}/"
TXN_OPS = 128
IN_FLIGHT = 16
HEARTBEAT_SERVICE = "cap-floor-heartbeat"


def instance(i: int) -> dict[str, object]:
    """The i-th entry, the same fields as the agent's."""
    return {
        "service": SERVICE,
        "id": f"{SERVICE}-{i}",
        "address": "127.0.0.1",
        "port": 10000 + i,
        "tags": [],
        "meta": {},
    }


async def etcd_floor(host: str, port: int, count: int, ttl: int, stop: asyncio.Event) -> None:
    import aetcd
    from aetcd import rpc

    client = aetcd.Client(host, port)
    try:
        await client.connect()
        started = time.monotonic()
        lease = await client.lease(ttl)
        for start in range(0, count, TXN_OPS):
            ops = [
                client.transactions.put(
                    f"{PREFIX}{SERVICE}-{i}".encode(),
                    json.dumps({**instance(i), "status": "passing"}).encode(),
                    lease=lease.id,
                )
                for i in range(start, min(start + TXN_OPS, count))
            ]
            await client.transaction(compare=[], success=ops, failure=[])
        print(f"registered {time.monotonic() - started:.4f}", flush=True)
        stream = client.leasestub.LeaseKeepAlive(metadata=client.metadata)
        while not stop.is_set():
            await stream.write(rpc.LeaseKeepAliveRequest(ID=lease.id))
            reply = await stream.read()
            if reply.TTL <= 0:
                raise SystemExit("floor: lease lost")
            await wait(stop, ttl / 3)
        stream.cancel()
    finally:
        await client.close()


async def consul_floor(host: str, port: int, count: int, ttl: int, stop: asyncio.Event) -> None:
    import httpx

    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    # No read timeout: Consul answers every registration in the end, and a retry
    # of one it is still working on only adds work.
    timeout = httpx.Timeout(5.0, read=None)
    async with httpx.AsyncClient(
        base_url=f"http://{host}:{port}", limits=limits, timeout=timeout
    ) as http:
        check_id = f"{HEARTBEAT_SERVICE}:ttl"
        heartbeat = {
            "Name": HEARTBEAT_SERVICE,
            "ID": HEARTBEAT_SERVICE,
            "Check": {
                "CheckID": check_id,
                "TTL": f"{ttl}s",
                "Status": "passing",
                "DeregisterCriticalServiceAfter": "1m",
            },
        }
        started = time.monotonic()
        (await http.put("/v1/agent/service/register", json=heartbeat)).raise_for_status()
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def register(i: int) -> None:
            body = {
                "Name": SERVICE,
                "ID": f"{SERVICE}-{i}",
                "Address": "127.0.0.1",
                "Port": 10000 + i,
                "Check": {
                    "CheckID": f"service:{SERVICE}-{i}",
                    "AliasService": HEARTBEAT_SERVICE,
                    "Status": "passing",
                },
            }
            async with gate:
                (await http.put("/v1/agent/service/register", json=body)).raise_for_status()

        await asyncio.gather(*(register(i) for i in range(count)))
        print(f"registered {time.monotonic() - started:.4f}", flush=True)
        while not stop.is_set():
            (await http.put(f"/v1/agent/check/pass/{check_id}")).raise_for_status()
            await wait(stop, ttl / 3)


async def wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] not in ("etcd", "consul"):
        print("usage: python -m bench.capacity_floor {etcd|consul} URL COUNT TTL", file=sys.stderr)
        return 2
    kind, url, count, ttl = argv[0], urlsplit(argv[1]), int(argv[2]), int(argv[3])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    run = etcd_floor if kind == "etcd" else consul_floor
    await run(url.hostname or "127.0.0.1", url.port or 0, count, ttl, stop)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
