"""Nothing an anonymous client sends grows without bound: auth failures are aggregated and what they carry
is cut; old records are pruned; the store's files are private."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import stat
import time
from pathlib import Path

from conftest import AgentHandle
from support import bearer, http, wait_until

from llmfleet_agent.store import AuditRecord, SQLiteStore
from llmfleet_agent.usage import UsageRecord

DAY = 86400.0


def _auth_rows(db: Path) -> list[tuple[str | None, dict]]:  # type: ignore[type-arg]
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT key_id, detail FROM audit WHERE event = 'auth_failed'").fetchall()
    return [(key_id, json.loads(detail)) for key_id, detail in rows]


def test_clip_cuts_long_text_and_says_so() -> None:
    from llmfleet_agent.logs import CLIP_CHARS, clip

    assert clip("/api/chat") == "/api/chat"
    assert clip(None) is None
    cut = clip("x" * 8000)
    assert cut is not None and cut.startswith("x" * CLIP_CHARS) and "8000 chars" in cut
    assert len(cut) < CLIP_CHARS + 40


def test_unauthenticated_flood_adds_few_rows_and_bounded_log(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent()
    agent.start()
    before = len(agent.log().encode())
    long_tail = "x" * 8000
    for i in range(300):
        assert agent.get(f"/api/{i}/{long_tail}")[0] == 401
    for i in range(5):
        assert http("GET", f"{agent.url}/api/tags/{i}{long_tail}", headers=bearer("llmf_wrong"))[0] == 401
    assert agent.proc is not None
    agent.proc.stop()  # the window is flushed at shutdown: nothing is lost
    rows = _auth_rows(agent.dir / "agent.db")
    assert (agent.dir / "agent.db").stat().st_size < 100_000  # before: 2.4 MB more for 300 requests
    counts = sorted(detail["count"] for _, detail in rows)
    assert counts == [5, 300], rows
    for key_id, detail in rows:
        assert key_id is None and detail["remote"] == "127.0.0.1"
        assert detail["first_ts"] <= detail["last_ts"]
        assert len(json.dumps(detail)) < 1000, detail
    log = agent.log()
    grown = len(log.encode()) - before
    assert grown < 305 * 1000, f"the log grew by {grown} bytes"  # before: 7.3 MB
    assert max(len(line) for line in log.splitlines()) < 2000
    first = [line for line in log.splitlines() if '"msg":"authentication failed"' in line]
    assert len(first) == 2, first  # the first failure of each (remote, reason); the rest are counted
    summary = [line for line in log.splitlines() if "repeated authentication failures" in line]
    assert any('"count":300' in line for line in summary), summary


def test_auth_failures_are_audited_once_per_window(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent({"auth": {"failure_window": 3}})
    agent.start()
    secret, key_id = agent.create_key("user", "soon-revoked")
    agent.cli("keys", "revoke", key_id)
    # the agent may have cached the key before the revocation: refused within auth.refresh_interval
    wait_until(lambda: agent.get("/api/tags", secret)[0] == 401, 10, "the revocation to take effect")
    for _ in range(3):
        assert agent.get("/agent/status")[0] == 401
    db = agent.dir / "agent.db"

    def counts() -> dict[str | None, int]:
        return {k: d["count"] for k, d in _auth_rows(db)}

    # the agent still runs: the window's rows are written when the window closes
    wait_until(lambda: len(counts()) == 2, 10, "one row per (address, reason)")
    assert counts() == {None: 3, key_id: 1}
    reasons = {k: d["reason"] for k, d in _auth_rows(db)}
    assert reasons[key_id] == f"key {key_id} was revoked"
    assert agent.get("/agent/status")[0] == 401
    wait_until(lambda: len(_auth_rows(db)) == 3, 10, "a second window's row")
    assert sorted(d["count"] for _, d in _auth_rows(db)) == [1, 1, 3]


def test_failure_buckets_are_capped() -> None:
    from llmfleet_agent.failures import AuthFailures

    async def run() -> tuple[list[AuditRecord], AuthFailures]:
        written: list[AuditRecord] = []
        failures = AuthFailures(written.append, window=60, max_buckets=3)
        for i in range(10):
            failures.record(f"10.0.0.{i}", "invalid credential", None, "GET", "/x" * 5000)
        failures.record("10.0.0.1", "invalid credential", None, "GET", "/")
        failures.flush()
        return written, failures

    written, failures = asyncio.run(run())
    assert failures.buckets == 0
    by_remote = {r.detail["remote"]: r.detail["count"] for r in written}
    assert by_remote == {"10.0.0.0": 1, "10.0.0.1": 2, "10.0.0.2": 1, "*": 7}, by_remote
    assert all(len(str(r.detail)) < 1000 for r in written)


async def test_sqlite_prune_deletes_only_older_rows_in_batches(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "agent.db")
    store.prune_batch = 2
    await store.open()
    now = time.time()
    await store.add_audit([AuditRecord("drain", ts=now - d * DAY) for d in (100, 95, 91, 10, 0)])
    await store.add_usage([_usage(now - d * DAY) for d in (500, 401, 399, 1)])
    assert await store.prune(now - 90 * DAY, now - 400 * DAY) == (3, 2)
    assert len(await store.list_audit()) == 2 and len(await store.list_usage()) == 2
    assert await store.prune(None, None) == (0, 0)
    await store.close()


def _usage(ts: float) -> UsageRecord:
    return UsageRecord(ts, f"r{ts}", None, "GET", "/api/tags", None, 200, False, None, None, None, 1.0, None)


def test_agent_prunes_records_older_than_the_retention(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent({"store": {"audit_retention": "30d", "usage_retention": "1d"}})

    async def fill() -> None:
        store = SQLiteStore(agent.dir / "agent.db")
        await store.open()
        now = time.time()
        await store.add_audit([AuditRecord("drain", ts=now - 40 * DAY), AuditRecord("resume", ts=now - DAY)])
        await store.add_usage([_usage(now - 2 * DAY), _usage(now - 3600)])
        await store.close()

    asyncio.run(fill())
    agent.start()
    db = agent.dir / "agent.db"

    def left() -> tuple[list[str], int]:
        with sqlite3.connect(db) as conn:
            events = [
                e for (e,) in conn.execute("SELECT event FROM audit WHERE event IN ('drain', 'resume')")
            ]
            return events, conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0]

    wait_until(lambda: left() == (["resume"], 1), 10, "the old records to be pruned")


def test_store_files_are_private(make_agent) -> None:  # type: ignore[no-untyped-def]
    old = os.umask(0o022)
    try:
        agent: AgentHandle = make_agent()
        agent.start()
        agent.wait_ready()
    finally:
        os.umask(old)
    assert agent.get("/agent/status", agent.key("operator"))[0] == 200
    db = agent.dir / "agent.db"
    for path in (db, db.with_name("agent.db-wal"), db.with_name("agent.db-shm")):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, f"{path.name} is {mode:04o}"


async def test_pruning_survives_a_failing_store(caplog) -> None:  # type: ignore[no-untyped-def]
    from llmfleet_agent.config import StoreConfig
    from llmfleet_agent.retention import Pruner

    caplog.set_level(logging.INFO, "llmfleet.retention")
    calls: list[tuple[float | None, float | None]] = []

    class FlakyStore:
        async def prune(self, audit_before: float | None, usage_before: float | None) -> tuple[int, int]:
            calls.append((audit_before, usage_before))
            if len(calls) == 1:
                raise sqlite3.OperationalError("database is locked")
            return 1, 0

    pruner = Pruner(FlakyStore(), StoreConfig(usage_retention=None), interval=0.01)  # type: ignore[arg-type]
    pruner.start()
    while len(calls) < 3:
        await asyncio.sleep(0.01)
    await pruner.stop()
    assert "could not prune old records" in caplog.text and "pruned old records" in caplog.text
    audit_before, usage_before = calls[0]
    assert usage_before is None and audit_before is not None
    assert abs(time.time() - 90 * DAY - audit_before) < 60
