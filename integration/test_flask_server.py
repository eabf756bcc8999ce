"""The Flask extension under the real werkzeug server (flask run, app.run), on real Consul and etcd.

The app (``integration/flask_site/app.py``) is configured from FLASK_* variables
(``app.config.from_prefixed_env()``), logs each registration with its pid, and
holds ``/slow`` in flight. Each server runs in a session of its own on a free
loopback port and is stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from integration.devserver_kit import (
    ROOT,
    ServerRun,
    Slow,
    entries,
    free_port,
    observe_shutdown,
    port_open,
    wait_registered,
)
from integration.readme_kit import readme_block
from registry_agent.testing.servers import ServerProcess

TTL = 3
# flask run imports the app, then the check needs rise=2 passes at interval ttl/3.
REGISTER_BOUND = 15.0
DRAIN_DELAY = 0.25
SLOW = 2.0
# Deregistration, drain_delay, the serve loop's 0.5 s poll, then the request in flight.
SHUTDOWN_BOUND = 10.0 + DRAIN_DELAY + 0.5 + SLOW


@pytest.fixture
def flask_env(server: ServerProcess, tmp_path: Path) -> dict[str, str]:
    return {
        "FLASK_REGISTRY_AGENT_BACKEND": server.url,
        "FLASK_REGISTRY_AGENT_SERVICE": f"flask-{uuid.uuid4().hex[:8]}",
        "FLASK_REGISTRY_AGENT_TTL": str(TTL),
        "FLASK_REGISTRY_AGENT_DRAIN_DELAY": str(DRAIN_DELAY),
        "SLOW_MARKER": str(tmp_path / "slow-started"),
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Callable[[list[str], dict[str, str]], ServerRun]]:
    started: list[ServerRun] = []

    def start(argv: list[str], env: dict[str, str]) -> ServerRun:
        run = ServerRun(argv, env, tmp_path / f"server-{len(started)}.log")
        started.append(run)
        return run

    yield start
    for run in started:
        run.close()


def _registry_variable(url: str) -> dict[str, str]:
    """The registry at ``url`` as Consul's or etcdctl's own variable names it."""
    scheme, _, where = url.partition("://")
    if scheme == "consul":
        return {"CONSUL_HTTP_ADDR": where}
    assert scheme == "etcd", url
    return {"ETCDCTL_ENDPOINTS": f"http://{where}"}


async def _wait_file(path: Path, bound: float) -> None:
    deadline = time.monotonic() + bound
    while not await asyncio.to_thread(path.exists):
        assert time.monotonic() < deadline, f"{path} not written within {bound}s"
        await asyncio.sleep(0.02)


async def test_flask_run_registers_while_serving_and_leaves_before_the_port_closes(
    server: ServerProcess,
    flask_env: dict[str, str],
    runs: Callable[[list[str], dict[str, str]], ServerRun],
    measured: Callable[[str, float, float], None],
) -> None:
    port = free_port()
    service = flask_env["FLASK_REGISTRY_AGENT_SERVICE"]
    flask = str(Path(sys.executable).with_name("flask"))
    argv = [flask, "--app", "integration.flask_site.app", "run", "-h", "127.0.0.1", "-p", str(port)]
    run = runs(argv, flask_env)

    took, found = await wait_registered(run, server.url, service, REGISTER_BOUND)
    measured("flask run: registered", took, REGISTER_BOUND)
    ((instance, _),) = found.values()
    assert (instance.address, instance.port) == ("127.0.0.1", port)
    assert run.pids_that_registered() == [run.proc.pid]

    slow = Slow(port, SLOW)
    await _wait_file(Path(flask_env["SLOW_MARKER"]), 5.0)
    shutdown = await observe_shutdown(
        run, server.url, service, port, signal.SIGTERM, SHUTDOWN_BOUND, group=False
    )
    measured("SIGTERM: entry gone", shutdown.gone, 10.0)
    measured("SIGTERM: port closed", shutdown.closed, SHUTDOWN_BOUND)
    assert shutdown.gone < shutdown.closed, run.output()

    assert run.wait(SHUTDOWN_BOUND) == -signal.SIGTERM  # SIGTERM took its usual course
    slow.thread.join(SLOW + 5)
    assert (slow.status, slow.body, slow.error) == (200, b"slow done", ""), run.output()
    assert await entries(server.url, service) == {}


async def test_app_run_with_the_reloader_registers_in_its_child_only(
    server: ServerProcess,
    flask_env: dict[str, str],
    runs: Callable[[list[str], dict[str, str]], ServerRun],
    measured: Callable[[str, float, float], None],
) -> None:
    port = free_port()
    service = flask_env["FLASK_REGISTRY_AGENT_SERVICE"]
    env = {**flask_env, "PORT": str(port), "DEBUG": "1"}  # app.run(debug=True): reloader
    # No backend setting: the registry's own variable names it (Consul's or etcdctl's).
    del env["FLASK_REGISTRY_AGENT_BACKEND"]
    env.update(_registry_variable(server.url))
    run = runs([sys.executable, "-m", "integration.flask_site.app"], env)

    took, found = await wait_registered(run, server.url, service, REGISTER_BOUND)
    measured("app.run(debug): registered", took, REGISTER_BOUND)
    assert len(found) == 1
    await asyncio.sleep(1.0)  # a registration by the reloader's parent would show by now
    # (A restart of the child, should a watched file change, registers from a new pid.)
    registered_by = run.pids_that_registered()
    assert registered_by, run.output()
    assert run.proc.pid not in registered_by, "the reloader's parent registered"
    assert len(set(registered_by)) == len(registered_by), "a process registered twice"
    assert len(await entries(server.url, service)) == 1

    # A process manager's group kill: parent and child get SIGTERM. werkzeug's parent
    # alone would SIGKILL its child at once (subprocess.call); it now waits for it.
    slow = Slow(port, SLOW)
    await _wait_file(Path(flask_env["SLOW_MARKER"]), 5.0)
    shutdown = await observe_shutdown(
        run, server.url, service, port, signal.SIGTERM, SHUTDOWN_BOUND, group=True
    )
    measured("reloader SIGTERM: entry gone", shutdown.gone, 10.0)
    measured("reloader SIGTERM: port closed", shutdown.closed, SHUTDOWN_BOUND)
    assert shutdown.gone < shutdown.closed, run.output()
    run.wait(SHUTDOWN_BOUND)
    slow.thread.join(SLOW + 5)
    assert (slow.status, slow.body, slow.error) == (200, b"slow done", ""), run.output()
    assert await entries(server.url, service) == {}


async def test_no_server_no_registration(server: ServerProcess, flask_env: dict[str, str]) -> None:
    """The test client, a CLI command and a script that builds the app never register."""
    service = flask_env["FLASK_REGISTRY_AGENT_SERVICE"]
    flask = str(Path(sys.executable).with_name("flask"))
    script = (
        "from integration.flask_site.app import app, agent\n"
        "import time\n"
        "assert app.test_client().get('/healthz').data == b'ok'\n"
        "time.sleep(1.5)\n"
        "assert agent.registrar is None\n"
        "print('client done')\n"
    )
    env = {**flask_env, "PYTHONPATH": str(ROOT)}
    for argv in (
        [sys.executable, "-c", script],
        [flask, "--app", "integration.flask_site.app", "routes"],
    ):
        done = await asyncio.to_thread(
            subprocess.run,
            argv,
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "registering" not in done.stderr, done.stderr
        assert await entries(server.url, service) == {}


# The README's recipe, read from README.md; the test changes only the registry URL.
README_FLASK = readme_block("readme:flask")


async def test_the_readme_recipe(
    server: ServerProcess,
    tmp_path: Path,
    runs: Callable[[list[str], dict[str, str]], ServerRun],
    measured: Callable[[str, float, float], None],
) -> None:
    text = README_FLASK.replace("consul://127.0.0.1:8500", server.url)
    assert text.count(server.url) == 1
    (tmp_path / "app.py").write_text(text)
    port = free_port()
    flask = str(Path(sys.executable).with_name("flask"))
    argv = [flask, "--app", "app", "run", "-h", "127.0.0.1", "-p", str(port)]
    run = runs(argv, {"PYTHONPATH": str(tmp_path)})
    took, found = await wait_registered(run, server.url, "orders", REGISTER_BOUND)
    measured("readme recipe: registered", took, REGISTER_BOUND)
    assert list(found) == [f"orders-127.0.0.1-{port}"]
    shutdown = await observe_shutdown(
        run, server.url, "orders", port, signal.SIGTERM, SHUTDOWN_BOUND + 1, group=False
    )
    measured("readme recipe: entry gone", shutdown.gone, 10.0)
    measured("readme recipe: port closed", shutdown.closed, SHUTDOWN_BOUND + 1)
    assert shutdown.gone + 0.5 < shutdown.closed  # drain_delay=1


_NO_BACKEND_ERROR = (
    'Error: app.config["REGISTRY_AGENT_BACKEND"]: required to register: a registry URL such '
    "as 'consul://127.0.0.1:8500' or a list of them; or, in the environment, "
    "REGISTRY_AGENT_BACKEND, or Consul's CONSUL_HTTP_ADDR, or etcd's ETCDCTL_ENDPOINTS "
    "(none is set)\n"
)


def test_bad_settings_under_flask_run_are_one_line(tmp_path: Path) -> None:
    """Not flask's traceback of the app's import: ``Error: …``, exit status 2.

    No backend anywhere (settings nor environment) is no error until a server
    starts serving: ``flask routes`` and the test client work; ``flask run``,
    ``--debug run`` (the reloader's child serves) and ``app.run()`` print one
    line last and exit 2, their port closed, nothing registered.
    """
    (tmp_path / "bad_app.py").write_text(
        "from flask import Flask\n"
        "from registry_agent.integrations.flask import RegistryAgent\n"
        "app = Flask(__name__)\n"
        "app.config['REGISTRY_AGENT_BACKEND'] = 'consul://127.0.0.1:8500'\n"
        "RegistryAgent(app, health_path='healthz')\n"
    )
    (tmp_path / "no_backend.py").write_text(
        "import logging, sys\n"
        "from flask import Flask\n"
        "from registry_agent.integrations.flask import RegistryAgent\n"
        "logging.basicConfig(stream=sys.stderr, level=logging.INFO)\n"
        "app = Flask(__name__)\n"
        "RegistryAgent(app, health_path='/healthz')\n"
        "app.add_url_rule('/healthz', 'healthz', lambda: 'ok')\n"
    )
    flask = str(Path(sys.executable).with_name("flask"))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REGISTRY_AGENT_BACKEND", "CONSUL_HTTP_ADDR", "ETCDCTL_ENDPOINTS")
    }
    env["PYTHONPATH"] = str(tmp_path)
    cases = [
        (
            ["--app", "bad_app", "run", "-p", str(free_port())],
            "Error: RegistryAgent(health_path=…): expected a path starting with '/', "
            "e.g. '/healthz', got 'healthz'\n",
        ),
        (
            ["--app", "bad_app", "--debug", "run", "-p", str(free_port())],
            "Error: RegistryAgent(health_path=…): expected a path starting with '/', "
            "e.g. '/healthz', got 'healthz'\n",
        ),
    ]
    for args, expected in cases:
        done = subprocess.run(
            [flask, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stderr, done.stdout) == (2, expected, ""), args

    # No backend: commands that never register run as usual.
    client = "from no_backend import app; print(app.test_client().get('/healthz').data)"
    for argv, output in (
        ([flask, "--app", "no_backend", "routes"], "healthz   GET      /healthz"),
        ([sys.executable, "-c", client], "b'ok'\n"),
    ):
        done = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stderr) == (0, ""), argv
        assert output in done.stdout, done.stdout
    # A server that starts serving: one line, last, exit 2, the port closed (the reloader's
    # parent, which holds the socket too, exits with its child's status).
    for serve in ("run", "--debug run", "app.run"):
        port = free_port()
        argv = (
            [flask, "--app", "no_backend", *serve.split(), "-p", str(port)]
            if serve != "app.run"
            else [sys.executable, "-c", f"from no_backend import app; app.run(port={port})"]
        )
        done = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, (argv, done.stderr)
        assert done.stderr.endswith(_NO_BACKEND_ERROR), (argv, done.stderr)
        assert done.stderr.count("Error:") == 1, done.stderr
        assert "registering" not in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        assert not port_open(port)
