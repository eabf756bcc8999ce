"""The status server and the log formatters, alone."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from registry_agent._agent.logs import JsonFormatter, TextFormatter, configure_logging
from registry_agent._agent.status import StatusServer, json_body


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


async def test_status_server_routes_and_methods() -> None:
    server = StatusServer("127.0.0.1", 0, {"/healthz": lambda: json_body(200, {"ok": True})})
    await server.start()
    try:
        status, headers, body = await request(
            server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert (status, json.loads(body)) == (200, {"ok": True})
        assert headers["Content-Type"] == "application/json"
        status, _, body = await request(server.port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
        assert (status, body) == (200, b"")
        status, headers, _ = await request(server.port, b"POST /healthz HTTP/1.1\r\n\r\n")
        assert (status, headers["Allow"]) == (405, "GET, HEAD")
        status, _, body = await request(server.port, b"GET /nope HTTP/1.1\r\n\r\n")
        assert status == 404
        assert b"/healthz" in body
        status, _, _ = await request(server.port, b"garbage\r\n\r\n")
        assert status == 400
    finally:
        await server.close()


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord(
        "registry_agent.registrar", logging.WARNING, __file__, 1, message, args, None
    )
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_text_and_json_logs_mask_secrets() -> None:
    rec = record(
        "token %s rejected",
        "tok-123",
        event="register_failed",
        service="orders",
        error="bad tok-123",
    )
    text = TextFormatter(["tok-123"]).format(rec)
    assert "tok-123" not in text
    assert "token *** rejected" in text
    data = json.loads(JsonFormatter(["tok-123"]).format(rec))
    assert data["message"] == "token *** rejected"
    assert (data["event"], data["service"], data["error"]) == (
        "register_failed",
        "orders",
        "bad ***",
    )
    assert data["level"] == "warning"


def test_configure_logging_replaces_handlers(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("json", "info", ["pw"])
        logging.getLogger("registry_agent.test").info("hello pw")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert json.loads(line)["message"] == "hello ***"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
