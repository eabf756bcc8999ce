"""Agent logs: readable text or one JSON object per line, secrets always masked."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable

__all__ = ["configure_logging", "remember_secrets"]

_EXTRA_FIELDS = ("event", "service", "instance", "backend", "state", "error", "failures")
MASK = "***"


class _Redacting(logging.Formatter):
    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Mask these too (a reload brought new credentials; the old ones stay masked)."""
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted({*self.secrets, *(s for s in secrets if s)}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def message_of(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return message


class TextFormatter(_Redacting):
    """``2026-11-22T04:59:22Z INFO  registry_agent.registrar: message``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        return self.redact(
            f"{stamp} {record.levelname:<7} {record.name}: {self.message_of(record)}"
        )


class JsonFormatter(_Redacting):
    """One JSON object per line: ts, level, logger, message and the structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": self.message_of(record),
        }
        for name in _EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                data[name] = value
        return self.redact(json.dumps(data, ensure_ascii=False, default=str))


def remember_secrets(secrets: Iterable[str]) -> None:
    """Add ``secrets`` to what every handler set up by :func:`configure_logging` masks."""
    wanted = list(secrets)
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, _Redacting):
            handler.formatter.add(wanted)


def configure_logging(fmt: str, level: str, secrets: Iterable[str] = ()) -> logging.Handler:
    """Send every log line to stderr in ``fmt`` ("text" or "json"), masking ``secrets``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets) if fmt == "json" else TextFormatter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Per-request lines from the HTTP client would drown the state changes.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("httpcore").setLevel(max(logging.WARNING, root.level))
    return handler
