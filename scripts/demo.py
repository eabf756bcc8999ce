"""First-run demo, narrated: real Consul and etcd, a sample service, the agent, a watcher.

For each registry it shows: registration, health broken (withdrawn), health
healed (back), the registry restarted empty (re-registered) and the agent
stopped (deregistered), with the delay of each as the watcher saw it.
Every process it starts is stopped by PID at the end; it exits 0 when every
step happened within its bound, 1 otherwise.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from registry_agent import EventType, Watcher, WatchEvent
from registry_agent.testing.servers import ConsulServer, EtcdServer, ServerProcess, free_port

HERE = Path(__file__).resolve().parent
SERVICE = "demo-web"
INTERVAL, FALL, RISE, TTL = 0.5, 2, 2, 3.0
started = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - started:6.2f}s] {text}", flush=True)


class Failed(Exception):
    pass


class EventLog:
    """A watcher in a thread; the narrator waits for the events it expects."""

    def __init__(self, url: str) -> None:
        self.events: queue.Queue[tuple[float, WatchEvent]] = queue.Queue()
        self.watcher = Watcher(url, SERVICE)
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        for event in self.watcher:
            at = time.monotonic()
            health = "healthy" if event.healthy else "not healthy"
            say(f"    watcher: {event.type:8} {event.instance.id} ({health})")
            self.events.put((at, event))

    def expect(self, kind: EventType, within: float) -> float:
        """Wait for an event of ``kind``; returns when it was seen."""
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failed(f"no {kind} event within {within:g}s")
            try:
                at, event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if event.type is kind:
                return at

    def drain(self, wait: float) -> None:
        """Let late events print; a watcher back only after the repair reports no change."""
        time.sleep(wait)
        if self.events.empty():
            say("    watcher: no change to report (it was reconnecting while the entry came back)")
        while not self.events.empty():
            self.events.get()

    def close(self) -> None:
        self.watcher.close()
        self.thread.join(5)


def agent_status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as response:
        data: dict[str, Any] = json.loads(response.read())["services"][0]
        return data


def wait_reregistered(port: int, before: int, since: float, within: float) -> float:
    """Seconds from ``since`` until the agent reports a new registration, passing."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status = agent_status(port)
        if (
            status["counters"]["reregistrations"] > before
            and status["registry_status"] == "passing"
        ):
            return time.monotonic() - since
        time.sleep(0.02)
    raise Failed(f"not re-registered within {within:g}s")


def run_round(server: ServerProcess, workdir: Path) -> None:
    say(f"== {server.name}: dev server at {server.url} (pid {server.pid})")
    port = free_port()
    flag = workdir / f"{server.name}-healthy"
    flag.touch()
    sample = subprocess.Popen(
        [sys.executable, str(HERE / "sample_service.py"), str(port), str(flag)]
    )
    config = workdir / f"{server.name}.toml"
    status_port = free_port()
    config.write_text(
        f'[backend]\nurl = "{server.url}"\n\n[status]\nlisten = "127.0.0.1:{status_port}"\n\n'
        f'[[service]]\nname = "{SERVICE}"\naddress = "127.0.0.1"\nport = {port}\n'
        f'ttl = "{TTL:g}s"\ngate = {{ fall = {FALL}, rise = {RISE} }}\n\n'
        f'[[service.check]]\nhttp = "http://127.0.0.1:{port}/healthz"\ninterval = "{INTERVAL:g}s"\n'
    )
    log = open(workdir / f"{server.name}-agent.log", "wb")  # noqa: SIM115 - closed below
    events = EventLog(server.url)
    agent = subprocess.Popen(
        [sys.executable, "-m", "registry_agent", "run", "-c", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        say(f"sample service on port {port} (pid {sample.pid}); agent started (pid {agent.pid})")
        t0 = time.monotonic()
        seen = events.expect(EventType.ADDED, 10)
        say(f"registered {seen - t0:.2f}s after the agent started (rise={RISE} x {INTERVAL:g}s)")

        say("breaking the service's health check ...")
        flag.unlink()
        t0 = time.monotonic()
        seen = events.expect(EventType.DELETED, INTERVAL * FALL + 3)
        bound = INTERVAL * FALL
        say(f"withdrawn after {seen - t0:.2f}s (interval x fall = {bound:g}s, + one check run)")

        say("healing it ...")
        flag.touch()
        t0 = time.monotonic()
        seen = events.expect(EventType.ADDED, INTERVAL * RISE + 3)
        say(f"back after {seen - t0:.2f}s (interval x rise = {INTERVAL * RISE:g}s)")

        say(f"restarting {server.name} with all its data lost ...")
        before = agent_status(status_port)["counters"]["reregistrations"]
        server.restart(wipe=True)
        t0 = time.monotonic()
        say(f"{server.name} is back, empty")
        took = wait_reregistered(status_port, before, t0, within=10)
        say(f"re-registered {took:.2f}s after the registry came back (agent /status)")
        events.drain(0.5)  # what the watcher made of it, if it was away meanwhile

        say("stopping the agent (SIGTERM) ...")
        t0 = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        seen = events.expect(EventType.DELETED, 10)
        code = agent.wait(15)
        say(f"deregistered {seen - t0:.2f}s after SIGTERM; agent exited with {code}")
        if code != 0:
            raise Failed(f"agent exited with {code}")
    except Failed:
        log.flush()
        print((workdir / f"{server.name}-agent.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        for proc in (agent, sample):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        events.close()
        log.close()


def main() -> int:
    # The watcher's own log lines (an outage noticed) show up in the narration.
    logging.basicConfig(format="          log: %(message)s", level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="registry-agent-demo-") as tmp:
        workdir = Path(tmp)
        for make in (ConsulServer, EtcdServer):
            server = make()
            try:
                server.start()
                run_round(server, workdir)
            except Failed as exc:
                say(f"FAILED: {exc}")
                return 1
            finally:
                server.close()
    say("done: every process this demo started is stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
