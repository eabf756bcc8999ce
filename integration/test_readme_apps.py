"""The README's "Inside your app" recipes, run as written against real Consul and etcd.

Each block is read from README.md (``readme_block``); the tests change only the
registry URL, the port (a free loopback one) and file paths. The servers run
for real: the Starlette app with ``python app.py`` (uvicorn.run), the
``--workers`` launcher with ``python serve.py``; every process is stopped by its
PID, every wait bounded. The library-only blocks run in a subprocess with a
clean environment, so this process's Prometheus registry and signal handlers
are untouched.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from integration.readme_kit import Block, readme_block, readme_blocks
from integration.test_starlette_uvicorn import _port_open
from registry_agent import AsyncWatcher, EventType, HealthStatus, WatchEvent, open_backend
from registry_agent._backend import Backend
from registry_agent.testing.servers import ConsulServer, ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
README_URL = "consul://127.0.0.1:8500"
# Bounds are generous (2 cores shared by many tests); the measured numbers are the point.
START_BOUND = 30.0  # launch -> entry passing (imports, uvicorn startup, rise of the check)
GONE_BOUND = 3.0  # SIGTERM -> entry gone: one deregistration on loopback
DRAIN = 1.0  # the recipes' drain_delay
EXIT_BOUND = DRAIN + 15.0  # SIGTERM -> process exited
LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<name>registry_agent[\w.]*): "
    r"(?P<message>.*)$"
)

Measured = Callable[[str, float, float], None]


def _url(server: ServerProcess) -> str:
    return server.url.rstrip("/")


def _substitute(text: str, pairs: list[tuple[str, str, int]]) -> str:
    """``text`` with each ``old`` replaced by ``new``, checking it occurred ``count`` times."""
    for old, new, count in pairs:
        assert text.count(old) == count, (old, text.count(old))
        text = text.replace(old, new)
    return text


def _clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment: no CONSUL_*/ETCDCTL_*/REGISTRY_AGENT_* from the test runner."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **extra}


class Served:
    """One ``python <file>`` started for a test; its stdout and stderr in files."""

    def __init__(self, workdir: Path, script: str, text: str) -> None:
        (workdir / script).write_text(text)
        self.stdout_path = workdir / f"{script}.out"
        self.stderr_path = workdir / f"{script}.err"
        self.known_children: list[int] = []
        self.launched = time.monotonic()
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, script],
                stdout=out,
                stderr=err,
                cwd=workdir,
                env=_clean_env(PYTHONPATH=str(workdir)),
            )

    def log(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace"
        )

    def children(self) -> list[int]:
        """The pids of the worker processes (multiprocessing spawn), remembered for cleanup."""
        found = []
        for child in psutil.Process(self.process.pid).children():
            try:
                if "spawn_main" in " ".join(child.cmdline()):
                    found.append(child.pid)
            except psutil.Error:
                continue
        self.known_children += [pid for pid in found if pid not in self.known_children]
        return sorted(found)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for pid in self.known_children:  # orphans of a killed supervisor: ours, by pid
            try:
                child = psutil.Process(pid)
                if "spawn_main" in " ".join(child.cmdline()):
                    child.kill()
            except psutil.Error:
                pass


@pytest.fixture
def served() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for one in started:
        one.kill()


@dataclass
class Registry:
    """Reads one service's entries through a backend of our own (one connection, reused)."""

    backend: Backend
    service: str

    async def health(self) -> dict[str, HealthStatus]:
        snapshot = await self.backend.list(self.service)
        return {h.instance.id: h.status for h in snapshot.instances.values()}


@pytest.fixture
async def registry_of() -> AsyncIterator[Callable[..., Registry]]:
    backends: list[Backend] = []

    def make(server: ServerProcess, service: str = "orders") -> Registry:
        backend = open_backend(server.url)
        backends.append(backend)
        return Registry(backend, service)

    yield make
    for backend in backends:
        await backend.close()


async def _wait_passing(app: Served, registry: Registry, instance_id: str) -> float:
    """Seconds from the launch until the registry holds exactly our entry, passing."""
    deadline = time.monotonic() + START_BOUND
    while time.monotonic() < deadline:
        if app.process.poll() is not None:
            pytest.fail(f"{app.process.args!r} ended ({app.process.returncode}):\n{app.log()}")
        if await registry.health() == {instance_id: HealthStatus.PASSING}:
            return time.monotonic() - app.launched
        await asyncio.sleep(0.05)
    pytest.fail(f"not registered within {START_BOUND}s: {await registry.health()}\n{app.log()}")


@dataclass
class Shutdown:
    gone: float  # SIGTERM -> entry first seen absent
    closed: float  # SIGTERM -> port first seen refusing
    exited: float  # SIGTERM -> process ended


async def _sigterm_and_watch(app: Served, registry: Registry, port: int) -> Shutdown:
    """SIGTERM, then the registry and the port in a tight loop, then the exit."""
    sent = time.monotonic()
    app.process.send_signal(signal.SIGTERM)
    gone: float | None = None
    closed: float | None = None
    while time.monotonic() < sent + EXIT_BOUND and (gone is None or closed is None):
        if gone is None and await registry.health() == {}:
            gone = time.monotonic() - sent
        if closed is None and not _port_open(port):
            closed = time.monotonic() - sent
        await asyncio.sleep(0.005)
    assert gone is not None, f"entry still there {EXIT_BOUND}s after SIGTERM:\n{app.log()}"
    assert closed is not None, f"port still open {EXIT_BOUND}s after SIGTERM:\n{app.log()}"
    try:
        await asyncio.to_thread(app.process.wait, max(0.1, sent + EXIT_BOUND - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not exit within {EXIT_BOUND}s of SIGTERM:\n{app.log()}")
    return Shutdown(gone, closed, time.monotonic() - sent)


def _check_shutdown(label: str, result: Shutdown, app: Served, measured: Measured) -> None:
    print(
        f"\n{label}: after SIGTERM entry gone {result.gone:.3f}s, port refused "
        f"{result.closed:.3f}s, exited {result.exited:.3f}s (code {app.process.returncode})"
    )
    assert result.gone <= result.closed, f"the port closed first: {result}\n{app.log()}"
    # drain_delay=1.0: the port keeps accepting for about that long after the entry is gone.
    assert result.closed - result.gone >= DRAIN * 0.9, result
    # uvicorn.run re-raises the signal it handled once it has shut down: -SIGTERM is clean.
    assert app.process.returncode in (0, -signal.SIGTERM), app.log()
    measured(f"{label}: SIGTERM -> gone", result.gone, GONE_BOUND)
    measured(f"{label}: SIGTERM -> exit", result.exited, EXIT_BOUND)


def _starlette_app(server: ServerProcess, port: int) -> str:
    return _substitute(
        readme_block("# readme:starlette"),
        [(README_URL, _url(server), 1), ("8080", str(port), 3)],
    )


@pytest.mark.parametrize("server", ["consul", "etcd"], indirect=True)
async def test_starlette_recipe_under_uvicorn(
    server: ServerProcess,
    served: list[Served],
    registry_of: Callable[[ServerProcess], Registry],
    measured: Measured,
    tmp_path: Path,
) -> None:
    port = free_port()
    app = Served(tmp_path, "app.py", _starlette_app(server, port))
    served.append(app)
    registry = registry_of(server)
    took = await _wait_passing(app, registry, f"orders-127.0.0.1-{port}")
    measured("starlette: launch -> passing", took, START_BOUND)
    # The recipe's /readyz: the registrar in app.state, ready, its status as JSON.
    answer = await asyncio.to_thread(_get, port, "/readyz")
    for _ in range(50):  # the registry shows the entry a moment before the app reads its answer
        if answer[0] == 200:
            break
        await asyncio.sleep(0.1)
        answer = await asyncio.to_thread(_get, port, "/readyz")
    assert answer[0] == 200, answer
    assert json.loads(answer[1])["ready"] is True, answer
    result = await _sigterm_and_watch(app, registry, port)
    _check_shutdown(f"starlette ({server.name})", result, app, measured)


def _get(port: int, path: str) -> tuple[int, str]:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@pytest.mark.parametrize("server", ["consul", "etcd"], indirect=True)
async def test_uvicorn_workers_recipe(
    server: ServerProcess,
    served: list[Served],
    registry_of: Callable[[ServerProcess], Registry],
    measured: Measured,
    tmp_path: Path,
) -> None:
    port = free_port()
    text = _substitute(
        readme_block("# readme:uvicorn-workers"),
        [(README_URL, _url(server), 1), ("8080", str(port), 1)],
    )
    app = Served(tmp_path, "serve.py", text)
    served.append(app)
    registry = registry_of(server)
    took = await _wait_passing(app, registry, f"orders-127.0.0.1-{port}")
    measured("workers: launch -> passing", took, START_BOUND)
    for _ in range(int(START_BOUND / 0.05)):
        if len(workers := app.children()) == 2:
            break
        await asyncio.sleep(0.05)
    assert len(workers) == 2, (workers, app.log())
    assert (await asyncio.to_thread(_get, port, "/healthz"))[0] == 200
    result = await _sigterm_and_watch(app, registry, port)
    _check_shutdown(f"uvicorn workers=2 ({server.name})", result, app, measured)
    assert not any(psutil.pid_exists(pid) and _is_worker(pid) for pid in workers), app.log()


def _is_worker(pid: int) -> bool:
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(
            process.cmdline()
        )
    except psutil.Error:
        return False


async def test_logging_recipe_under_uvicorn(
    consul_server: ConsulServer,
    served: list[Served],
    registry_of: Callable[[ServerProcess], Registry],
    measured: Measured,
    tmp_path: Path,
) -> None:
    """The logging block at the top of the module uvicorn runs: registry_agent's INFO
    lines reach stderr in the documented format, the withdrawal lines too."""
    port = free_port()
    text = readme_block("# readme:logging") + "\n\n" + _starlette_app(consul_server, port)
    app = Served(tmp_path, "app.py", text)
    served.append(app)
    registry = registry_of(consul_server)
    await _wait_passing(app, registry, f"orders-127.0.0.1-{port}")
    result = await _sigterm_and_watch(app, registry, port)
    _check_shutdown("starlette + logging (consul)", result, app, measured)
    stderr = app.stderr_path.read_text(errors="replace").splitlines()
    ours = [m for line in stderr if (m := LOG_LINE.match(line))]
    print("\n" + "\n".join(line for line in stderr if LOG_LINE.match(line)))
    assert ours, "\n".join(stderr)
    instance_id = f"orders-127.0.0.1-{port}"
    infos = [f"{m['name']}: {m['message']}" for m in ours if m["level"] == "INFO"]
    expected = [  # in this order, each an INFO line of its own
        f"registry_agent.registrar: {instance_id} registered: registered (passing)",
        f"registry_agent.integrations: signal SIGTERM: withdrawing {instance_id} before",
        f"registry_agent.registrar: {instance_id} deregistered: stopped",
    ]
    at = [next((i for i, line in enumerate(infos) if line.startswith(e)), -1) for e in expected]
    assert -1 not in at, (expected, stderr)
    assert at == sorted(at), infos


def _run(code: str, tmp_path: Path, env: dict[str, str], timeout: float = 60) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=tmp_path,
        env=_clean_env(PYTHONPATH=str(tmp_path), **env),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


METRICS_PROBE = """
import asyncio
import urllib.request

import httpx

assert registrar.wait_registered(10)
assert watcher.wait_synced(10)


def ready_line(text):
    return [line for line in text.splitlines() if line.startswith("registry_agent_ready")]


async def probe():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        ready = await client.get("/readyz")
        print(ready.status_code, ready.json())
        metrics = await client.get("/metrics", follow_redirects=True)
        print(metrics.status_code, ready_line(metrics.text))


asyncio.run(probe())
with urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=10) as answer:
    print(ready_line(answer.read().decode()))
registrar.stop()
watcher.close()
prometheus_client.REGISTRY.unregister(collector)
server.shutdown()
print(asyncio.run(open_backend_list()))
"""

LIST_AFTER = """
from registry_agent import open_backend as _open_backend


async def open_backend_list():
    backend = _open_backend({url!r})
    try:
        return (await backend.list("orders")).instances == {{}}
    finally:
        await backend.close()
"""


@pytest.mark.parametrize("server", ["consul", "etcd"], indirect=True)
def test_metrics_and_readiness_recipes(server: ServerProcess, tmp_path: Path) -> None:
    port = free_port()
    code = _substitute(
        readme_block("# readme:metrics"),
        [(README_URL, _url(server), 2), ("9108", str(port), 1)],
    )
    code += "\n" + readme_block("# readme:readiness")
    code += LIST_AFTER.format(url=_url(server)) + METRICS_PROBE.format(port=port)
    ready = 'registry_agent_ready{instance_id="orders-1",service="orders"} 1.0'
    assert _run(code, tmp_path, {}) == [
        "200 {'ready': True}",
        f"200 [{ready!r}]",
        f"[{ready!r}]",
        "True",
    ]


FROM_ENV = {
    "consul": lambda s: {"CONSUL_HTTP_ADDR": f"127.0.0.1:{s.http_port}"},
    "etcd": lambda s: {"ETCDCTL_ENDPOINTS": f"http://127.0.0.1:{s.client_port}"},
}


@pytest.mark.parametrize("server", ["consul", "etcd"], indirect=True)
async def test_from_env_recipe(
    server: ServerProcess, registry_of: Callable[[ServerProcess], Registry], tmp_path: Path
) -> None:
    code = readme_block("# readme:from-env")
    env = FROM_ENV[server.name](server)
    lines = await asyncio.to_thread(_run, code, tmp_path, env)
    assert lines == ["True"]  # wait_registered(10): the registry confirmed it
    assert await registry_of(server).health() == {}  # the with block's exit withdrew it
    # With nothing in the environment, the same block is an error saying what to set.
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True,
        timeout=60, cwd=tmp_path, env=_clean_env(),
    )  # fmt: skip
    assert result.returncode != 0
    assert "ConfigError" in result.stderr, result.stderr


AGENT_TOML = """\
[backend]
url = "{url}"

[[service]]
name = "orders"
id = "orders-1"
address = "127.0.0.1"
port = 8080
ttl = "10s"

[[service]]
name = "orders"
id = "orders-2"
address = "127.0.0.1"
port = 8081
ttl = "10s"
"""

LOAD_WAIT = """\
import asyncio

from registry_agent import open_backend


async def _held():
    backend = open_backend({url!r})
    try:
        snapshot = await backend.list("orders")
        return sorted(h.instance.id for h in snapshot.instances.values())
    finally:
        await backend.close()


print([registrar.wait_registered(10) for registrar in registrars])
print(asyncio.run(_held()))"""


@pytest.mark.parametrize("server", ["consul", "etcd"], indirect=True)
async def test_load_registrars_recipe(
    server: ServerProcess, registry_of: Callable[[ServerProcess], Registry], tmp_path: Path
) -> None:
    (tmp_path / "agent.toml").write_text(AGENT_TOML.format(url=_url(server)))
    code = readme_block("# readme:load-registrars")
    assert code.count("\n...\n") == 1
    code = code.replace("\n...\n", "\n" + LOAD_WAIT.format(url=_url(server)) + "\n")
    lines = await asyncio.to_thread(_run, code, tmp_path, {})
    assert lines == ["[True, True]", "['orders-1', 'orders-2']"]
    assert await registry_of(server).health() == {}  # both stopped: both gone


HOLD_UNTIL_WRITTEN = """\
import asyncio as _asyncio
import time as _time

import registry_agent as _registry_agent

_leave = _registry_agent.AsyncRegistrar.__aexit__


async def _aexit_once_written(self, *exc):
    # Before the block's `async with` ends (the entry withdrawn), wait until the registry
    # itself holds the new tags and weight: update() returns before they are written.
    backend = _registry_agent.open_backend({url!r})
    try:
        deadline = _time.monotonic() + 10
        while True:
            [health] = (await backend.list("orders")).instances.values()
            held = health.instance
            if set(held.tags) == {{"v1", "canary"}} and held.meta.get("weight") == "3":
                break
            assert _time.monotonic() < deadline, held
            await _asyncio.sleep(0.01)
    finally:
        await backend.close()
    print("registry:", sorted(held.tags), held.meta["weight"])
    return await _leave(self, *exc)


_registry_agent.AsyncRegistrar.__aexit__ = _aexit_once_written

"""


@pytest.mark.parametrize("server", ["consul", "etcd"], indirect=True)
async def test_live_update_recipe(
    server: ServerProcess, registry_of: Callable[..., Registry], tmp_path: Path
) -> None:
    code = _substitute(readme_block("# readme:live-update"), [(README_URL, _url(server), 1)])
    events: list[WatchEvent] = []
    watcher = AsyncWatcher(server.url, "orders")
    assert await watcher.wait_synced(10)

    async def collect() -> None:
        async for event in watcher:
            events.append(event)

    collecting = asyncio.create_task(collect())
    try:
        lines = await asyncio.to_thread(
            _run, HOLD_UNTIL_WRITTEN.format(url=_url(server)) + code, tmp_path, {}
        )
        assert lines == ["('v1', 'canary') 3", "registry: ['canary', 'v1'] 3"]
        assert await registry_of(server).health() == {}
        for _ in range(200):  # the watcher's view of the deregistration
            if events and events[-1].type is EventType.DELETED:
                break
            await asyncio.sleep(0.05)
    finally:
        collecting.cancel()
        await watcher.close()
    seen = [(e.type.value, tuple(e.instance.tags), e.instance.meta.get("weight")) for e in events]
    print(f"\nwatcher ({server.name}): {seen}")
    # The canary values reached the watcher (as an update, or in its first read when the
    # update landed before the watch answered: a watch coalesces), with no gap before
    # them, then the entry left.
    assert seen[-1][0] == "deleted", seen
    assert seen[-2][1:] == (("v1", "canary"), "3"), seen
    assert [kind for kind, *_ in seen] in (["added", "updated", "deleted"], ["added", "deleted"])


# Names a block may use without defining: it continues the block before it.
CONTINUES = {"# readme:readiness": {"registrar"}}  # the metrics block's registrar


@pytest.mark.parametrize(
    "block", [b for b in readme_blocks() if b.lang == "python"], ids=lambda b: f"line{b.line}"
)
def test_readme_python_blocks_are_formatted_and_lint_clean(block: Block) -> None:
    """``ruff format --check`` and ``ruff check`` with the project's settings, as a file
    at the project's root. A fragment (part of a larger file) and a block that continues
    the one before it may use names defined elsewhere (F821), and only those."""
    ruff = str(Path(sys.executable).with_name("ruff"))
    name = str(ROOT / f"README_block_{block.line}.py")
    fmt = subprocess.run(
        [ruff, "format", "--diff", "--stdin-filename", name, "-"],
        input=block.body, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    lint = subprocess.run(
        [ruff, "check", "--output-format", "json", "--stdin-filename", name, "-"],
        input=block.body, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert lint.returncode in (0, 1), lint.stderr
    found = json.loads(lint.stdout)
    allowed = next((names for mark, names in CONTINUES.items() if mark in block.body), set())
    problems = [
        f"{item['code']} line {item['location']['row']}: {item['message']}"
        for item in found
        if not (
            item["code"] == "F821" and (block.fragment or item["message"].split("`")[1] in allowed)
        )
    ]
    assert not problems, problems
