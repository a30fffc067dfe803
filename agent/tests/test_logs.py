"""The log lines: one JSON object a line, the same whether `event` writes it itself or through `logging`."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from llmfleet_agent.logs import LineHandler, TextFormatter, event, event_later, setup_logging


@pytest.fixture
def json_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], io.StringIO]]:
    """setup_logging("info", "json") on a buffer as stderr, called in the test itself (pytest sets stderr
    and the root's handlers anew for each phase of a test); the root logger as it was afterwards."""

    def setup() -> io.StringIO:
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        setup_logging("info", "json")
        return stream

    saved = logging.root.handlers[:], logging.root.level
    try:
        yield setup
    finally:
        logging.root.handlers[:] = saved[0]
        logging.root.setLevel(saved[1])


def made_records(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The messages of the LogRecords made from now on."""
    made: list[str] = []
    original = logging.Logger.makeRecord

    def counting(self: logging.Logger, *args: object, **kwargs: object) -> logging.LogRecord:
        record = original(self, *args, **kwargs)  # type: ignore[arg-type]
        made.append(record.getMessage())
        return record

    monkeypatch.setattr(logging.Logger, "makeRecord", counting)
    return made


def test_the_direct_line_is_the_line_logging_writes(
    json_logs: Callable[[], io.StringIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    stderr = json_logs()
    made = made_records(monkeypatch)
    log = logging.getLogger("llmfleet.test_logs")
    fields = {"method": "POST", "path": "/api/chat", "status": 200, "remote": None, "ms": 0.5}
    event(log, logging.INFO, "POST /api/chat 200", **fields)
    assert made == []  # written without a record
    log.addFilter(lambda record: True)  # something on the way sees records: through logging
    try:
        event(log, logging.INFO, "POST /api/chat 200", **fields)
    finally:
        log.filters.clear()
    assert made == ["POST /api/chat 200"]
    event(log, logging.DEBUG, "below the level")
    direct, through = (json.loads(line) for line in stderr.getvalue().splitlines())
    assert direct.pop("ts")[:16] == through.pop("ts")[:16]
    assert list(direct.items()) == list(through.items())  # the same members, in the same order
    assert direct == {"level": "info", "logger": "llmfleet.test_logs", "msg": "POST /api/chat 200", **fields}


def test_a_handler_added_later_sees_every_line(json_logs: Callable[[], io.StringIO]) -> None:
    seen: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    stderr = json_logs()
    capture = Capture()
    logging.root.addHandler(capture)
    try:
        event(logging.getLogger("llmfleet.test_logs"), logging.WARNING, "seen twice", n=1)
    finally:
        logging.root.removeHandler(capture)
    assert [(r.getMessage(), r.fields) for r in seen] == [("seen twice", {"n": 1})]  # type: ignore[attr-defined]
    assert json.loads(stderr.getvalue())["msg"] == "seen twice"


def test_a_field_that_cannot_be_written_is_said_not_raised(json_logs: Callable[[], io.StringIO]) -> None:
    stderr = json_logs()
    event(logging.getLogger("llmfleet.test_logs"), logging.INFO, "odd", pair={(1, 2): "a tuple as a key"})
    assert "--- Logging error ---" in stderr.getvalue()  # as logging says it, and the caller goes on


class CountingStream(io.StringIO):
    """A stderr that counts its writes."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_access_lines_are_put_off_and_go_out_together_in_order(json_logs: Callable[[], io.StringIO]) -> None:
    json_logs()
    stream = CountingStream()
    setup = logging.root.handlers[0]
    assert isinstance(setup, LineHandler)
    setup.setStream(stream)
    log = logging.getLogger("llmfleet.test_logs")

    async def requests() -> list[str]:
        for n in range(3):
            event_later(log, logging.INFO, "a request", n=n)
        assert stream.getvalue() == ""  # put off: the client's next request goes first
        deadline = time.monotonic() + 5
        while not stream.getvalue() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        event_later(log, logging.INFO, "put off again", n=3)
        logging.getLogger("aiohttp.server").warning("a record through logging")  # lets it out first
        event_later(log, logging.INFO, "put off once more", n=4)
        event(log, logging.WARNING, "a line not put off")  # lets it out first too
        return stream.getvalue().splitlines()

    lines = asyncio.run(requests())
    expected = ["a request"] * 3 + ["put off again", "a record through logging"]
    expected += ["put off once more", "a line not put off"]
    assert [json.loads(line)["msg"] for line in lines] == expected
    assert stream.writes == 4  # the first three in one write; each line put off then with the next
    event_later(log, logging.INFO, "off the loop")  # a command, a thread: at once
    assert json.loads(stream.getvalue().splitlines()[-1])["msg"] == "off the loop"


def test_the_lines_put_off_are_written_at_exit() -> None:
    """A process that ends before the timer ran: logging.shutdown (at exit) writes what waits."""
    script = """
import asyncio, logging
from llmfleet_agent.logs import event_later, setup_logging
setup_logging("info", "json")
async def last_request():
    event_later(logging.getLogger("llmfleet.access"), logging.INFO, "the last request")
asyncio.run(last_request())  # the loop is gone before its timer ran
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["msg"] for line in done.stderr.splitlines()] == ["the last request"]


class BrokenStream(io.StringIO):
    """A stderr whose reader is gone: writing and flushing fail."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_log_that_cannot_be_written_is_never_raised_at_the_caller(
    json_logs: Callable[[], io.StringIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    json_logs()
    said = io.StringIO()  # where logging says its errors: the real stderr
    monkeypatch.setattr(sys, "stderr", said)
    handler = logging.root.handlers[0]
    handler.setStream(BrokenStream())
    log = logging.getLogger("llmfleet.test_logs")
    raised: list[object] = []

    def errors() -> int:
        return said.getvalue().count("--- Logging error ---")

    async def on_the_loop() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: raised.append(context))
        before = errors()
        event_later(log, logging.INFO, "put off")
        deadline = time.monotonic() + 5
        while errors() == before and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # the timer's callback has returned

    try:
        event(log, logging.WARNING, "at once")  # off the loop
        event_later(log, logging.INFO, "at once too")
        assert errors() >= 2
        asyncio.run(on_the_loop())
        assert errors() >= 3  # said by the handler when its timer wrote them
        assert raised == []  # and nothing reached the loop
    finally:
        handler.setStream(io.StringIO())  # logging.shutdown flushes it at exit


def test_a_line_put_off_goes_through_the_formatter_set_since(json_logs: Callable[[], io.StringIO]) -> None:
    stderr = json_logs()

    async def put_off() -> None:
        event_later(logging.getLogger("llmfleet.test_logs"), logging.INFO, "a request", n=1)

    asyncio.run(put_off())
    handler = logging.root.handlers[0]
    handler.setFormatter(TextFormatter())  # e.g. a test's, before the timer ran
    handler.flush()
    assert "--- Logging error ---" not in stderr.getvalue()
    assert stderr.getvalue().rstrip().endswith("INFO llmfleet.test_logs: a request n=1")
