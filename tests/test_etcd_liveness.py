"""The etcd lease group's pure parts: how puts are cut into transactions, answers from memory.

The group's I/O (grant, keepalive stream, range read) is proven on a real etcd
in integration/test_liveness.py; here ``_call`` only records the transactions.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from registry_agent_etcd._liveness import MAX_TXN_OPS, LeaseGroup, _common

from registry_agent import BackendUnavailable, LeaseLost, ServiceInstance
from registry_agent._backend import LivenessNews


class _Recorder:
    """Stands in for EtcdBackend where the group sends its puts: records each transaction."""

    timeout = 1.0

    def __init__(self, max_request_bytes: int = 1536 * 1024) -> None:
        self.max_request_bytes = max_request_bytes
        self.batches: list[list[Any]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.orphans: list[int] = []

    async def _call(self, make: Any) -> Any:
        if not hasattr(make, "keywords"):  # a lease grant: granted
            return None
        batch = make.keywords["batch"]
        self.batches.append(batch)
        revision = len(self.batches)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        return type("Reply", (), {"header": type("H", (), {"revision": revision})})()

    def _orphan(self, lease_id: int, seconds: float) -> None:
        self.orphans.append(lease_id)


async def test_puts_share_transactions_of_at_most_128_ops_two_in_flight() -> None:
    backend = _Recorder()
    group = LeaseGroup(backend, 10)  # type: ignore[arg-type]
    futures = [group.put(f"/s/o/{i}".encode(), b"{}", 7) for i in range(1000)]
    revisions = await asyncio.gather(*futures)
    sizes = [len(b) for b in backend.batches]
    assert sum(sizes) == 1000
    assert max(sizes) == MAX_TXN_OPS
    assert len(sizes) == -(-1000 // MAX_TXN_OPS)  # no more transactions than needed
    assert backend.most_in_flight == 2
    assert set(revisions) == set(range(1, len(sizes) + 1))  # each caller its own txn's answer


async def test_a_transaction_stays_under_the_request_size_limit() -> None:
    backend = _Recorder(max_request_bytes=1024 + 4000)
    group = LeaseGroup(backend, 10)  # type: ignore[arg-type]
    await asyncio.gather(*(group.put(b"k%d" % i, b"v" * 900, 7) for i in range(20)))
    assert all(sum(len(p.value) + len(p.key) + 48 for p in b) <= 4000 for b in backend.batches)
    assert sum(len(b) for b in backend.batches) == 20


async def test_puts_on_different_leases_never_share_a_transaction() -> None:
    backend = _Recorder()
    group = LeaseGroup(backend, 10)  # type: ignore[arg-type]
    await asyncio.gather(*(group.put(b"k%d" % i, b"v", 7 if i % 2 else 8) for i in range(10)))
    assert all(len({p.lease_id for p in b}) == 1 for b in backend.batches)


async def test_a_failed_transaction_fails_each_of_its_callers() -> None:
    class Failing(_Recorder):
        async def _call(self, make: Any) -> Any:
            raise BackendUnavailable("down", backend="etcd")

    group = LeaseGroup(Failing(), 10)  # type: ignore[arg-type]
    results = await asyncio.gather(
        *(group.put(b"k%d" % i, b"v", 7) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, BackendUnavailable) for r in results)


async def test_heartbeat_answers_from_memory() -> None:
    backend = _Recorder()
    group = LeaseGroup(backend, 3)  # type: ignore[arg-type]
    key = b"/services/orders/a"
    group.join(key, ServiceInstance("orders", address="127.0.0.1", port=1), b"{}").lease_id = 5
    group.lease_id = 5
    group._last_ok = time.monotonic()
    group.check(5, key)  # fine
    with pytest.raises(LeaseLost):
        group.check(4, key)  # put on an older lease
    group.error = BackendUnavailable("renewals failing", backend="etcd")
    with pytest.raises(BackendUnavailable):
        group.check(5, key)
    group.error = None
    news: list[LivenessNews] = []
    group.follow(key, news.append)
    group._last_ok = time.monotonic() - 3  # no renewal answered for a whole TTL
    with pytest.raises(LeaseLost):
        group.check(5, key)
    assert backend.orphans == [5]  # revoked in the background, in case it still lives
    with pytest.raises(LeaseLost):
        group.check(5, key)
    # The group grants a new lease and puts its members back first, then tells them once.
    for _ in range(100):
        if news:
            break
        await asyncio.sleep(0.01)
    assert news == [LivenessNews.RENEWAL]
    new = group.lease_id
    assert new not in (None, 5)
    assert [[p.key for p in b] for b in backend.batches] == [[key]]
    with pytest.raises(LeaseLost):
        group.check(5, key)  # the member's own lease is still the old one
    assert not group.claim(key, b'{"other":1}', new)  # another value: put it yourself
    assert group.claim(key, b"{}", new)  # the same: it is back already
    assert not group.claim(key, b"{}", new)  # claimed once
    group.check(new, key)
    for _ in range(3):
        await asyncio.sleep(0)
    await group.close(revoke=False)


def test_common_prefix() -> None:
    assert _common([b"/services/orders/a-1", b"/services/orders/a-2"]) == b"/services/orders/a-"
    assert _common([b"/services/a/x", b"/services/b/x", b"/services/a/y"]) == b"/services/"
    assert _common([b"/only"]) == b"/only"
