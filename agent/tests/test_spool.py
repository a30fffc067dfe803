"""The spool: records the store cannot take wait on local disk and reach it later, once each, in order.

Unit tests of the spool's files; the writer with a real SQLite store that is made "away" (a write that
raises, or one that hangs); and the real agent with its SQLite database locked, killed, and started again.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import sqlite3
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT, AgentHandle
from prometheus_client.parser import text_string_to_metric_families
from support import bearer, http, wait_until

from llmfleet_agent.batching import BatchWriter
from llmfleet_agent.cli import format_status
from llmfleet_agent.spool import Spool, dataclass_codec
from llmfleet_agent.store import AuditRecord, SQLiteStore
from llmfleet_agent.usage import UsageRecord

T0 = 1_700_000_000.0


def usage(i: int, **extra: Any) -> UsageRecord:
    fields: dict[str, Any] = {
        "ts": T0 + i / 3,  # not a short decimal: it must come back exactly
        "request_id": f"r{i:05d}",
        "key_id": "k1",
        "method": "POST",
        "route": "/api/chat",
        "model": "tinyllama:latest",
        "status": 200,
        "stream": bool(i % 2),
        "prompt_tokens": i,
        "completion_tokens": None,
        "ttfb_ms": 0.1 + 0.2,
        "duration_ms": 1e-300 * i,
        "error": None,
        "host": "h1",
        "user": None,
    }
    return UsageRecord(**{**fields, **extra})


def usage_spool(
    directory: Path, max_bytes: int = 1 << 30, segment_bytes: int = 4 << 20
) -> Spool[UsageRecord]:
    return Spool(directory, "usage", *dataclass_codec(UsageRecord), max_bytes, segment_bytes)


def segments(directory: Path, name: str = "usage") -> list[Path]:
    return sorted(directory.glob(f"{name}-*.jsonl"))


def drain(spool: Spool[Any], limit: int = 7) -> list[Any]:
    """Read and commit everything, as the writer does when the store takes it all."""
    out: list[Any] = []
    while (chunk := spool.read(limit)) is not None:
        out.extend(chunk.records)
        spool.commit(chunk)
    return out


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[Callable[..., Spool[UsageRecord]]]:
    made: list[Spool[UsageRecord]] = []

    def make(**kwargs: Any) -> Spool[UsageRecord]:
        spool = usage_spool(tmp_path / "spool", **kwargs)
        spool.open()
        made.append(spool)
        return spool

    yield make
    for spool in made:
        spool.close()


# ----- the spool's files -----
def test_append_and_replay_in_order_across_segments(opened: Callable[..., Spool[UsageRecord]]) -> None:
    spool = opened(segment_bytes=2000)
    records = [usage(i) for i in range(60)]
    for start in range(0, 60, 6):
        assert spool.append(records[start : start + 6])
    files = segments(spool.directory)
    assert len(files) > 3  # closed at the size, a new one opened
    assert stat.S_IMODE(spool.directory.stat().st_mode) == 0o700
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}
    assert spool.records == 60 and spool.bytes == sum(f.stat().st_size for f in files)
    assert spool.oldest_ts == records[0].ts
    # what went in comes out: same order, same values (floats exactly)
    assert drain(spool) == records
    assert segments(spool.directory) == [] and spool.empty
    assert (spool.records, spool.bytes, spool.oldest_ts, spool.age()) == (0, 0, None, 0.0)


def test_audit_records_round_trip(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "audit", *dataclass_codec(AuditRecord), max_bytes=1 << 20)
    spool.open()
    records = [
        AuditRecord("drain", "k1", {"if_idle_for": 0.1, "nested": {"list": [1, None, "é"]}}, T0 + 0.7, "h1"),
        AuditRecord("auth_failed", None, {"path": "/x\ny\udcff"}),
    ]
    assert spool.append(records)
    assert drain(spool) == records
    spool.close()


def test_replay_moves_the_age_and_a_reopen_sees_everything_left(
    opened: Callable[..., Spool[UsageRecord]],
) -> None:
    spool = opened()
    records = [usage(i) for i in range(30)]
    spool.append(records[:10])
    spool.append(records[10:])
    assert spool.age(now=records[0].ts + 5) == pytest.approx(5)
    chunk = spool.read(12)
    assert chunk is not None and chunk.records == records[:12]
    assert spool.records == 30  # not before the store has them
    spool.commit(chunk)
    assert spool.records == 18 and spool.oldest_ts == records[12].ts
    spool.commit(chunk)  # a stale chunk changes nothing
    assert spool.records == 18
    spool.close()  # as after a crash: everything that was appended is on disk, the cursor is not
    again = opened()
    # the store has the first 12 already; reading the segment again is what its idempotent inserts absorb
    assert again.records == 30 and again.oldest_ts == records[0].ts
    again.append([usage(99)])
    assert len(segments(again.directory)) == 2  # never appends to a segment an earlier run left
    assert drain(again) == [*records, usage(99)]


def test_torn_last_line_is_skipped_and_logged(
    opened: Callable[..., Spool[UsageRecord]], caplog: pytest.LogCaptureFixture
) -> None:
    spool = opened()
    records = [usage(i) for i in range(5)]
    spool.append(records)
    spool.close()
    [file] = segments(spool.directory)
    with file.open("ab") as fh:  # the agent died in the middle of a write
        fh.write(b'{"ts": 1700000000.5, "request_id": "r9')
    caplog.set_level(logging.WARNING, "llmfleet.spool")
    again = opened()
    assert again.records == 5
    assert any("torn" in r.getMessage() for r in caplog.records)
    assert drain(again) == records
    assert segments(again.directory) == [] and again.records == 0


def test_unreadable_line_is_skipped(opened: Callable[..., Spool[UsageRecord]]) -> None:
    spool = opened()
    spool.append([usage(0)])
    spool.close()
    [file] = segments(spool.directory)
    with file.open("ab") as fh:
        fh.write(b"not json\n" + b'{"no": "fields"}\n')
    again = opened()
    again.append([usage(1)])
    assert again.records == 4
    assert drain(again) == [usage(0), usage(1)]
    assert again.unreadable == 2 and again.records == 0


def test_bound_drops_whole_batches_counts_and_logs_once(
    opened: Callable[..., Spool[UsageRecord]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "llmfleet.spool")
    spool = opened(max_bytes=4000)
    kept: list[UsageRecord] = []
    for start in range(0, 100, 5):
        batch = [usage(i) for i in range(start, start + 5)]
        if spool.append(batch):
            kept.extend(batch)
    assert 0 < len(kept) < 100
    assert spool.dropped == 100 - len(kept)
    assert spool.bytes <= 4000
    full = [r for r in caplog.records if "store.spool_max_bytes" in r.getMessage()]
    assert len(full) == 1, full  # once per episode
    # the store takes some: new records fit again
    chunk = spool.read(10)
    assert chunk is not None
    spool.commit(chunk)
    assert spool.append([usage(500)])
    assert drain(spool) == [*kept[10:], usage(500)]


def test_a_write_the_disk_refuses_leaves_no_part_of_the_batch(
    opened: Callable[..., Spool[UsageRecord]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, "llmfleet.spool")
    spool = opened()
    first, second, third = [usage(i) for i in range(5)], [usage(i) for i in range(5, 9)], [usage(9)]
    assert spool.append(first)
    size = spool.bytes
    real_write = os.write
    calls = 0

    def full_disk(fd: int, data: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))  # half of the batch gets in
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("llmfleet_agent.spool.os.write", full_disk)
    assert not spool.append(second)
    monkeypatch.undo()
    assert spool.dropped == 4 and (spool.bytes, spool.records) == (size, 5)
    assert [f.stat().st_size for f in segments(spool.directory)] == [size]  # cut back
    assert spool.append(third)  # to a new segment
    assert len(segments(spool.directory)) == 2
    assert drain(spool) == first + third
    assert any("cannot write" in r.getMessage() for r in caplog.records)


def test_a_segment_cut_short_by_hand_is_not_replayed_for_ever(
    opened: Callable[..., Spool[UsageRecord]],
) -> None:
    spool = opened()
    spool.append([usage(i) for i in range(10)])
    [file] = segments(spool.directory)
    lines = file.read_bytes().splitlines(keepends=True)
    file.write_bytes(b"".join(lines[:4]))
    assert drain(spool) == [usage(i) for i in range(4)]
    assert spool.empty and spool.records == 0 and spool.bytes == 0


def test_a_second_process_cannot_use_the_same_spool(opened: Callable[..., Spool[UsageRecord]]) -> None:
    first = opened()
    second = usage_spool(first.directory)
    with pytest.raises(OSError, match="another process"):
        second.open()
    audit = Spool(first.directory, "audit", *dataclass_codec(AuditRecord), max_bytes=1 << 20)
    audit.open()  # the other spool in the same directory is another name
    audit.close()


# ----- the writer with a real SQLite store -----
class Outage:
    """The store's write, made to fail (away) or hang (slow) on demand."""

    def __init__(self, write: Callable[[list[Any]], Awaitable[None]]) -> None:
        self._write = write
        self.away = False
        self.slow = False
        self.attempts = 0

    async def __call__(self, records: list[Any]) -> None:
        self.attempts += 1
        if self.away:
            raise ConnectionError("store away")
        while self.slow:
            await asyncio.sleep(0.01)
        await self._write(records)


async def until(predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def stored_ids(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT request_id FROM usage ORDER BY rowid")]


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    store = SQLiteStore(tmp_path / "agent.db")
    await store.open()
    yield store
    await store.close()


def writer_for(outage: Outage, spool_dir: Path, **kwargs: Any) -> BatchWriter[UsageRecord]:
    options = {"interval": 0.05, "batch_size": 20, **kwargs}
    return BatchWriter("usage", outage, spool=usage_spool(spool_dir), **options)


async def test_records_of_an_outage_arrive_after_it_once_and_in_order(
    store: SQLiteStore, tmp_path: Path
) -> None:
    outage = Outage(store.add_usage)
    writer = writer_for(outage, tmp_path / "spool")
    await writer.open()
    spool = writer.spool
    assert spool is not None
    sent = [usage(i) for i in range(400)]
    for record in sent[:50]:
        writer.add(record)
    await until(lambda: writer.written == 50, "the first records to be written")
    outage.away = True
    for start in range(50, 300, 50):
        for record in sent[start : start + 50]:
            writer.add(record)
        # memory does not fill while the store is away: each batch goes to disk
        await until(lambda: writer.pending == 0, "the records to leave memory")
    assert spool.records == 250 and writer.failing_since is not None
    assert writer.snapshot()["last_write_ok"] is False
    assert stored_ids(store.path) == [r.request_id for r in sent[:50]]
    outage.away = False
    for record in sent[300:]:  # records keep coming: they go behind the spooled ones
        writer.add(record)
    # the spool is emptied after its records are in the store: wait for both, not for the count alone
    await until(lambda: writer.written == 400 and spool.empty, "everything written, the spool emptied")
    assert spool.empty and spool.records == 0 and segments(tmp_path / "spool") == []
    assert stored_ids(store.path) == [r.request_id for r in sent]  # once each, in order
    assert writer.failing_since is None
    assert await store.list_usage(0.0) == sorted(sent, key=lambda r: r.ts)  # values exact, floats too
    await writer.close()


async def test_the_store_is_tried_once_an_interval_while_full_batches_keep_coming(
    store: SQLiteStore, tmp_path: Path
) -> None:
    outage = Outage(store.add_usage)
    writer = writer_for(outage, tmp_path / "spool", interval=0.1, batch_size=5)
    await writer.open()
    sent: list[UsageRecord] = []

    async def feed(seconds: float) -> None:  # a full batch every 20 ms: a kick each time
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(5):
                sent.append(usage(len(sent)))
                writer.add(sent[-1])
            await asyncio.sleep(0.02)

    outage.away = True
    await feed(0.2)
    tries = outage.attempts
    await feed(1.0)
    tries = outage.attempts - tries
    assert 3 <= tries <= 13, tries  # about 10: once an interval, not once a batch (about 50)
    outage.away = False
    await feed(0.3)
    await until(lambda: writer.written == len(sent), "everything to be written")
    assert stored_ids(store.path) == [r.request_id for r in sent]
    await writer.close()


async def test_a_slow_store_sends_records_to_the_spool(store: SQLiteStore, tmp_path: Path) -> None:
    outage = Outage(store.add_usage)
    writer = writer_for(outage, tmp_path / "spool", write_timeout=0.1)
    await writer.open()
    outage.slow = True
    sent = [usage(i) for i in range(60)]
    for record in sent:
        writer.add(record)
    await until(lambda: writer.spool is not None and writer.spool.records == 60, "the spool to take them")
    assert writer.last_error is not None and "0.1s" in writer.last_error
    outage.slow = False
    await until(lambda: writer.written == 60, "the records to be written")
    assert stored_ids(store.path) == [r.request_id for r in sent]
    await writer.close()


async def test_a_writer_closed_while_away_leaves_its_records_to_the_next(
    store: SQLiteStore, tmp_path: Path
) -> None:
    outage = Outage(store.add_usage)
    first = writer_for(outage, tmp_path / "spool", interval=60)  # closes before its first pass
    await first.open()
    sent = [usage(i) for i in range(45)]
    for record in sent:
        first.add(record)
    outage.away = True
    await first.close()  # tries the store once, then the spool takes them
    assert first.pending == 0 and stored_ids(store.path) == []
    assert segments(tmp_path / "spool")
    outage.away = False
    second = writer_for(outage, tmp_path / "spool")
    await second.open()  # replays at start
    await until(lambda: second.written == 45, "the spooled records to be written")
    assert stored_ids(store.path) == [r.request_id for r in sent]
    await second.close()
    assert segments(tmp_path / "spool") == []


async def test_a_replay_after_a_crash_does_not_double_records(store: SQLiteStore, tmp_path: Path) -> None:
    """The agent died after the store took a chunk and before the spool heard of it."""
    spool = usage_spool(tmp_path / "spool")
    spool.open()
    sent = [usage(i) for i in range(50)]
    spool.append(sent)
    chunk = spool.read(30)
    assert chunk is not None
    await store.add_usage(chunk.records)  # ... and no commit: the crash
    spool.close()
    writer = writer_for(Outage(store.add_usage), tmp_path / "spool")
    await writer.open()
    await until(lambda: writer.spool is not None and writer.spool.empty, "the replay")
    assert stored_ids(store.path) == [r.request_id for r in sent]
    await writer.close()


async def test_a_poison_record_from_the_spool_does_not_hold_back_the_others(
    store: SQLiteStore, tmp_path: Path
) -> None:
    outage = Outage(store.add_usage)
    writer = writer_for(outage, tmp_path / "spool")
    await writer.open()
    outage.away = True
    sent = [usage(i) for i in range(30)]
    sent[7] = usage(7, error="bad \udcff text")  # SQLite cannot encode it: the store refuses it for good
    for record in sent:
        writer.add(record)
    await until(lambda: writer.spool is not None and writer.spool.records == 30, "the spool to take them")
    outage.away = False
    await until(lambda: writer.spool is not None and writer.spool.empty, "the replay")
    assert writer.dropped == 1 and writer.written == 29
    assert stored_ids(store.path) == [r.request_id for r in sent if r.request_id != "r00007"]
    await writer.close()


async def test_without_a_spool_records_wait_in_memory(store: SQLiteStore) -> None:
    outage = Outage(store.add_usage)
    writer: BatchWriter[UsageRecord] = BatchWriter("usage", outage, interval=0.05, batch_size=20)
    writer.start()
    outage.away = True
    for i in range(30):
        writer.add(usage(i))
    await until(lambda: outage.attempts >= 2, "a retry")
    assert writer.pending == 30
    outage.away = False
    await until(lambda: writer.written == 30, "the records to be written")
    await writer.close()


# ----- the agent -----
def test_a_spool_directory_the_agent_cannot_use_stops_it_with_one_line(make_agent: Any) -> None:
    agent: AgentHandle = make_agent()
    (agent.dir / "a-file").write_text("")
    config = {
        **agent.config,
        "store": {**agent.config["store"], "spool_dir": str(agent.dir / "a-file" / "spool")},
    }
    agent.config_path.write_text(json.dumps(config))
    res = subprocess.run(
        [AGENT, "serve", "--config", str(agent.config_path)], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    where = agent.dir / "a-file" / "spool"
    assert (
        last
        == "llmfleet-agent: configuration error: " + f"store.spool_dir: cannot use {where}: Not a directory"
    )


def _scrape(agent: AgentHandle) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = agent.get("/metrics", agent.key("operator"))[1]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _chat(agent: AgentHandle, key: str) -> str:
    body = {"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    code, answer, headers = http("POST", agent.url + "/api/chat", body, bearer(key))
    assert code == 200, answer
    return str(headers["X-Request-Id"])


@pytest.mark.slow
def test_agent_spools_while_its_database_is_locked_and_replays_after_sigkill(make_agent: Any) -> None:
    """Another process holds SQLite's write lock: the agent's writes time out (store.connect_timeout +
    2 x store.statement_timeout), the records go to the spool, the agent answers throughout; killed with
    SIGKILL and started again, it writes them, once each, in order."""
    agent: AgentHandle = make_agent({"store": {"connect_timeout": 0.2, "statement_timeout": 0.2}})
    agent.start().wait_ready()
    db = agent.dir / "agent.db"
    key = agent.key("user")
    agent.key("operator")  # made and used before the lock: the agent has it cached
    before = [_chat(agent, key) for _ in range(3)]
    wait_until(lambda: stored_ids(db) == before, 10, "the first records to be written")
    status = agent.status()["store"]
    assert (status["kind"], status["last_write_ok"], status["usage"]["spool"]["records"]) == (
        "sqlite",
        True,
        0,
    )
    assert status["spool_dir"] == str(agent.dir / "spool")

    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        during = [_chat(agent, key) for _ in range(20)]  # answered while the store takes nothing

        def spooled() -> dict[str, Any] | None:
            store = agent.status()["store"]
            usage_ = store["usage"]
            return store if usage_["spool"]["records"] == 20 and usage_["pending"] == 0 else None

        store = wait_until(spooled, 15, "the records to be spooled")
        assert store["last_write_ok"] is False and store["failing_since"] <= time.time()
        assert "took more than" in store["usage"]["last_error"]
        assert store["usage"]["spool"]["bytes"] > 0 and store["usage"]["spool"]["oldest_age_seconds"] > 0
        assert store["usage"]["spool"]["dropped"] == 0
        metrics = _scrape(agent)
        assert metrics[("llmfleet_spool_records", (("spool", "usage"),))] == 20
        assert metrics[("llmfleet_spool_bytes", (("spool", "usage"),))] > 0
        assert metrics[("llmfleet_spool_oldest_age_seconds", (("spool", "usage"),))] > 0
        assert metrics[("llmfleet_spool_dropped_total", (("spool", "usage"),))] == 0
        assert metrics[("llmfleet_store_failing", (("records", "usage"),))] == 1
        assert metrics[("llmfleet_records_pending", (("records", "usage"),))] == 0
        line = next(x for x in format_status(agent.status()).splitlines() if x.startswith("store"))
        assert "sqlite, FAILING for" in line and "usage 20 (" in line, line
        assert agent.proc is not None
        agent.proc.signal(signal.SIGKILL)
        agent.proc.wait(timeout=10)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert stored_ids(db) == before
    agent.start().wait_ready()
    wait_until(lambda: len(stored_ids(db)) >= 23, 15, "the spooled records to be written")
    assert stored_ids(db) == before + during  # once each, in order
    wait_until(lambda: agent.status()["store"]["usage"]["spool"]["records"] == 0, 10, "the spool to empty")
    assert not list((agent.dir / "spool").glob("usage-*.jsonl"))
    assert any("written first" in line for line in agent.log().splitlines())
