"""registry_agent.requests.DiscoveryAdapter on real Consul and etcd with real HTTP instances:
the same failover rules as the httpx transports, through requests.Session.mount."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import requests
from urllib3.exceptions import MaxRetryError

from integration.http_service_kit import (
    SLOW,
    close_mid_call,
    fleet,
    register_all,
    services,
    wait_for,
)
from registry_agent import Discovery, DiscoveryPolicy, OutlierEjection, RegistryError
from registry_agent.requests import DiscoveryAdapter
from registry_agent.testing.servers import ServerProcess


def port_of(response: requests.Response) -> int:
    return int(response.text.split()[0])


def session_for(adapter: DiscoveryAdapter) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def get_twice(session: requests.Session) -> None:
    """Two GETs: round robin over two instances reaches each once."""
    for _ in range(2):
        session.get("http://orders/", timeout=(5, SLOW / 3))


def test_a_killed_instance_costs_no_get(server: ServerProcess) -> None:
    with services(3) as inst, Discovery(server.url) as discovery:
        register_all(inst, server.url, discovery)
        served: Counter[int] = Counter()
        with session_for(DiscoveryAdapter(discovery)) as session:
            for n in range(90):
                response = session.get("http://orders/items?x=1", timeout=5)  # raises on failure
                assert response.status_code == 200
                assert response.text.split()[1:] == ["orders", "GET"]  # Host kept
                assert response.url == "http://orders/items?x=1"
                served[port_of(response)] += 1
                if n == 20:
                    inst[0].kill()
        assert set(served) == {s.port for s in inst}
        assert sum(served.values()) == 90
        # A POST is retried on a connect failure too: it was never sent.
        with session_for(DiscoveryAdapter(discovery)) as session:
            assert {
                session.post("http://orders/", data=b"x", timeout=5).status_code for _ in range(6)
            } == {200}


def test_5xx_and_read_timeouts_retried_for_get_only_when_opted_in(server: ServerProcess) -> None:
    with services(2) as inst, Discovery(server.url) as discovery:
        register_all(inst, server.url, discovery)
        inst[0].mode("503")
        opted = DiscoveryPolicy(retry_statuses=(502, 503, 504), retry_read_timeouts=True)
        with session_for(DiscoveryAdapter(discovery, policy=opted)) as session:
            gets = [session.get("http://orders/", timeout=5) for _ in range(6)]
            assert {(r.status_code, port_of(r)) for r in gets} == {(200, inst[1].port)}
            posts = [session.post("http://orders/", timeout=5) for _ in range(4)]
            assert Counter(r.status_code for r in posts) == Counter({200: 2, 503: 2})
            inst[1].mode("503")
            last = session.get("http://orders/", timeout=5)
            assert last.status_code == 503  # the last 5xx is returned, not raised
            inst[0].mode("slow")
            inst[1].mode("ok")
            started = time.monotonic()
            gets = [session.get("http://orders/", timeout=(5, SLOW / 3)) for _ in range(4)]
            assert {port_of(r) for r in gets} == {inst[1].port}
            assert time.monotonic() - started < 4 * SLOW / 3 + 5
        with session_for(DiscoveryAdapter(discovery)) as session:  # not opted in
            inst[0].mode("503")
            assert {session.get("http://orders/", timeout=5).status_code for _ in range(4)} == {
                200,
                503,
            }
            inst[0].mode("slow")
            with pytest.raises(requests.ReadTimeout, match="1 instance of orders tried"):
                get_twice(session)


def test_ejection_filters_and_zone_preference(server: ServerProcess) -> None:
    rule = OutlierEjection(consecutive_failures=2, base_time=2.0)
    with (
        services(3) as inst,
        Discovery(server.url, policy=DiscoveryPolicy(outliers=rule)) as discovery,
    ):
        inst[0].register(server.url, meta={"zone": "eu-1a", "version": "v2"})
        inst[1].register(server.url, meta={"zone": "eu-1b", "version": "v2"}, tags=("canary",))
        inst[2].register(server.url, meta={"zone": "eu-1b", "version": "v1"})
        wait_for(lambda: len(discovery.instances("orders")) == 3, 15, "3 healthy")

        def ports(policy: DiscoveryPolicy) -> set[int]:
            with session_for(DiscoveryAdapter(discovery, policy=policy)) as session:
                return {port_of(session.get("http://orders/", timeout=5)) for _ in range(6)}

        assert ports(DiscoveryPolicy(tags=("canary",))) == {inst[1].port}
        assert ports(DiscoveryPolicy(meta={"version": "v2"})) == {inst[0].port, inst[1].port}
        assert ports(DiscoveryPolicy(prefer={"zone": "eu-1b"})) == {inst[1].port, inst[2].port}
        inst[0].mode("503")
        with session_for(DiscoveryAdapter(discovery)) as session:
            statuses = [session.get("http://orders/", timeout=5).status_code for _ in range(6)]
            assert statuses.count(503) == 2
            assert [i.port for i in discovery.ejected("orders")] == [inst[0].port]
            assert inst[0].port not in {
                port_of(session.get("http://orders/", timeout=5)) for _ in range(6)
            }
            inst[0].mode("ok")
            wait_for(
                lambda: (
                    inst[0].port
                    in {port_of(session.get("http://orders/", timeout=5)) for _ in range(3)}
                ),
                rule.base_time + 5,
                "the ejected instance back",
            )


def test_scoping_prefix_mounts_and_unknown_names(server: ServerProcess) -> None:
    with services(1) as inst, Discovery(server.url) as discovery:
        inst[0].register(server.url)
        assert discovery._async._watchers == {}
        session = requests.Session()
        session.trust_env = False
        # A per-service prefix: requests also hands it http://orders.example.com and
        # http://orders:PORT; the adapter checks the host exactly.
        session.mount("http://orders", DiscoveryAdapter(discovery, services=["orders"]))
        with session:
            assert port_of(session.get("http://orders/", timeout=5)) == inst[0].port
            assert set(discovery._async._watchers) == {"orders"}
            # Dotted or with a port: passed through as a plain HTTPAdapter would.
            with pytest.raises(requests.ConnectionError) as caught:
                session.get("http://orders.invalid/", timeout=5)
            assert "orders.invalid" in str(caught.value)
        refusing = session_for(DiscoveryAdapter(discovery, services=["orders"], others="refuse"))
        with refusing, pytest.raises(requests.ConnectionError, match="others='refuse'"):
            refusing.get(f"http://127.0.0.1:{inst[0].port}/", timeout=5)
        with session_for(DiscoveryAdapter(discovery)) as plain:
            assert plain.get(f"http://127.0.0.1:{inst[0].port}/", timeout=5).status_code == 200
            with pytest.raises(
                requests.ConnectionError,
                match=r"no registry lists a service named 'intranet'.*services=",
            ):
                plain.get("http://intranet/", timeout=5)
        assert set(discovery._async._watchers) == {"orders"}
        # No instance at all after a real failure: the connect error, not "no instance left".
        inst[0].kill()
        with (
            session_for(DiscoveryAdapter(discovery)) as plain,
            pytest.raises(
                requests.ConnectionError, match=r"(?s)refused.*1 instance of orders tried"
            ),
        ):
            plain.get("http://orders/", timeout=5)


def test_a_silent_registry_fails_unconfirmed_names_and_starts_no_watch(
    server: ServerProcess,
) -> None:
    sync_timeout = 1.0
    with services(1) as inst, Discovery(server.url, sync_timeout=sync_timeout) as discovery:
        inst[0].register(server.url)
        wait_for(lambda: len(discovery.instances("orders")) == 1, 15, "1 healthy")
        server.pause()
        try:
            with session_for(DiscoveryAdapter(discovery)) as session:
                for n in range(3):
                    started = time.monotonic()
                    with pytest.raises(requests.ConnectionError) as caught:
                        session.get(f"http://ghost{n}/", timeout=5)
                    assert time.monotonic() - started <= sync_timeout + 1.0
                    assert f"cannot tell whether 'ghost{n}' is a service" in str(caught.value)
                    assert isinstance(caught.value.__cause__, RegistryError)
            assert set(discovery._async._watchers) == {"orders"}
            listed = session_for(DiscoveryAdapter(discovery, services=["billing"]))
            with listed, pytest.raises(requests.ConnectionError) as caught:
                listed.get("http://billing/", timeout=5)
            assert isinstance(caught.value.__cause__, RegistryError)
            assert str(caught.value).startswith("billing: ")
        finally:
            server.resume()


def test_errors_keep_their_class_and_args_and_name_the_service_url(server: ServerProcess) -> None:
    with fleet(server.url, then="killed") as discovery:
        with (
            session_for(DiscoveryAdapter(discovery)) as session,
            pytest.raises(requests.ConnectionError) as caught,
        ):
            session.get("http://orders/x?y=1", timeout=5)
        error = caught.value
        assert type(error) is requests.ConnectionError
        assert isinstance(error.args[0], MaxRetryError)
        assert "refused" in str(error.args[0].reason).lower()
        assert error.request is not None
        assert error.request.url == "http://orders/x?y=1"
        assert error.__notes__ == ["2 instances of orders tried"]


def test_host_forms_the_same_as_httpx(server: ServerProcess) -> None:
    with services(1) as inst, Discovery(server.url) as discovery:
        inst[0].register(server.url)
        inst[0].register(server.url, name="xn--bcher-kva")
        inst[0].register(server.url, name="Billing")
        wait_for(lambda: len(discovery.instances("orders")) == 1, 15, "1 healthy")
        with session_for(DiscoveryAdapter(discovery)) as session:
            for url in ("http://ORDERS/", "http://orders:80/", "http://bücher/"):
                answer = get_when_listed(session, url)
                assert port_of(answer) == inst[0].port, url
                assert answer.url == requests.Request("GET", url).prepare().url
            # The default port is left out of Host, as httpx does.
            assert session.get("http://orders:80/", timeout=5).text.split()[1] == "orders"
            with pytest.raises(requests.ConnectionError) as caught:
                session.get("http://Billing/", timeout=5)
            assert "services=['Billing']" in str(caught.value)
            # An explicit other port passes through untouched.
            direct = session.get(f"http://127.0.0.1:{inst[0].port}/", timeout=5)
            assert direct.text.split()[1] == f"127.0.0.1:{inst[0].port}"
        with session_for(DiscoveryAdapter(discovery, services=["Billing"])) as session:
            assert port_of(get_when_listed(session, "http://billing/")) == inst[0].port
        assert set(discovery._async._watchers) == {"orders", "xn--bcher-kva", "Billing"}


def get_when_listed(session: requests.Session, url: str) -> requests.Response:
    """The first 200 within 15 s (a name just registered is listed within seconds)."""
    answers: list[requests.Response] = []

    def answered() -> bool:
        try:
            answers.append(session.get(url, timeout=5))
        except requests.ConnectionError:
            return False
        return answers[-1].status_code == 200

    wait_for(answered, 15, f"{url} answered")
    return answers[-1]


def test_pools_to_instances_no_longer_listed_are_closed(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    import registry_agent.requests as adapter_module

    monkeypatch.setattr(adapter_module, "_PRUNE_EVERY", 0.0)  # look on every request
    with services(2) as inst, Discovery(server.url) as discovery:
        register_all(inst, server.url, discovery)
        adapter = DiscoveryAdapter(discovery)

        def ports() -> set[int]:
            # keys(): the container refuses plain iteration (not thread-safe)
            return {key.key_port for key in adapter.poolmanager.pools.keys()}  # noqa: SIM118

        with session_for(adapter) as session:
            get_twice(session)
            assert ports() == {s.port for s in inst}
            inst[0].close()  # deregistered and killed
            wait_for(
                lambda: len(discovery.instances("orders", healthy_only=False)) == 1, 15, "gone"
            )
            assert port_of(session.get("http://orders/", timeout=5)) == inst[1].port
            assert ports() == {inst[1].port}


def test_a_call_in_flight_when_the_session_closes_makes_no_further_attempt(
    server: ServerProcess,
) -> None:
    # Both instances slow: a second attempt (through the closed pools, its connection
    # left open: a break-it run saw it answer 200) would show in the count tried.
    opted = DiscoveryPolicy(retry_read_timeouts=True)
    with fleet(server.url, then="slow") as discovery:
        session = session_for(DiscoveryAdapter(discovery, policy=opted))
        error = close_mid_call(
            lambda: session.get("http://orders/", timeout=(5, SLOW / 3)), session.close
        )
        assert isinstance(error, requests.RequestException)
        assert "1 instance of orders tried" in getattr(error, "__notes__", []), error


def test_a_session_closed_while_its_call_waits_for_the_registry_sends_nothing(
    server: ServerProcess,
) -> None:
    # A break-it run: closed while the call waited for discovery's first read, the call
    # went on once the registry answered, opened a new connection and got its 200.
    with fleet(server.url), Discovery(server.url, sync_timeout=10) as discovery:
        session = session_for(DiscoveryAdapter(discovery, services=["orders"]))

        def close() -> None:
            session.close()
            server.resume()

        server.pause()
        try:
            error = close_mid_call(lambda: session.get("http://orders/", timeout=5), close)
        finally:
            server.resume()
    assert isinstance(error, requests.ConnectionError), repr(error)
    assert str(error) == "orders: the adapter was closed"
