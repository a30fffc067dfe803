"""Structured logging: one JSON object per line, one line per event.

Call sites pass fields with `extra={"fields": {...}}` (or use `event()`); secrets are never among them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from .later import Later

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


MAX_PENDING = 512  # lines put off at most; one more writes them all at once


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """setup_logging's handler, to which `event` gives its lines itself (`add`). A request's access line
    (`put_off`) waits (later.py) and goes out with others, in one write, at most later.DELAY after the
    first of them; any other line, given or through `logging`, lets them out first, so that the lines stay
    in their order; `flush` (logging.shutdown's, at exit) lets them out too. On a thread without an event
    loop a line goes out at once."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[tuple[float, int, str, str, dict[str, Any]]] = []
        self._later = Later(self.flush)

    def add(
        self, created: float, level: int, name: str, msg: str, fields: dict[str, Any], put_off: bool
    ) -> None:
        self.acquire()
        try:
            self._pending.append((created, level, name, msg, fields))
            if put_off and len(self._pending) < MAX_PENDING and self._later.put_off():
                return
            self._write_pending()
        finally:
            self.release()
        self._flush_stream()

    def _write_pending(self) -> None:
        """Under the lock: format the lines put off (as logging does, the formatter keeps a cache) and write
        them; a line that cannot be written is said on stderr, never raised at the caller."""
        pending, self._pending = self._pending, []
        formatter = self.formatter
        lines = []
        for created, level, name, msg, fields in pending:
            try:
                if isinstance(formatter, JsonFormatter):  # as set up; another one set since: through it
                    level_name = logging.getLevelName(level).lower()
                    lines.append(formatter.line(created, level_name, name, msg, fields))
                else:
                    lines.append(self.format(_record(logging.getLogger(name), level, msg, fields)))
            except Exception:
                self.handleError(_record(logging.getLogger(name), level, msg, fields))
        if lines:
            try:
                self.stream.write(self.terminator.join(lines) + self.terminator)
            except Exception:
                self.handleError(_record(logging.getLogger(pending[-1][2]), logging.ERROR, "lost lines", {}))

    def emit(self, record: logging.LogRecord) -> None:
        if self._pending:  # under the lock: Handler.handle holds it
            self._write_pending()
        super().emit(record)

    def flush(self) -> None:
        self.acquire()
        try:
            if self._pending:
                self._write_pending()
        finally:
            self.release()
        self._flush_stream()

    def _flush_stream(self) -> None:
        """As StreamHandler.emit flushes: a stream that fails (a pipe whose reader is gone) is said on
        stderr, never raised at the caller or into the event loop."""
        try:
            super().flush()
        except Exception:
            failed = {"msg": "flushing the log failed", "levelno": logging.ERROR}
            self.handleError(logging.makeLogRecord(failed))


class _Direct:
    """The JSON handler that setup_logging installed. `event` gives its line to it itself while it is the
    root logger's only handler and nothing on the way (a logger's handler or filter, the handler's filter)
    would see the record: the same line as through `logging`, without a LogRecord and the walk through the
    loggers (the access log writes one line a request). Anything else goes through `logging` (a test's
    capture, a handler added later, the text format)."""

    handler: LineHandler | None = None


def _only_to(handler: logging.Handler, logger: logging.Logger) -> bool:
    node: logging.Logger | None = logger
    while node is not None and node is not logging.root:
        if node.handlers or node.filters or not node.propagate:
            return False
        node = node.parent
    return node is logging.root and node.handlers == [handler] and not node.filters and not handler.filters


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    handler = LineHandler(sys.stderr)
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


def flush() -> None:
    """Write the lines put off now: before a message printed to stderr directly, so that it comes last."""
    if _Direct.handler is not None:
        _Direct.handler.flush()


def clip(text: str | None, limit: int = CLIP_CHARS) -> str | None:
    """Client-supplied `text`, cut to `limit` characters with a marker saying how long it was."""
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}...[cut from {len(text)} chars]"


def event(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    """Log `msg` with structured fields.

    The record is made directly, without looking up the calling function and line (`Logger.log` walks
    the stack for them): no formatter shows them, and the access log makes one record per request. With
    the JSON format, the line goes to the handler without a record (`_Direct`)."""
    _event(logger, level, msg, fields, put_off=False)


def event_later(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    """`event` for a line a request leaves after its answer (the access log's): put off, with others, so
    that the next request does not wait for it (`LineHandler`)."""
    _event(logger, level, msg, fields, put_off=True)


def _event(logger: logging.Logger, level: int, msg: str, fields: dict[str, Any], put_off: bool) -> None:
    if not logger.isEnabledFor(level):
        return
    handler = _Direct.handler
    if (
        handler is not None
        and isinstance(handler.formatter, JsonFormatter)
        and level >= handler.level
        and _only_to(handler, logger)
    ):
        handler.add(time.time(), level, logger.name, msg, fields, put_off)
        return
    logger.handle(_record(logger, level, msg, fields))


def _record(logger: logging.Logger, level: int, msg: str, fields: dict[str, Any]) -> logging.LogRecord:
    return logger.makeRecord(logger.name, level, _NO_CALLER, 0, msg, (), None, extra={_RESERVED: fields})
