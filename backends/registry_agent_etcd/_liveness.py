"""One etcd lease shared by a process's registrations of one TTL: the lease group.

The group grants its lease lazily (single-flight), renews it on one long-lived
``LeaseKeepAlive`` stream every ttl/3, puts its members' keys on it in
coalesced transactions, and reads them all back once per TTL. Members hear
about the lease (renewal failing, recovered, lost) and about a differing entry
through :class:`~registry_agent.LivenessNews`. Each renewal (answered or failed) and
each read-back is credited to every member it covered, through its follower's
``tally`` (the registrar's counters ``heartbeats_ok``, ``heartbeats_failed``,
``verifications``): one call per member, no request, no wake-up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import aetcd
import grpc
from aetcd import rpc

from registry_agent import (
    BackendUnavailable,
    LeaseLost,
    RegistryError,
    RetryPolicy,
    ServiceInstance,
)
from registry_agent.backend import LivenessNews

if TYPE_CHECKING:
    from registry_agent_etcd._backend import EtcdBackend

__all__ = ["MAX_TXN_OPS", "LeaseGroup"]

log = logging.getLogger("registry_agent.etcd")

#: etcd's --max-txn-ops default: a transaction with more operations is refused.
MAX_TXN_OPS = 128
#: Transactions in flight at once per group: enough to overlap round trips,
#: few enough that a re-registration storm does not flood the server.
MAX_TXN_IN_FLIGHT = 2
# Bytes of a put operation inside a transaction beyond its key and value.
_OP_OVERHEAD = 48
# etcd's clientv3.WithRequireLeader (see _backend).
_REQUIRE_LEADER = ("hasleader", "true")


@dataclass(slots=True)
class _Member:
    instance: ServiceInstance
    value: bytes
    #: The group lease the entry was put on (None while the first put is in flight).
    lease_id: int | None = None
    #: etcd's revision of that put: a read older than it cannot show it.
    revision: int = 0
    #: Put again by the group itself after a lost lease, not yet claimed by
    #: the member's own register_shared (nor deregistered by it).
    adopted: bool = False


@dataclass(slots=True)
class _Put:
    key: bytes
    value: bytes
    lease_id: int
    future: asyncio.Future[int]

    @property
    def size(self) -> int:
        return len(self.key) + len(self.value) + _OP_OVERHEAD


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass(slots=True)
class _Stream:
    """One open keepalive stream, the client it runs on, and what it has answered.

    A reader task drains the stream into ``replies``, so a stream that breaks
    between two renewals (etcd stopped, connection reset) is noticed at once.
    """

    client: Any
    call: Any
    replies: asyncio.Queue[Any]
    reader: asyncio.Task[None]

    def close(self) -> None:
        self.reader.cancel()
        self.call.cancel()


@dataclass(eq=False, slots=True)
class _Follower:
    notify: Callable[[LivenessNews], None]
    #: The listener's ``tally``, when it has one (see the module docstring).
    tally: Callable[[str], None] | None = None


@dataclass(slots=True)
class _Stats:
    """Counters for tests and benches."""

    renewals: int = 0
    grants: int = 0
    txns: int = 0
    verifications: int = 0


class LeaseGroup:
    """The shared lease of one TTL (whole ``seconds``) on one :class:`EtcdBackend`."""

    def __init__(
        self, backend: EtcdBackend, seconds: int, retry: RetryPolicy | None = None
    ) -> None:
        self.backend = backend
        self.seconds = seconds
        # Failed renewals retry within ttl/3 and at most every 1 s: a wiped or
        # restarted server is noticed (and everything re-put) soon after it is back.
        self.retry = retry or RetryPolicy(initial=0.1, cap=min(1.0, max(0.1, seconds / 3)))
        self.loop = asyncio.get_running_loop()
        #: The lease members are put on now; None before the first grant.
        self.lease_id: int | None = None
        #: Why the current lease counts as lost (None while it lives).
        self.lost: LeaseLost | None = None
        #: The renewals' error while they fail (None while they succeed).
        self.error: RegistryError | None = None
        self.members: dict[bytes, _Member] = {}
        #: register_shared calls under way: the group is not retired under them.
        self.pending = 0
        self.stats = _Stats()
        self._followers: dict[bytes, list[_Follower]] = {}
        self._last_ok: float | None = None  # monotonic send time of the last renewal answered
        self._last_ok_wall: float | None = None
        self._granting: asyncio.Task[int] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._queue: collections.deque[_Put] = collections.deque()
        self._in_flight = 0
        self._kick_scheduled = False
        self._closed = False

    # -- lease ---------------------------------------------------------------

    def stale(self) -> bool:
        """No renewal answered for a whole TTL (frozen, cut off): the lease may be gone."""
        return self._last_ok is None or time.monotonic() - self._last_ok >= self.seconds

    def live_lease(self) -> int | None:
        """The current lease when it may be trusted, else None (and it is counted lost)."""
        if self.lease_id is None or self.lost is not None:
            return None
        if self.stale():
            self.lose(self.lease_id, f"no renewal answered for {self.seconds}s (frozen or cut off)")
            return None
        return self.lease_id

    def last_renewal(self) -> float | None:
        return self._last_ok_wall

    async def ensure_lease(self) -> int:
        """The live lease, granting a new one first (once, whoever asks) when needed."""
        lease_id = self.live_lease()
        if lease_id is not None:
            return lease_id
        if self._granting is None or self._granting.done():
            self._granting = self.loop.create_task(self._grant(), name="etcd shared lease grant")
        return await asyncio.shield(self._granting)

    async def _grant(self) -> int:
        backend = self.backend
        lease_id = secrets.randbits(62) + 1
        sent = time.monotonic()
        try:
            await backend._call(lambda c: c.lease(self.seconds, lease_id))
        except BaseException as exc:
            if not isinstance(exc.__cause__, aetcd.exceptions.DuplicateLeaseError):
                backend._orphan(lease_id, self.seconds)
            raise
        self.stats.grants += 1
        old, self.lease_id = self.lease_id, lease_id
        self.lost = None
        self.error = None
        # Granted between sent and now. A grant held up by an outage (a reconnect) was
        # still granted: counting it from its send time made it lost at once, and the
        # next grant's puts met the members' own for the same keys. The keepalive that
        # starts now confirms it (or finds it gone) within a renewal.
        self._last_ok = max(sent, time.monotonic() - self.seconds / 3)
        self._last_ok_wall = time.time()
        if old is not None and old != lease_id:
            backend._orphan(old, self.seconds)  # in case it still lives: its keys are re-put
        for task in self._tasks:
            task.cancel()
        self._tasks = [
            self.loop.create_task(self._keep(lease_id), name=f"etcd lease {lease_id:x} keepalive"),
            self.loop.create_task(self._verify(lease_id), name=f"etcd lease {lease_id:x} verify"),
        ]
        if any(m.lease_id not in (None, lease_id) for m in self.members.values()):
            self._tasks.append(
                self.loop.create_task(self._put_back(lease_id), name="etcd shared put back")
            )
        log.debug(
            "etcd shared lease %x granted (ttl %ds)",
            lease_id,
            self.seconds,
            extra={"event": "lease_granted", "backend": "etcd"},
        )
        return lease_id

    def lose(self, lease_id: int, reason: str) -> None:
        """Count ``lease_id`` lost (if it is still ours) and tell every member."""
        if lease_id != self.lease_id or self.lost is not None:
            return
        self.lost = LeaseLost(f"shared lease {lease_id:x} lost: {reason}", backend="etcd")
        log.warning(
            "etcd shared lease %x lost (%s): %d registrations to put again",
            lease_id,
            reason,
            len(self.members),
            extra={"event": "lease_lost", "backend": "etcd"},
        )
        self.backend._orphan(lease_id, self.seconds)
        if self.members and not self._closed:
            # Members hear once their entries are back (or the restore failed):
            # thousands of wake-ups must not delay the grant and the puts.
            self.loop.create_task(self._restore(), name="etcd shared lease restore")
        else:
            self.broadcast(LivenessNews.RENEWAL)

    async def _restore(self) -> None:
        """After a lost lease: grant a new one at once (which puts every member back).

        When the grant fails, the members hear now and register again themselves;
        the first grant that succeeds puts all the others back too.
        """
        try:
            await self.ensure_lease()
        except RegistryError:
            self.broadcast(LivenessNews.RENEWAL)

    async def _put_back(self, lease_id: int) -> None:
        """Put every member of an older lease back on ``lease_id``, in batched transactions.

        The members then hear RENEWAL and call register_shared, which finds its
        entry back already (claim) instead of waiting behind thousands of
        wake-ups: a wiped etcd holds every entry again within a few round trips.
        """
        stale = [(k, m) for k, m in self.members.items() if m.lease_id not in (None, lease_id)]
        puts = [(k, m, self.put(k, m.value, lease_id)) for k, m in stale]
        for _, _, future in puts:  # read even if this task ends first (no "never retrieved")
            future.add_done_callback(_retrieved)
        try:
            for key, member, future in puts:
                try:
                    revision = await future
                except RegistryError:
                    continue  # that member puts it again itself
                if self.members.get(key) is member and member.lease_id not in (None, lease_id):
                    member.lease_id, member.revision, member.adopted = lease_id, revision, True
        finally:
            self.broadcast(LivenessNews.RENEWAL)

    def claim(self, key: bytes, value: bytes, lease_id: int) -> bool:
        """Whether the group already put ``value`` back on ``lease_id`` for ``key``."""
        member = self.members.get(key)
        if member is None or not member.adopted:
            return False
        if member.lease_id != lease_id or member.value != value:
            return False
        member.adopted = False
        return True

    def check(self, lease_id: int, key: bytes) -> None:
        """What a member's heartbeat says, from memory (see ``SharedLiveness``)."""
        live = self.live_lease()
        if key not in self.members or live is None or live != lease_id:
            raise self.lost or LeaseLost(
                f"shared lease {lease_id:x} is no longer the group's lease", backend="etcd"
            )
        if self.error is not None:
            raise self.error

    # -- keepalive -------------------------------------------------------------

    async def _open(self) -> _Stream:
        client = await self.backend._call(_connected)
        metadata = (*tuple(client.metadata or ()), _REQUIRE_LEADER)
        call = rpc.LeaseStub(client.channel).LeaseKeepAlive(metadata=metadata)
        replies: asyncio.Queue[Any] = asyncio.Queue()

        async def read() -> None:
            try:
                while True:
                    reply = await call.read()
                    replies.put_nowait(reply)
                    if reply is grpc.aio.EOF:
                        return
            except asyncio.CancelledError:
                replies.put_nowait(
                    BackendUnavailable("etcd keepalive stream closed", backend="etcd")
                )
                raise
            except Exception as exc:
                replies.put_nowait(exc)

        reader = self.loop.create_task(read(), name="etcd keepalive reader")
        return _Stream(client, call, replies, reader)

    @staticmethod
    def _answer(reply: Any) -> Any:
        if isinstance(reply, BaseException):
            raise reply
        if reply is grpc.aio.EOF:
            raise BackendUnavailable("etcd closed the keepalive stream", backend="etcd")
        return reply

    async def _keep(self, lease_id: int) -> None:
        """Renew ``lease_id`` every ttl/3 on one stream until it is lost or replaced."""
        period = self.seconds / 3
        attempt = 0
        told = False  # members were told renewals fail
        stream: _Stream | None = None
        try:
            while self.lease_id == lease_id and self.lost is None and not self._closed:
                if self.stale():
                    self.lose(lease_id, f"no renewal answered for {self.seconds}s")
                    return
                sent = time.monotonic()
                try:
                    # No longer than the lease may still live, reconnecting included: a
                    # renewal unanswered by then counts the lease lost (members hear at
                    # once; a reconnect to a blackholed member took the whole timeout).
                    left = (self._last_ok or sent) + self.seconds - time.monotonic()
                    async with asyncio.timeout(min(self.backend.timeout, max(0.1, left))):
                        if stream is None:
                            stream = await self._open()
                        self.stats.renewals += 1
                        await stream.call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                        reply = self._answer(await stream.replies.get())
                except asyncio.CancelledError:
                    if not _closed_under_us():
                        raise
                    error: RegistryError = BackendUnavailable(
                        "etcd keepalive stream closed under the call", backend="etcd"
                    )
                except Exception as exc:
                    client = stream.client if stream is not None else None
                    error = await self.backend._failed(exc, client)  # type: ignore[assignment]
                else:
                    if reply.TTL <= 0:
                        self.lose(lease_id, "etcd says it expired or was revoked")
                        return
                    self._last_ok, self._last_ok_wall = sent, time.time()
                    attempt = 0
                    self.credit("heartbeats_ok", self._on(lease_id))
                    if self.error is not None:
                        self.error = None
                        log.info(
                            "etcd shared lease %x renewed again",
                            lease_id,
                            extra={"event": "renewal_recovered", "backend": "etcd"},
                        )
                    if told:
                        told = False
                        self.broadcast(LivenessNews.RENEWAL)
                    try:  # until the next renewal, unless the stream breaks first
                        async with asyncio.timeout(max(0.0, sent + period - time.monotonic())):
                            self._answer(await stream.replies.get())
                        continue  # an answer nobody asked for: ignore it
                    except TimeoutError:
                        continue
                    except Exception as exc:
                        error = await self.backend._failed(exc, None)  # type: ignore[assignment]
                # The renewal failed: a fresh stream next time, after a jittered backoff.
                if stream is not None:
                    stream.close()
                    stream = None
                if isinstance(error, LeaseLost):
                    self.lose(lease_id, str(error))
                    return
                attempt += 1
                self.credit("heartbeats_failed", self._on(lease_id))
                if self.error is None:
                    log.info(
                        "etcd shared lease %x: renewal failed, retrying: %s",
                        lease_id,
                        error,
                        extra={"event": "renewal_failed", "backend": "etcd"},
                    )
                self.error = error
                if attempt == 2:
                    # News only when the retry failed too: one failed call (a member
                    # failing over, a reset stream) must not wake every member.
                    told = True
                    self.broadcast(LivenessNews.RENEWAL)
                await asyncio.sleep(min(self.retry.delay(attempt), period))
        finally:
            if stream is not None:
                stream.close()

    # -- verification ----------------------------------------------------------

    async def _verify(self, lease_id: int) -> None:
        """Once per TTL, read every member's entry back; VERIFY only those that differ.

        One read-only transaction holds a range per service, each narrowed to the
        longest prefix our keys of that service share: other processes' entries
        are mostly left out, and one request covers up to 128 services.
        """
        while True:
            await asyncio.sleep(self.seconds)
            if self.lease_id != lease_id or self.lost is not None or self.error is not None:
                continue
            settled = {k: m for k, m in self.members.items() if m.lease_id == lease_id}
            if not settled:
                continue
            by_service: dict[str, list[bytes]] = {}
            for key, member in settled.items():
                by_service.setdefault(member.instance.service, []).append(key)
            prefixes = sorted(_common(keys) for keys in by_service.values())
            try:
                seen: dict[bytes, Any] = {}
                revision = 0
                for start in range(0, len(prefixes), MAX_TXN_OPS):
                    chunk = prefixes[start : start + MAX_TXN_OPS]
                    reply = await self.backend._call(partial(_ranges, prefixes=chunk))
                    # The oldest read decides which puts it may not show yet.
                    revision = min(revision or reply.header.revision, reply.header.revision)
                    for response in reply.responses:
                        seen.update((kv.key, kv) for kv in response.response_range.kvs)
            except RegistryError as exc:
                log.debug("etcd shared verification skipped: %s", exc)
                continue
            self.stats.verifications += 1
            checked: list[bytes] = []
            for key, member in settled.items():
                if self.members.get(key) is not member or member.revision > revision:
                    continue  # changed meanwhile: a read this old cannot tell
                checked.append(key)
                kv = seen.get(key)
                if kv is None or kv.lease != lease_id or kv.value != member.value:
                    self.tell(key, LivenessNews.VERIFY)
            self.credit("verifications", checked)

    # -- puts ------------------------------------------------------------------

    def put(self, key: bytes, value: bytes, lease_id: int) -> asyncio.Future[int]:
        """Queue a put on ``lease_id``; the future gives its revision (or the txn's error)."""
        future: asyncio.Future[int] = self.loop.create_future()
        self._queue.append(_Put(key, value, lease_id, future))
        if not self._kick_scheduled:
            # Let every caller of this loop turn queue first: they share transactions.
            self._kick_scheduled = True
            self.loop.call_soon(self._kick)
        return future

    def _kick(self) -> None:
        self._kick_scheduled = False
        while self._queue and self._in_flight < MAX_TXN_IN_FLIGHT:
            batch = [self._queue.popleft()]
            size = batch[0].size
            keys = {batch[0].key}
            limit = self.backend.max_request_bytes - 1024
            while (
                self._queue
                and len(batch) < MAX_TXN_OPS
                and self._queue[0].lease_id == batch[0].lease_id
                and self._queue[0].key not in keys  # etcd refuses a txn with a key twice
                and size + self._queue[0].size <= limit
            ):
                size += self._queue[0].size
                keys.add(self._queue[0].key)
                batch.append(self._queue.popleft())
            batch = [p for p in batch if not p.future.done()]  # callers gone
            if not batch:
                continue
            self._in_flight += 1
            self.loop.create_task(self._send(batch), name="etcd shared put")

    async def _send(self, batch: list[_Put]) -> None:
        try:
            reply = await self.backend._call(partial(_txn, batch=batch))
        except BaseException as exc:  # every caller gets the transaction's error
            error = (
                exc
                if isinstance(exc, Exception)
                else BackendUnavailable("etcd put cancelled", backend="etcd")
            )
            if isinstance(error, LeaseLost):
                self.lose(batch[0].lease_id, str(error))
            for put in batch:
                if not put.future.done():
                    put.future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
        else:
            self.stats.txns += 1
            for put in batch:
                if not put.future.done():
                    put.future.set_result(reply.header.revision)
        finally:
            self._in_flight -= 1
            if self._queue:
                self._kick()

    # -- members ---------------------------------------------------------------

    def follow(self, key: bytes, notify: Callable[[LivenessNews], None]) -> Callable[[], None]:
        follower = _Follower(notify, getattr(notify, "tally", None))
        self._followers.setdefault(key, []).append(follower)

        def unfollow() -> None:
            followers = self._followers.get(key, [])
            if follower in followers:
                followers.remove(follower)
            if not followers:
                self._followers.pop(key, None)

        return unfollow

    def join(self, key: bytes, instance: ServiceInstance, value: bytes) -> _Member:
        """A member whose first put is about to be sent (verification skips it until done)."""
        member = self.members[key] = _Member(instance, value)
        return member

    def forget(self, key: bytes) -> None:
        """A deregistered member: no entry, no news."""
        self.members.pop(key, None)
        self._followers.pop(key, None)

    def tell(self, key: bytes, news: LivenessNews) -> None:
        for follower in list(self._followers.get(key, ())):
            try:
                follower.notify(news)
            except Exception:  # a follower's bug must not stop the group
                log.exception("liveness follower failed on %s", news)

    def credit(self, counter: str, keys: Iterable[bytes]) -> None:
        """Count ``counter`` once for the members at ``keys`` (see the module docstring)."""
        followers = self._followers
        for key in keys:
            for follower in followers.get(key, ()):
                if follower.tally is None:
                    continue
                try:
                    follower.tally(counter)
                except Exception:  # a follower's bug must not stop the group
                    log.exception("liveness tally failed on %s", counter)

    def _on(self, lease_id: int) -> list[bytes]:
        """The members whose entry is on ``lease_id`` (those its renewal keeps alive)."""
        return [k for k, m in self.members.items() if m.lease_id == lease_id]

    def broadcast(self, news: LivenessNews) -> None:
        for key in list(self._followers):
            self.tell(key, news)

    async def close(self, *, revoke: bool) -> None:
        """Stop the streams; with ``revoke``, revoke the lease (bounded by the timeout)."""
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        lease_id, self.lease_id = self.lease_id, None
        if revoke and lease_id is not None and self.lost is None:
            try:
                await self.backend._call(lambda c: c.revoke_lease(lease_id))
            except LeaseLost:
                pass
            except RegistryError as exc:
                log.debug("etcd shared lease %x not revoked: %s", lease_id, exc)
                self.backend._orphan(lease_id, self.seconds)


async def _connected(client: Any) -> Any:
    await client.connect()
    return client


async def _txn(client: Any, *, batch: list[_Put]) -> Any:
    ops = [
        rpc.RequestOp(request_put=rpc.PutRequest(key=p.key, value=p.value, lease=p.lease_id))
        for p in batch
    ]
    await client.connect()
    return await client.kvstub.Txn(
        rpc.TxnRequest(success=ops), timeout=client._timeout, metadata=client.metadata
    )


async def _ranges(client: Any, *, prefixes: list[bytes]) -> Any:
    ops = [
        rpc.RequestOp(request_range=rpc.RangeRequest(key=p, range_end=_range_end(p)))
        for p in prefixes
    ]
    await client.connect()
    return await client.kvstub.Txn(
        rpc.TxnRequest(success=ops), timeout=client._timeout, metadata=client.metadata
    )


def _common(keys: list[bytes]) -> bytes:
    """The longest prefix all ``keys`` share."""
    first, last = min(keys), max(keys)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


def _range_end(prefix: bytes) -> bytes:
    if not prefix:
        return b"\0"
    return aetcd.utils.prefix_range_end(prefix)  # type: ignore[no-any-return]


def _closed_under_us() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0
