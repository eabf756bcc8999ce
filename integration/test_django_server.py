"""The Django app under ``manage.py runserver``, on real Consul and etcd.

The project (``integration/django_site``) takes ``registry_agent.integrations.django``
in INSTALLED_APPS and REGISTRY_AGENT from TEST_REGISTRY_* variables; it logs
each registration with its pid and holds ``/slow`` in flight. Each server runs in
a session of its own on a free loopback port and is stopped by PID; every wait
is bounded.

Django's autoreloader watches every imported module, this package's too: a file
edited meanwhile restarts its child, which deregisters and registers again. The
assertions hold either way: the parent never registers, no process registers
twice, the registry never holds two entries.
"""

from __future__ import annotations

import asyncio
import os
import shutil
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

MANAGE = str(ROOT / "integration" / "django_site" / "manage.py")
# manage.py imports Django, runs the system checks, then the check needs rise=2
# passes at interval ttl/3 (ttl=3 in djsite/settings.py).
REGISTER_BOUND = 20.0
DRAIN_DELAY = 0.25  # djsite/settings.py
SLOW = 2.0
SHUTDOWN_BOUND = 10.0 + DRAIN_DELAY + 0.5 + SLOW


@pytest.fixture
def django_env(server: ServerProcess, tmp_path: Path) -> dict[str, str]:
    return {
        "TEST_REGISTRY_BACKEND": server.url,
        "TEST_REGISTRY_SERVICE": f"django-{uuid.uuid4().hex[:8]}",
        "TEST_DJANGO_DB": str(tmp_path / "db.sqlite3"),
        "SLOW_MARKER": str(tmp_path / "slow-started"),
        "PYTHONPATH": str(ROOT),
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


async def _wait_file(path: Path, bound: float) -> None:
    deadline = time.monotonic() + bound
    while not await asyncio.to_thread(path.exists):
        assert time.monotonic() < deadline, f"{path} not written within {bound}s"
        await asyncio.sleep(0.02)


async def _serve_then_sigterm(
    server: ServerProcess,
    env: dict[str, str],
    run: ServerRun,
    port: int,
    what: str,
    measured: Callable[[str, float, float], None],
    *,
    group: bool = False,
) -> None:
    service = env["TEST_REGISTRY_SERVICE"]
    took, found = await wait_registered(run, server.url, service, REGISTER_BOUND)
    measured(f"{what}: registered", took, REGISTER_BOUND)
    ((instance, _),) = found.values()
    assert (instance.address, instance.port) == ("127.0.0.1", port)

    slow = Slow(port, SLOW)
    await _wait_file(Path(env["SLOW_MARKER"]), 5.0)
    assert len(await entries(server.url, service)) == 1
    # SIGTERM to the process we started, as a process manager sends it (or to its group).
    shutdown = await observe_shutdown(
        run, server.url, service, port, signal.SIGTERM, SHUTDOWN_BOUND, group=group
    )
    measured(f"{what} SIGTERM: entry gone", shutdown.gone, 10.0)
    measured(f"{what} SIGTERM: port closed", shutdown.closed, SHUTDOWN_BOUND)
    assert shutdown.gone < shutdown.closed, run.output()
    run.wait(SHUTDOWN_BOUND)
    slow.thread.join(SLOW + 5)
    assert (slow.status, slow.body, slow.error) == (200, b"slow done", ""), run.output()
    assert await entries(server.url, service) == {}


async def test_runserver_noreload_registers_once_and_leaves_before_the_port_closes(
    server: ServerProcess,
    django_env: dict[str, str],
    runs: Callable[[list[str], dict[str, str]], ServerRun],
    measured: Callable[[str, float, float], None],
) -> None:
    port = free_port()
    argv = [sys.executable, MANAGE, "runserver", "--noreload", f"127.0.0.1:{port}"]
    # No "backend" in the settings: REGISTRY_AGENT_BACKEND names it.
    env = {k: v for k, v in django_env.items() if k != "TEST_REGISTRY_BACKEND"}
    run = runs(argv, {**env, "REGISTRY_AGENT_BACKEND": server.url})
    await _serve_then_sigterm(server, env, run, port, "runserver --noreload", measured)
    assert run.pids_that_registered() == [run.proc.pid]
    assert run.proc.returncode == -signal.SIGTERM  # then SIGTERM took its usual course


@pytest.mark.parametrize("group", [False, True], ids=["parent", "group"])
async def test_runserver_with_the_autoreloader_registers_in_its_child_only(
    server: ServerProcess,
    django_env: dict[str, str],
    runs: Callable[[list[str], dict[str, str]], ServerRun],
    measured: Callable[[str, float, float], None],
    group: bool,
) -> None:
    port = free_port()
    run = runs([sys.executable, MANAGE, "runserver", f"127.0.0.1:{port}"], django_env)
    # SIGTERM to the parent: it waits for its child to deregister (Django's own loop
    # would SIGKILL it at once: the entry would stay until its TTL ran out). To the
    # group: the child gets SIGTERM twice (the group's, then the parent's).
    what = f"runserver (autoreload, {'group' if group else 'parent'})"
    await _serve_then_sigterm(server, django_env, run, port, what, measured, group=group)
    registered_by = run.pids_that_registered()
    assert registered_by, run.output()
    assert run.proc.pid not in registered_by, "the autoreloader's parent registered"
    assert len(set(registered_by)) == len(registered_by), "a process registered twice"


@pytest.mark.parametrize(
    "command",
    [
        ["migrate", "--noinput"],
        ["check"],
        ["shell", "-c", "import time; time.sleep(1.5)"],
        ["test", "djsite", "--noinput"],
    ],
    ids=["migrate", "check", "shell", "test"],
)
async def test_management_commands_never_register(
    server: ServerProcess, django_env: dict[str, str], command: list[str]
) -> None:
    service = django_env["TEST_REGISTRY_SERVICE"]
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, MANAGE, *command],
        cwd=ROOT,
        env={**os.environ, **django_env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "registering" not in done.stderr, done.stderr
    assert await entries(server.url, service) == {}


def test_bad_settings_are_a_system_check_error_naming_the_key() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REGISTRY_AGENT_BACKEND": "consul://127.0.0.1:8500",
        "TEST_REGISTRY_EXTRA": '{"port": "eighty"}',
    }
    done = subprocess.run(
        [sys.executable, MANAGE, "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert (
        '(registry_agent.E001) settings.REGISTRY_AGENT["port"]: expected an integer 1-65535, '
        "got 'eighty'" in done.stderr
    ), done.stderr
    assert "Traceback" not in done.stderr


def test_without_a_backend_commands_run_and_runserver_refuses_in_one_line(
    tmp_path: Path,
) -> None:
    """No backend in the settings nor the environment (a 12-factor build or CI step).

    ``migrate`` and ``check`` run as usual (no system check error); ``runserver``, with
    and without the autoreloader, prints one line last, exits 1, its port closed,
    nothing registered.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REGISTRY_AGENT_BACKEND", "CONSUL_HTTP_ADDR", "ETCDCTL_ENDPOINTS")
        and not k.startswith("TEST_REGISTRY_")
    }
    env.update(PYTHONPATH=str(ROOT), TEST_DJANGO_DB=str(tmp_path / "db.sqlite3"))
    for command in (["check"], ["migrate", "--noinput"]):
        done = subprocess.run(
            [sys.executable, MANAGE, *command],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (done.returncode, done.stderr) == (0, ""), (command, done.stderr)
    expected = (
        'Error: settings.REGISTRY_AGENT["backend"]: required to register: a registry URL such '
        "as 'consul://127.0.0.1:8500' or a list of them; or, in the environment, "
        "REGISTRY_AGENT_BACKEND, or Consul's CONSUL_HTTP_ADDR, or etcd's ETCDCTL_ENDPOINTS "
        "(none is set)\n"
    )
    for options in (["--noreload"], []):
        port = free_port()
        done = subprocess.run(
            [sys.executable, MANAGE, "runserver", *options, f"127.0.0.1:{port}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, (options, done.stderr)
        assert done.stderr.endswith(expected), (options, done.stderr)
        assert done.stderr.count("Error:") == 1, done.stderr
        assert "registering" not in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        assert not port_open(port)


async def test_uvicorn_serving_asgi_app_registers_and_leaves_before_the_port_closes(
    server: ServerProcess,
    django_env: dict[str, str],
    runs: Callable[[list[str], dict[str, str]], ServerRun],
    measured: Callable[[str, float, float], None],
) -> None:
    """asgi.py's ``asgi_app(get_asgi_application())`` under one uvicorn process."""
    port = free_port()
    env = {**django_env, "TEST_REGISTRY_EXTRA": f'{{"port": {port}, "address": "127.0.0.1"}}'}
    uvicorn = str(Path(sys.executable).with_name("uvicorn"))
    argv = [
        uvicorn,
        "djsite.asgi:application",
        "--app-dir",
        str(ROOT / "integration" / "django_site"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    run = runs(argv, env)
    await _serve_then_sigterm(server, env, run, port, "uvicorn asgi_app", measured)


async def test_asgi_app_never_passes_on_an_address_the_server_does_not_serve(
    consul_server: ServerProcess,
    tmp_path: Path,
    runs: Callable[[list[str], dict[str, str]], ServerRun],
) -> None:
    """uvicorn's bind host is unknown to the app: the check probes the advertised address.

    Advertised 127.0.0.2 while uvicorn serves 127.0.0.1 only: never registered
    (probing loopback instead, it passed: an entry nobody could reach).
    """
    port = free_port()
    service = f"django-{uuid.uuid4().hex[:8]}"
    env = {
        "TEST_REGISTRY_BACKEND": consul_server.url,
        "TEST_REGISTRY_SERVICE": service,
        "TEST_REGISTRY_EXTRA": f'{{"port": {port}, "address": "127.0.0.2"}}',
        "TEST_DJANGO_DB": str(tmp_path / "db.sqlite3"),
        "PYTHONPATH": str(ROOT),
    }
    uvicorn = str(Path(sys.executable).with_name("uvicorn"))
    argv = [
        uvicorn,
        "djsite.asgi:application",
        "--app-dir",
        str(ROOT / "integration" / "django_site"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    run = runs(argv, env)
    deadline = time.monotonic() + REGISTER_BOUND
    while not await asyncio.to_thread(port_open, port):
        assert run.proc.poll() is None, run.output()
        assert time.monotonic() < deadline, run.output()
        await asyncio.sleep(0.05)
    # rise=2 passes at interval ttl/3 = 1 s would register in about 2 s: watch 3 times that.
    watch_until = time.monotonic() + 6.0
    while time.monotonic() < watch_until:
        assert await entries(consul_server.url, service) == {}, run.output()
        await asyncio.sleep(0.1)
    assert run.proc.poll() is None, run.output()


# The README's recipe (a fragment of settings.py), read from README.md; the test
# adds it to a copy of the test project and changes only the registry URL.
README_DJANGO = readme_block("readme:django")


async def test_the_readme_recipe(
    server: ServerProcess,
    django_env: dict[str, str],
    tmp_path: Path,
    runs: Callable[[list[str], dict[str, str]], ServerRun],
    measured: Callable[[str, float, float], None],
) -> None:
    site = tmp_path / "site"
    shutil.copytree(ROOT / "integration" / "django_site", site)
    text = README_DJANGO.replace("consul://127.0.0.1:8500", server.url)
    assert text.count(server.url) == 1
    with (site / "djsite" / "settings.py").open("a") as settings:
        settings.write("\n" + text)
    port = free_port()
    argv = [sys.executable, str(site / "manage.py"), "runserver", "--noreload", f"127.0.0.1:{port}"]
    run = runs(argv, {**django_env, "PYTHONPATH": str(ROOT)})
    took, found = await wait_registered(run, server.url, "orders", REGISTER_BOUND)
    measured("readme recipe: registered", took, REGISTER_BOUND)
    assert list(found) == [f"orders-127.0.0.1-{port}"]
    shutdown = await observe_shutdown(
        run, server.url, "orders", port, signal.SIGTERM, SHUTDOWN_BOUND + 1, group=False
    )
    measured("readme recipe: entry gone", shutdown.gone, 10.0)
    measured("readme recipe: port closed", shutdown.closed, SHUTDOWN_BOUND + 1)
    assert shutdown.gone + 0.5 < shutdown.closed  # drain_delay=1
