"""Structured logging: one JSON object per line, one line per event.

Call sites pass fields with `extra={"fields": {...}}` (or use `event()`); secrets are never among them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = "fields"
_NO_CALLER = "(unknown file)"  # what logging records when it does not look the caller up
# what a client sends (a path, a method, an address) is cut to this length in the log and the audit
CLIP_CHARS = 200
_dumps = json.JSONEncoder(default=str, separators=(",", ":")).encode


class JsonFormatter(logging.Formatter):
    """Cheap enough for an access line per request: the date and time are formatted once a second."""

    _second = -1
    _prefix = ""

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, _RESERVED, None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _dumps(entry)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, _RESERVED, None)
        if isinstance(fields, dict) and fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # neither formatter shows the thread or the process: not collecting them makes every record cheaper
    # (the logging HOWTO's "Optimization")
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # aiohttp's own access log is replaced by ours (see app.py)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def clip(text: str | None, limit: int = CLIP_CHARS) -> str | None:
    """Client-supplied `text`, cut to `limit` characters with a marker saying how long it was."""
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}...[cut from {len(text)} chars]"


def event(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    """Log `msg` with structured fields.

    The record is made directly, without looking up the calling function and line (`Logger.log` walks
    the stack for them): no formatter shows them, and the access log makes one record per request."""
    if logger.isEnabledFor(level):
        extra = {_RESERVED: fields}
        logger.handle(logger.makeRecord(logger.name, level, _NO_CALLER, 0, msg, (), None, extra=extra))
