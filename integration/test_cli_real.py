"""The command line against real registries: what it says about entries it cannot read."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from registry_agent._cli import main
from registry_agent.testing.servers import EtcdServer


async def test_list_says_which_entries_it_skipped(
    etcd_server: EtcdServer, raw: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    await raw.put(b"orders.rpc/1", b"10.0.0.5:8080")
    await raw.put(b"orders.rpc/2", b"10.0.0.6")  # no port: not an endpoint go-zero can dial
    url = f"{etcd_server.url}?format=go-zero"
    # main() runs an event loop of its own: in a thread of its own.
    code = await asyncio.to_thread(main, ["list", "orders.rpc", "--backend", url])
    assert code == 0
    captured = capsys.readouterr()
    assert [line.split()[1] for line in captured.out.splitlines()[1:]] == ["10.0.0.5:8080"]
    assert "registry-agent: skipping 'orders.rpc/2': not a go-zero instance" in captured.err
