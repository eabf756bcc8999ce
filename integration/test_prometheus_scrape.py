"""A real Prometheus (Debian's 2.42 package, fetched by scripts/fetch-servers.sh) scrapes the
agent's /metrics and an app's RegistryCollector on loopback: the documented names and labels,
``instance_id`` kept as it is, ``instance`` left to Prometheus (its target label)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app

from integration.agent_process import ONE_SERVICE, Agent
from registry_agent import Registrar, RegistryCollector, ServiceInstance, Watcher
from registry_agent.readiness import make_wsgi_app as make_readiness_app
from registry_agent.testing.servers import (
    ConsulServer,
    EtcdServer,
    find_binary,
    free_port,
)

SCRAPE_INTERVAL = 1.0
# Prometheus's first scrape comes within one interval of its start, which itself takes
# a second or two; generous: ten intervals plus its start.
WITHIN = 10 * SCRAPE_INTERVAL + 20.0


class Prometheus:
    """A `prometheus` process on 127.0.0.1 with a scrape config and a throwaway TSDB."""

    def __init__(self, tmp_path: Path, jobs: dict[str, str]) -> None:
        self.port = free_port()
        self.dir = tmp_path / "prometheus"
        self.dir.mkdir()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]}
                for job, target in jobs.items()
            ],
        }
        # JSON is YAML: no YAML writer needed.
        (self.dir / "prometheus.yml").write_text(json.dumps(config, indent=2))
        self.log = self.dir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    find_binary("prometheus"),
                    f"--config.file={self.dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                cwd=self.dir,  # no console files: none are needed
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}"
        with urllib.request.urlopen(url, timeout=2) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def series(self, match: str) -> list[dict[str, str]]:
        """Every series matching ``match`` now (last five minutes), [] before it answers."""
        try:
            found: list[dict[str, str]] = self.api("series", **{"match[]": match})
        except (urllib.error.URLError, OSError):
            return []
        return found

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # its own PID, never a name
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class AppServer:
    """An app's WSGI server on loopback: /metrics (prometheus_client) and /readyz."""

    def __init__(self, prom: CollectorRegistry, registrars: list[Registrar]) -> None:
        metrics = make_wsgi_app(prom)
        ready = make_readiness_app(registrars)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            route = ready if environ.get("PATH_INFO") == "/readyz" else metrics
            return route(environ, start_response)

        self.server: WSGIServer = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def stack() -> Iterator[list[Any]]:
    """What a test starts, closed at its end in reverse order."""
    opened: list[Any] = []
    yield opened
    for item in reversed(opened):
        if isinstance(item, Registrar):
            item.stop(5.0)
        elif isinstance(item, Prometheus):
            item.stop()
        else:
            item.close()


def test_a_real_prometheus_scrapes_the_agent_and_an_app(
    consul_server: ConsulServer,
    etcd_server: EtcdServer,
    tmp_path: Path,
    agents: list[Agent],
    stack: list[Any],
    measured: Callable[[str, float, float], None],
) -> None:
    # (a) The agent, on Consul, its /metrics open on loopback.
    check = '[[service.check]]\ncommand = ["true"]\ninterval = "200ms"\n'
    agent = Agent(tmp_path, consul_server.url, ONE_SERVICE + check)
    agents.append(agent.start())
    agent.until("/readyz", 200)

    # (b) An app on etcd: a registrar and a watcher in a RegistryCollector, served with
    # prometheus_client's WSGI app, plus a gauge labelled `instance` to see what
    # Prometheus does with such a label.
    registrar = Registrar(
        etcd_server.url,
        ServiceInstance("payments", address="127.0.0.1", port=9100, id="payments-1"),
        ttl=5.0,
    )
    stack.append(registrar)
    registrar.start(wait_registered=15.0)
    watcher = Watcher(etcd_server.url, "payments")
    stack.append(watcher)
    assert watcher.wait_synced(15.0)
    prom = CollectorRegistry()
    RegistryCollector([registrar], [watcher], registry=prom)
    legacy = Gauge("legacy_up", "A label named instance, as ours was", ["instance"], registry=prom)
    legacy.labels("payments-1").set(1)
    app = AppServer(prom, [registrar])
    stack.append(app)
    app_target = f"127.0.0.1:{app.port}"
    agent_target = f"127.0.0.1:{agent.status_port}"

    prometheus = Prometheus(tmp_path, {"agent": agent_target, "app": app_target})
    stack.append(prometheus.start())
    started = time.monotonic()
    wanted = {
        ("agent", "registry_agent_ready"),
        ("agent", "registry_agent_backend_ready"),
        ("agent", "registry_agent_check_latency_seconds_count"),
        ("app", "registry_agent_ready"),
        ("app", "registry_agent_heartbeats_total"),
        ("app", "registry_agent_watch_instances"),
        ("app", "registry_agent_watch_events_total"),
        ("app", "legacy_up"),
    }
    found: list[dict[str, str]] = []
    while True:
        found = prometheus.series('{__name__=~"registry_agent_.+|legacy_up"}')
        if wanted <= {(s["job"], s["__name__"]) for s in found}:
            break
        assert prometheus.proc is not None
        assert prometheus.proc.poll() is None, prometheus.logs()
        assert time.monotonic() - started < WITHIN, (
            f"missing {wanted - {(s['job'], s['__name__']) for s in found}}\n{prometheus.logs()}"
        )
        time.sleep(0.2)
    measured("series in Prometheus", time.monotonic() - started, WITHIN)

    ours = [s for s in found if s["__name__"].startswith("registry_agent_")]
    targets = {"agent": agent_target, "app": app_target}
    for series in ours:
        assert "exported_instance" not in series, series
        assert series["instance"] == targets[series["job"]], series  # Prometheus's own label
    by_name = {(s["job"], s["__name__"]): s for s in ours}
    assert by_name[("agent", "registry_agent_ready")] == {
        "__name__": "registry_agent_ready",
        "instance": agent_target,
        "instance_id": "orders-1",
        "job": "agent",
        "service": "orders",
    }
    backend_ready = by_name[("agent", "registry_agent_backend_ready")]
    assert backend_ready["backend"].startswith("consul://127.0.0.1:")
    assert set(backend_ready) == {
        "__name__",
        "instance",
        "instance_id",
        "job",
        "service",
        "backend",
    }
    assert by_name[("app", "registry_agent_ready")]["instance_id"] == "payments-1"
    watched = by_name[("app", "registry_agent_watch_instances")]
    assert (watched["service"], watched["backend"].split("://")[0]) == ("payments", "etcd")
    assert set(watched) == {"__name__", "instance", "job", "service", "backend"}
    # What a label named `instance` becomes: why ours is instance_id.
    (old,) = [s for s in found if s["__name__"] == "legacy_up"]
    assert old["exported_instance"] == "payments-1"
    assert old["instance"] == app_target

    # The values, through a query.
    def value(query: str) -> float:
        (result,) = prometheus.api("query", query=query)["result"]
        return float(result["value"][1])

    assert value('registry_agent_ready{job="agent",instance_id="orders-1"}') == 1.0
    assert value('registry_agent_ready{job="app",instance_id="payments-1"}') == 1.0
    assert value('registry_agent_watch_instances{job="app",service="payments"}') == 1.0
    added = 'registry_agent_watch_events_total{job="app",service="payments",type="added"}'
    assert value(added) == 1.0
    assert value('up{job="app"}') == 1.0
    assert value('up{job="agent"}') == 1.0
    # The app's readiness endpoint beside its metrics.
    with urllib.request.urlopen(f"http://{app_target}/readyz", timeout=2) as response:
        assert (response.status, json.loads(response.read())) == (200, {"ready": True})
