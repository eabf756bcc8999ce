"""httpx transports with discovery policy on real Consul and etcd, real HTTP instances
(processes killed by PID): failover, opt-in retries, outlier ejection, filters, locality
and the scoping rule."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from integration.http_service_kit import (
    SLOW,
    close_mid_call,
    fleet,
    register_all,
    services,
    wait_for,
)
from registry_agent import (
    AsyncDiscovery,
    AsyncDiscoveryTransport,
    Discovery,
    DiscoveryPolicy,
    DiscoveryTransport,
    OutlierEjection,
    RegistryError,
)
from registry_agent.testing.servers import ServerProcess

# The `measured` fixture (integration/conftest.py): records a time, asserts its bound.
Measured = Callable[[str, float, float], None]


def port_of(response: httpx.Response) -> int:
    return int(response.text.split()[0])


def send_twice(client: httpx.Client, method: str) -> None:
    """Two requests: round robin over two instances reaches each once."""
    for _ in range(2):
        client.request(method, "http://orders/")


def test_a_killed_instance_costs_no_get(server: ServerProcess) -> None:
    with services(3) as inst, Discovery(server.url) as discovery:
        register_all(inst, server.url, discovery)
        served: Counter[int] = Counter()
        with httpx.Client(transport=DiscoveryTransport(discovery), timeout=5) as client:
            for n in range(120):
                response = client.get("http://orders/items")  # raises on any failure
                assert response.status_code == 200
                assert response.text.split()[1:] == ["orders", "GET"]  # Host kept
                assert response.request.url == "http://orders/items"
                served[port_of(response)] += 1
                if n == 30:
                    inst[0].kill()
                    killed = n
        assert set(served) == {s.port for s in inst}
        assert killed == 30
        # Every GET after the kill went to a live instance (120 answers, none failed).
        assert sum(served.values()) == 120


def test_5xx_retried_for_get_when_opted_in_never_for_post(server: ServerProcess) -> None:
    policy = DiscoveryPolicy(retry_statuses=(503,))
    with services(2) as inst, Discovery(server.url, policy=policy) as discovery:
        register_all(inst, server.url, discovery)
        inst[0].mode("503")
        with httpx.Client(transport=DiscoveryTransport(discovery), timeout=5) as client:
            gets = [client.get("http://orders/") for _ in range(6)]
            assert {r.status_code for r in gets} == {200}
            assert {port_of(r) for r in gets} == {inst[1].port}
            posts = [client.post("http://orders/", content=b"x") for _ in range(4)]
            # Round robin reaches the failing one; a POST is never sent twice.
            assert Counter(r.status_code for r in posts) == Counter({200: 2, 503: 2})
            inst[1].mode("503")
            last = client.get("http://orders/")  # both fail: the last 5xx is returned
            assert last.status_code == 503
            assert last.text.split()[2] == "GET"
        # Without the opt-in, a 503 is the answer.
        with httpx.Client(
            transport=DiscoveryTransport(discovery, policy=DiscoveryPolicy()), timeout=5
        ) as client:
            inst[1].mode("ok")
            assert {client.get("http://orders/").status_code for _ in range(4)} == {200, 503}


def test_read_timeouts_retried_when_opted_in(server: ServerProcess) -> None:
    with services(2) as inst, Discovery(server.url) as discovery:
        register_all(inst, server.url, discovery)
        inst[0].mode("slow")
        timeout = httpx.Timeout(5, read=SLOW / 3)
        opted = DiscoveryPolicy(retry_read_timeouts=True)
        with httpx.Client(
            transport=DiscoveryTransport(discovery, policy=opted), timeout=timeout
        ) as c:
            started = time.monotonic()
            answers = [c.get("http://orders/") for _ in range(4)]
            assert {port_of(r) for r in answers} == {inst[1].port}
            assert time.monotonic() - started < 4 * (SLOW / 3) + 5
            with pytest.raises(httpx.ReadTimeout):  # a POST is not sent again
                send_twice(c, "POST")
        with (
            httpx.Client(transport=DiscoveryTransport(discovery), timeout=timeout) as c,
            pytest.raises(httpx.ReadTimeout, match="1 instance of orders tried"),
        ):
            send_twice(c, "GET")  # not opted in: one of the two reaches the slow one


def test_an_instance_answering_503_is_ejected_and_comes_back(
    server: ServerProcess, measured: Measured
) -> None:
    rule = OutlierEjection(consecutive_failures=3, base_time=2.0, max_time=10.0)
    policy = DiscoveryPolicy(outliers=rule)
    with services(3) as inst, Discovery(server.url, policy=policy) as discovery:
        register_all(inst, server.url, discovery)
        inst[0].mode("503")
        with httpx.Client(transport=DiscoveryTransport(discovery), timeout=5) as client:
            statuses = [client.get("http://orders/").status_code for _ in range(9)]
            # Round robin: its 3rd 503 in a row ejects it.
            assert statuses.count(503) == 3
            ejected_at = time.monotonic()
            assert [i.port for i in discovery.ejected("orders")] == [inst[0].port]
            later = [port_of(client.get("http://orders/")) for _ in range(8)]
            assert inst[0].port not in later
            inst[0].mode("ok")
            back = wait_for(
                lambda: inst[0].port in {port_of(client.get("http://orders/")) for _ in range(3)},
                rule.base_time + 5,
                "the ejected instance back",
            )
            elapsed = time.monotonic() - ejected_at
            assert elapsed >= rule.base_time - 0.2, f"back after {elapsed:.2f}s"
            assert back >= 0
            measured("ejected instance (base_time 2 s) chosen again", elapsed, rule.base_time + 5)
            assert discovery.ejected("orders") == []


def test_tags_meta_and_zone_preference_through_the_transport(server: ServerProcess) -> None:
    with services(4) as inst, Discovery(server.url) as discovery:
        inst[0].register(server.url, tags=("canary",), meta={"version": "v2", "zone": "eu-1a"})
        inst[1].register(server.url, meta={"version": "v2", "zone": "eu-1b"})
        inst[2].register(server.url, meta={"version": "v1", "zone": "eu-1a"})
        inst[3].register(server.url, meta={"version": "v2", "zone": "eu-1b"})
        wait_for(lambda: len(discovery.instances("orders")) == 4, 15, "4 healthy")

        def ports(policy: DiscoveryPolicy, n: int = 8) -> set[int]:
            transport = DiscoveryTransport(discovery, policy=policy)
            with httpx.Client(transport=transport, timeout=5) as client:
                return {port_of(client.get("http://orders/")) for _ in range(n)}

        assert ports(DiscoveryPolicy(tags=("canary",))) == {inst[0].port}
        assert ports(DiscoveryPolicy(meta={"version": "v2"})) == {
            inst[0].port,
            inst[1].port,
            inst[3].port,
        }
        assert ports(DiscoveryPolicy(meta={"version": "v2"}, prefer={"zone": "eu-1b"})) == {
            inst[1].port,
            inst[3].port,
        }
        assert ports(DiscoveryPolicy(prefer={"zone": "eu-1a"})) == {inst[0].port, inst[2].port}
        # No one in the preferred zone: every candidate.
        assert len(ports(DiscoveryPolicy(prefer={"zone": "us-2"}), 12)) == 4
        # A preferred instance killed: the rest of its zone, then the others.
        inst[0].kill()
        assert ports(DiscoveryPolicy(prefer={"zone": "eu-1a"})) == {inst[2].port}
        with (
            httpx.Client(
                transport=DiscoveryTransport(
                    discovery, policy=DiscoveryPolicy(meta={"version": "v9"})
                ),
                timeout=5,
            ) as client,
            pytest.raises(httpx.ConnectError, match="matching meta version=v9"),
        ):
            client.get("http://orders/")


def _echo(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, text=f"inner {request.url} {request.headers['host']}")


def test_scoping_passes_other_hosts_untouched_and_starts_no_watch(server: ServerProcess) -> None:
    with services(1) as inst, Discovery(server.url) as discovery:
        inst[0].register(server.url)
        inner = httpx.MockTransport(_echo)  # only for URLs passed through
        transport = DiscoveryTransport(discovery, transport=inner)
        with httpx.Client(transport=transport) as client:
            for url in (
                "http://example.com/a?b=1",
                "https://example.com/",
                "http://localhost/",
                "http://127.0.0.1/",
                "http://orders:8080/",
            ):
                answer = client.get(url)
                assert answer.text.startswith(f"inner {url}"), answer.text
            assert discovery._async._watchers == {}  # no watch for any of them
            # An unknown single label: an error naming services=, and still no watch.
            with pytest.raises(
                httpx.ConnectError, match=r"no registry lists a service named 'intranet'.*services="
            ):
                client.get("http://intranet/")
            assert discovery._async._watchers == {}
        # A real service through the same rule (its watch is the only one).
        with httpx.Client(transport=DiscoveryTransport(discovery), timeout=5) as client:
            wait_for(lambda: client.get("http://orders/").status_code == 200, 15, "orders")
        assert set(discovery._async._watchers) == {"orders"}


def test_services_allow_list_pass_and_refuse(server: ServerProcess) -> None:
    with services(1) as inst, Discovery(server.url) as discovery:
        inst[0].register(server.url)
        wait_for(lambda: len(discovery.instances("orders")) == 1, 15, "1 healthy")
        inner = httpx.HTTPTransport()
        passing = DiscoveryTransport(discovery, services=["orders"], transport=inner)
        with httpx.Client(transport=passing, timeout=5) as client:
            assert port_of(client.get("http://orders/")) == inst[0].port
            # Another host goes out untouched: here straight to the instance's own port.
            direct = client.get(f"http://127.0.0.1:{inst[0].port}/")
            assert direct.text.split()[1] == f"127.0.0.1:{inst[0].port}"
        refusing = DiscoveryTransport(discovery, services=["orders"], others="refuse")
        with httpx.Client(transport=refusing, timeout=5) as client:
            assert client.get("http://orders/").status_code == 200
            with pytest.raises(
                httpx.ConnectError, match=r"not a service URL of this client \(services: orders"
            ):
                client.get(f"http://127.0.0.1:{inst[0].port}/")
            with pytest.raises(httpx.ConnectError, match="others='refuse'"):
                client.get("http://users/")
        assert set(discovery._async._watchers) == {"orders"}


async def test_async_transport_fails_over_and_retries(server: ServerProcess) -> None:
    policy = DiscoveryPolicy(retry_statuses=(503,))
    with services(3) as inst:
        for s in inst:
            s.register(server.url)
        async with AsyncDiscovery(server.url, policy=policy) as discovery:
            for _ in range(300):
                if len(await discovery.instances("orders")) == 3:
                    break
                await asyncio.sleep(0.05)
            inst[0].mode("503")
            inst[1].kill()
            transport = AsyncDiscoveryTransport(discovery)
            async with httpx.AsyncClient(transport=transport, timeout=5) as client:
                answers = [await client.get("http://orders/") for _ in range(9)]
                assert {(r.status_code, port_of(r)) for r in answers} == {(200, inst[2].port)}
                posts = [await client.post("http://orders/") for _ in range(6)]
                assert {r.status_code for r in posts} >= {503}
                with pytest.raises(
                    httpx.ConnectError, match=r"no registry lists a service named 'nope'"
                ):
                    await client.get("http://nope/")
                assert set(discovery._watchers) == {"orders"}


def test_a_silent_registry_fails_unconfirmed_names_at_once_and_starts_no_watch(
    server: ServerProcess,
) -> None:
    """The registry paused during the is_service check: no watch for a name nobody
    confirmed, a ConnectError in the registry's words within sync_timeout; a name in
    services= is not checked, and the registry's own error is a ConnectError too."""
    sync_timeout = 1.0
    with services(1) as inst, Discovery(server.url, sync_timeout=sync_timeout) as discovery:
        inst[0].register(server.url)
        wait_for(lambda: len(discovery.instances("orders")) == 1, 15, "1 healthy")
        server.pause()
        try:
            with httpx.Client(transport=DiscoveryTransport(discovery), timeout=5) as client:
                for n in range(5):
                    started = time.monotonic()
                    with pytest.raises(httpx.ConnectError) as caught:
                        client.get(f"http://host{n}/x")
                    took = time.monotonic() - started
                    assert took <= sync_timeout + 1.0, took
                    message = str(caught.value)
                    assert f"cannot tell whether 'host{n}' is a service" in message
                    assert "the registry did not answer" in message
                    assert "services=" in message
                    assert isinstance(caught.value.__cause__, RegistryError)
                    assert caught.value.request.url == f"http://host{n}/x"
                # The watched service is still served from what discovery holds.
                assert client.get("http://orders/").status_code == 200
            assert set(discovery._async._watchers) == {"orders"}
            # services=["billing"]: confirmed by the caller, so discovery is asked, and its
            # error (no answer from the registry) is an httpx error, bounded by sync_timeout.
            listed = DiscoveryTransport(discovery, services=["billing"])
            with httpx.Client(transport=listed, timeout=5) as client:
                started = time.monotonic()
                with pytest.raises(httpx.ConnectError) as caught:
                    client.get("http://billing/")
                assert time.monotonic() - started <= sync_timeout + 1.0
            assert isinstance(caught.value.__cause__, RegistryError)
            assert str(caught.value).startswith("billing: ")
            assert str(caught.value.__cause__) in str(caught.value)
        finally:
            server.resume()


async def test_async_a_silent_registry_is_a_connect_error_and_starts_no_watch(
    server: ServerProcess,
) -> None:
    with services(1) as inst:
        inst[0].register(server.url)
        server.pause()
        try:
            async with AsyncDiscovery(server.url, sync_timeout=1.0) as discovery:
                transport = AsyncDiscoveryTransport(discovery)
                async with httpx.AsyncClient(transport=transport, timeout=5) as client:
                    with pytest.raises(httpx.ConnectError, match="cannot tell whether 'orders'"):
                        await client.get("http://orders/")
                assert discovery._watchers == {}
        finally:
            server.resume()


async def test_async_read_timeouts_keep_words_and_the_service_url(server: ServerProcess) -> None:
    policy = DiscoveryPolicy(retry_read_timeouts=True)
    with services(2) as inst:
        for s in inst:
            s.register(server.url)
            s.mode("slow")
        async with AsyncDiscovery(server.url, policy=policy) as discovery:
            for _ in range(300):
                if len(await discovery.instances("orders")) == 2:
                    break
                await asyncio.sleep(0.05)
            timeout = httpx.Timeout(SLOW / 3, connect=5)
            transport = AsyncDiscoveryTransport(discovery)
            async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
                with pytest.raises(httpx.ReadTimeout) as caught:
                    await client.get("http://orders/x")
        message = str(caught.value)
        assert message.endswith("(2 instances of orders tried)")
        words = message.removesuffix("(2 instances of orders tried)").strip()
        assert words, message  # httpcore's async timeouts have no message: words made up
        assert "timed out" in words or "Timeout" in words, words
        assert caught.value.request.url == "http://orders/x"


def test_host_forms_the_same_as_requests(server: ServerProcess) -> None:
    """Upper case, the default port and an IDNA name reach the service; a mixed-case
    service name is reached through services= and the error says so."""
    with services(1) as inst, Discovery(server.url) as discovery:
        inst[0].register(server.url)
        inst[0].register(server.url, name="xn--bcher-kva")
        inst[0].register(server.url, name="Billing")
        wait_for(lambda: len(discovery.instances("orders")) == 1, 15, "1 healthy")
        with httpx.Client(transport=DiscoveryTransport(discovery), timeout=5) as client:
            for url in ("http://ORDERS/", "http://orders:80/", "http://bücher/"):
                answer = wait_for_answer(client, url)
                assert port_of(answer) == inst[0].port, url
                assert answer.request.url == httpx.URL(url)
            with pytest.raises(httpx.ConnectError) as caught:
                client.get("http://Billing/")
            assert "case-sensitive" in str(caught.value)
            assert "services=['Billing']" in str(caught.value)
        listed = DiscoveryTransport(discovery, services=["Billing"])
        with httpx.Client(transport=listed, timeout=5) as client:
            assert port_of(wait_for_answer(client, "http://billing/")) == inst[0].port
        assert set(discovery._async._watchers) == {"orders", "xn--bcher-kva", "Billing"}


def wait_for_answer(client: httpx.Client, url: str) -> httpx.Response:
    """The first 200 within 15 s (a name just registered is listed within seconds)."""
    answers: list[httpx.Response] = []

    def answered() -> bool:
        try:
            answers.append(client.get(url))
        except httpx.ConnectError:
            return False
        return answers[-1].status_code == 200

    wait_for(answered, 15, f"{url} answered")
    return answers[-1]


def test_a_call_in_flight_when_the_transport_closes_makes_no_further_attempt(
    server: ServerProcess,
) -> None:
    # A break-it run saw such a call fail over through the closed pools and answer 200,
    # leaving the new connection open. Both instances are slow: any second attempt would
    # show in the count of instances tried.
    opted = DiscoveryPolicy(retry_read_timeouts=True)
    timeout = httpx.Timeout(5, read=SLOW / 3)
    with fleet(server.url, then="slow") as discovery:
        client = httpx.Client(transport=DiscoveryTransport(discovery, policy=opted), timeout=5)
        error = close_mid_call(lambda: client.get("http://orders/", timeout=timeout), client.close)
        assert isinstance(error, httpx.TransportError)  # its read timed out, or the close broke it
        assert "(1 instance of orders tried)" in str(error), error

    async def main() -> BaseException:
        async with AsyncDiscovery(server.url) as discovery:
            transport = AsyncDiscoveryTransport(discovery, policy=opted)
            async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
                call = asyncio.ensure_future(client.get("http://orders/"))
                await asyncio.sleep(0.3)
                await transport.aclose()  # interrupts the attempt: no other follows
                with pytest.raises(httpx.TransportError) as caught:
                    await asyncio.wait_for(call, 4 * SLOW)
                return caught.value

    with fleet(server.url, then="slow"):
        error = asyncio.run(main())
    assert "(1 instance of orders tried)" in str(error), error


@pytest.mark.parametrize("fault", ["killed", "reset"])
def test_errors_name_the_service_url_and_are_worded_alike_sync_and_async(
    server: ServerProcess, fault: str
) -> None:
    # Async httpx (anyio) words a refused connection "All connection attempts failed"
    # and a reset with no text at all: the transports give the system's reason for both.
    with fleet(server.url, then=fault) as discovery:
        with (
            httpx.Client(transport=DiscoveryTransport(discovery), timeout=5) as client,
            pytest.raises(httpx.TransportError) as sync_error,
        ):
            client.get("http://orders/x?y=1")
        assert sync_error.value.request.url == "http://orders/x?y=1"

        async def main() -> BaseException:
            async with (
                AsyncDiscovery(server.url) as found,
                httpx.AsyncClient(transport=AsyncDiscoveryTransport(found), timeout=5) as client,
            ):
                with pytest.raises(httpx.TransportError) as caught:
                    await client.get("http://orders/")
                return caught.value

        async_error = asyncio.run(main())
    reason = {"killed": "[Errno 111] Connection refused", "reset": "[Errno 104] Connection reset"}
    assert type(async_error) is type(sync_error.value)
    assert str(async_error) == str(sync_error.value), (async_error, sync_error.value)
    assert str(async_error).startswith(reason[fault]), async_error
    assert str(async_error).endswith("(2 instances of orders tried)"), async_error


def test_a_transport_closed_while_its_call_waits_for_the_registry_sends_nothing(
    server: ServerProcess,
) -> None:
    # A break-it run: closed while the call waited for discovery's first read, the call
    # went on once the registry answered, opened a new connection and got its 200.
    def resume_after(close: Callable[[], object]) -> Callable[[], None]:
        def closing() -> None:
            close()
            server.resume()

        return closing

    with fleet(server.url), Discovery(server.url, sync_timeout=10) as discovery:
        server.pause()
        try:
            client = httpx.Client(transport=DiscoveryTransport(discovery, services=["orders"]))
            error = close_mid_call(lambda: client.get("http://orders/"), resume_after(client.close))
        finally:
            server.resume()
        assert isinstance(error, httpx.ConnectError), repr(error)
        assert str(error) == "orders: the transport was closed"

    async def main() -> BaseException:
        async with AsyncDiscovery(server.url, sync_timeout=10) as found:
            transport = AsyncDiscoveryTransport(found, services=["orders"])
            async with httpx.AsyncClient(transport=transport) as client:
                call = asyncio.ensure_future(client.get("http://orders/"))
                await asyncio.sleep(0.3)
                await transport.aclose()
                server.resume()
                with pytest.raises(httpx.ConnectError) as caught:
                    await asyncio.wait_for(call, 10)
                return caught.value

    with fleet(server.url):
        server.pause()
        try:
            error = asyncio.run(main())
        finally:
            server.resume()
    assert str(error) == "orders: the transport was closed"
