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

    def line(self, created: float, level: str, logger: str, msg: str, fields: dict[str, Any] | None) -> str:
        entry: dict[str, Any] = {"ts": self._timestamp(created), "level": level, "logger": logger, "msg": msg}
        if fields:
            entry.update(fields)
        return _dumps(entry)

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, _RESERVED, None)
        fields = fields if isinstance(fields, dict) else None
        if record.exc_info:
            fields = {**(fields or {}), "exception": self.formatException(record.exc_info)}
        return self.line(record.created, record.levelname.lower(), record.name, record.getMessage(), fields)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, _RESERVED, None)
        if isinstance(fields, dict) and fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


class _Direct:
    """The JSON handler that setup_logging installed. `event` writes its line to it itself while it is the
    root logger's only handler and nothing on the way (a logger's handler or filter, the handler's filter)
    would see the record: the same line as through `logging`, without a LogRecord and the walk through the
    loggers (the access log writes one line a request). Anything else goes through `logging` (a test's
    capture, a handler added later, the text format)."""

    handler: logging.StreamHandler | None = None  # type: ignore[type-arg]


def _only_to(handler: logging.Handler, logger: logging.Logger) -> bool:
    node: logging.Logger | None = logger
    while node is not None and node is not logging.root:
        if node.handlers or node.filters or not node.propagate:
            return False
        node = node.parent
    return node is logging.root and node.handlers == [handler] and not node.filters and not handler.filters


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    _Direct.handler = handler if isinstance(formatter, JsonFormatter) else None
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
    the stack for them): no formatter shows them, and the access log makes one record per request. With
    the JSON format, the line is written without a record (`_Direct`)."""
    if not logger.isEnabledFor(level):
        return
    handler = _Direct.handler
    formatter = handler.formatter if handler is not None else None
    if (
        handler is not None
        and isinstance(formatter, JsonFormatter)
        and level >= handler.level
        and _only_to(handler, logger)
    ):
        created = time.time()
        handler.acquire()  # as logging formats: under the handler's lock (the formatter keeps a cache)
        try:
            line = formatter.line(created, logging.getLevelName(level).lower(), logger.name, msg, fields)
            handler.stream.write(line + handler.terminator)
            handler.flush()
        except Exception:  # as logging does: said on stderr, never raised at the caller
            handler.handleError(_record(logger, level, msg, fields))
        finally:
            handler.release()
        return
    logger.handle(_record(logger, level, msg, fields))


def _record(logger: logging.Logger, level: int, msg: str, fields: dict[str, Any]) -> logging.LogRecord:
    return logger.makeRecord(logger.name, level, _NO_CALLER, 0, msg, (), None, extra={_RESERVED: fields})
