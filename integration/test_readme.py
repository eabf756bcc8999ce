"""The README's example runs as written, against a real Consul and a real etcd."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from registry_agent.testing.servers import ConsulServer, EtcdServer

README = Path(__file__).resolve().parents[1] / "README.md"


def example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    runnable = [block for block in blocks if "asyncio.run(main())" in block]
    assert len(runnable) == 1
    return runnable[0]


@pytest.mark.parametrize("kind", ["consul", "etcd"])
def test_readme_example_runs(
    kind: str, consul_server: ConsulServer, etcd_server: EtcdServer
) -> None:
    url = consul_server.url if kind == "consul" else etcd_server.url
    code = example().replace('"consul://127.0.0.1:8500"', repr(url))
    assert repr(url) in code
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "critical" in lines[0]
    assert lines[1].endswith("[]")  # the watch's first snapshot: no healthy instance
