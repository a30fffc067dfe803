"""SQLite store (WAL mode). One connection, used from one worker thread, so calls never block the loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..keys import KEY_COLUMNS, KeyRecord, key_from_row, key_to_row
from ..roles import Role
from ..usage import USAGE_COLUMNS, UsageRecord
from .base import USAGE_GROUPS, AuditRecord, BudgetUse, UsageSummary

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id        TEXT PRIMARY KEY,
    name      TEXT NOT NULL,
    role      TEXT NOT NULL,
    hash      TEXT NOT NULL,
    models    TEXT NOT NULL DEFAULT '[]',
    created   REAL NOT NULL,
    expires   REAL,
    revoked   REAL,
    last_used REAL,
    max_concurrent INTEGER,
    rpm       INTEGER,
    owner_id  TEXT,
    owner     TEXT,
    suspended TEXT,
    checked   REAL,
    frontend  INTEGER NOT NULL DEFAULT 0,
    gateway   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS audit (
    ts      REAL NOT NULL,
    event   TEXT NOT NULL,
    key_id  TEXT,
    detail  TEXT NOT NULL DEFAULT '{}',
    host    TEXT,
    id      TEXT
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
CREATE TABLE IF NOT EXISTS usage (
    ts                REAL NOT NULL,
    request_id        TEXT NOT NULL,
    key_id            TEXT,
    method            TEXT NOT NULL,
    route             TEXT NOT NULL,
    model             TEXT,
    status            INTEGER NOT NULL,
    stream            INTEGER NOT NULL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    ttfb_ms           REAL,
    duration_ms       REAL NOT NULL,
    error             TEXT,
    host              TEXT,
    user              TEXT
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
"""

# tokens per user since the month began and since the day began, this host's and the others'
_BUDGET_USE = """
SELECT user, sum(CASE WHEN host IS ? THEN t END), sum(CASE WHEN host IS NOT ? THEN t END)
FROM (SELECT user, host, coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0) AS t
      FROM usage WHERE ts >= ? AND ts < ? AND user IS NOT NULL AND user <> '')
GROUP BY user
"""

# columns later versions added, in the order they were added: a database made by an earlier version gets
# them with ALTER TABLE when it is opened (fixed SQL, never built from input)
_ADDED_COLUMNS = {
    "keys": (
        ("owner_id", "ALTER TABLE keys ADD COLUMN owner_id TEXT"),
        ("owner", "ALTER TABLE keys ADD COLUMN owner TEXT"),
        ("suspended", "ALTER TABLE keys ADD COLUMN suspended TEXT"),
        ("checked", "ALTER TABLE keys ADD COLUMN checked REAL"),
        ("frontend", "ALTER TABLE keys ADD COLUMN frontend INTEGER NOT NULL DEFAULT 0"),
        ("gateway", "ALTER TABLE keys ADD COLUMN gateway INTEGER NOT NULL DEFAULT 0"),
    ),
    "audit": (
        ("host", "ALTER TABLE audit ADD COLUMN host TEXT"),
        ("id", "ALTER TABLE audit ADD COLUMN id TEXT"),
    ),
    "usage": (
        ("host", "ALTER TABLE usage ADD COLUMN host TEXT"),
        ("user", "ALTER TABLE usage ADD COLUMN user TEXT"),
    ),
}
_TABLE_INFO = {
    "keys": "PRAGMA table_info(keys)",
    "audit": "PRAGMA table_info(audit)",
    "usage": "PRAGMA table_info(usage)",
}
# what makes writes idempotent (a record replayed from the spool is stored once); an earlier version's
# rows are made to fit first: audit rows get an id, a doubled usage row (none is expected) is dropped
_UNIQUE = {
    "audit_id": (
        "UPDATE audit SET id = lower(hex(randomblob(12))) WHERE id IS NULL",
        "CREATE UNIQUE INDEX IF NOT EXISTS audit_id ON audit (id)",
    ),
    "usage_request": (
        "DELETE FROM usage WHERE rowid NOT IN (SELECT MIN(rowid) FROM usage GROUP BY request_id, ts)",
        "CREATE UNIQUE INDEX IF NOT EXISTS usage_request ON usage (request_id, ts)",
    ),
}

_INSERT_USAGE = (
    "INSERT OR IGNORE INTO usage (ts, request_id, key_id, method, route, model, status, stream,"
    " prompt_tokens, completion_tokens, ttfb_ms, duration_ms, error, host, user)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_USAGE = (
    "SELECT ts, request_id, key_id, method, route, model, status, stream, prompt_tokens, completion_tokens,"
    " ttfb_ms, duration_ms, error, host, user FROM usage WHERE ts >= ? AND ts < ? ORDER BY ts"
)
assert _INSERT_USAGE.count("?") == len(USAGE_COLUMNS) and _SELECT_USAGE.startswith(
    "SELECT " + ", ".join(USAGE_COLUMNS) + " FROM"
)
_INSERT_AUDIT = "INSERT OR IGNORE INTO audit (id, ts, event, key_id, detail, host) VALUES (?, ?, ?, ?, ?, ?)"
_SELECT_AUDIT = "SELECT id, ts, event, key_id, detail, host FROM audit ORDER BY ts DESC LIMIT ?"

# the only groupings a report offers, labelled as base.USAGE_GROUPS says: fixed SQL, never built from input
_SUMMARY = {
    "key": (
        "SELECT COALESCE(NULLIF(u.key_id, '') || COALESCE(' (' || NULLIF(k.name, '') || ')', ''), '-'),"
        " COUNT(*), SUM(u.status >= 400), SUM(COALESCE(u.prompt_tokens, 0)),"
        " SUM(COALESCE(u.completion_tokens, 0))"
        " FROM usage u LEFT JOIN keys k ON k.id = u.key_id WHERE u.ts >= ? AND u.ts < ? GROUP BY 1 ORDER BY 1"
    ),
    "user": (
        "SELECT COALESCE(NULLIF(u.user, ''), NULLIF(k.name, ''), '-'),"
        " COUNT(*), SUM(u.status >= 400), SUM(COALESCE(u.prompt_tokens, 0)),"
        " SUM(COALESCE(u.completion_tokens, 0))"
        " FROM usage u LEFT JOIN keys k ON k.id = u.key_id WHERE u.ts >= ? AND u.ts < ? GROUP BY 1 ORDER BY 1"
    ),
    "model": (
        "SELECT COALESCE(NULLIF(model, ''), '-'),"
        " COUNT(*), SUM(status >= 400), SUM(COALESCE(prompt_tokens, 0)), SUM(COALESCE(completion_tokens, 0))"
        " FROM usage WHERE ts >= ? AND ts < ? GROUP BY 1 ORDER BY 1"
    ),
    "host": (
        "SELECT COALESCE(NULLIF(host, ''), '-'),"
        " COUNT(*), SUM(status >= 400), SUM(COALESCE(prompt_tokens, 0)), SUM(COALESCE(completion_tokens, 0))"
        " FROM usage WHERE ts >= ? AND ts < ? GROUP BY 1 ORDER BY 1"
    ),
    "day": (
        "SELECT date(ts, 'unixepoch'),"
        " COUNT(*), SUM(status >= 400), SUM(COALESCE(prompt_tokens, 0)), SUM(COALESCE(completion_tokens, 0))"
        " FROM usage WHERE ts >= ? AND ts < ? GROUP BY 1 ORDER BY 1"
    ),
}
assert set(_SUMMARY) == set(USAGE_GROUPS)

# the tables `prune` deletes from, a batch at a time: fixed SQL, never built from input
_PRUNE = {
    "audit": "DELETE FROM audit WHERE rowid IN (SELECT rowid FROM audit WHERE ts < ? LIMIT ?)",
    "usage": "DELETE FROM usage WHERE rowid IN (SELECT rowid FROM usage WHERE ts < ? LIMIT ?)",
}

# built from the constant KEY_COLUMNS (keys.py), never from input
_SELECT_KEYS = f"SELECT {', '.join(KEY_COLUMNS)} FROM keys"  # noqa: S608
_UPSERT_KEY = (
    f"INSERT OR REPLACE INTO keys ({', '.join(KEY_COLUMNS)})"  # noqa: S608
    f" VALUES ({', '.join('?' for _ in KEY_COLUMNS)})"
)


def _usage_from_row(row: tuple[Any, ...]) -> UsageRecord:
    fields = dict(zip(USAGE_COLUMNS, row, strict=True))
    fields["stream"] = bool(fields["stream"])
    return UsageRecord(**fields)


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring a database an earlier version made up to this schema (nothing to do for a new one). One
    transaction that holds the write lock, so an agent and a CLI opening the same file do it once."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, columns in _ADDED_COLUMNS.items():
            present = {row[1] for row in conn.execute(_TABLE_INFO[table])}
            for column, alter in columns:
                if column not in present:
                    conn.execute(alter)
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        for index, statements in _UNIQUE.items():
            if index not in indexes:
                for statement in statements:
                    conn.execute(statement)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _create_private(path: Path) -> None:
    """The database, and the -wal and -shm files SQLite creates with its mode, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if file.stat().st_mode & 0o077:
                file.chmod(0o600)


class SQLiteStore:
    # rows deleted per transaction when pruning, so the database is never locked for long
    prune_batch = 5000

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            assert self._conn is not None, "store is not open"
            with self._conn:  # one transaction per call
                return fn(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            _create_private(self.path)
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(SCHEMA)
            _upgrade(conn)
            return conn

        self._conn = await asyncio.get_running_loop().run_in_executor(self._executor, connect)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)

    async def put_key(self, record: KeyRecord) -> None:
        values = key_to_row(record)
        await self._call(lambda c: c.execute(_UPSERT_KEY, values))

    async def get_key(self, key_id: str) -> KeyRecord | None:
        row = await self._call(lambda c: c.execute(_SELECT_KEYS + " WHERE id = ?", (key_id,)).fetchone())
        return None if row is None else key_from_row(row)

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._call(lambda c: c.execute(_SELECT_KEYS + " ORDER BY created").fetchall())
        return [key_from_row(row) for row in rows]

    async def revoke_key(self, key_id: str, at: float) -> KeyRecord | None:
        def revoke(c: sqlite3.Connection) -> None:
            c.execute("UPDATE keys SET revoked = COALESCE(revoked, ?) WHERE id = ?", (at, key_id))

        await self._call(revoke)
        return await self.get_key(key_id)

    async def set_key_grant(
        self, key_id: str, role: Role, models: tuple[str, ...], suspended: str | None, checked: float | None
    ) -> None:
        values = (role.value, json.dumps(list(models)), suspended, checked, key_id)
        await self._call(
            lambda c: c.execute(
                "UPDATE keys SET role = ?, models = ?, suspended = ?, checked = coalesce(?, checked)"
                " WHERE id = ? AND owner_id IS NOT NULL",
                values,
            )
        )

    async def take_lease(self, name: str, holder: str, seconds: float) -> bool:
        """One host's store: its one agent always holds the lease."""
        return True

    async def touch_keys(self, last_used: dict[str, float]) -> None:
        if not last_used:
            return
        rows = [(ts, key_id) for key_id, ts in last_used.items()]
        await self._call(lambda c: c.executemany("UPDATE keys SET last_used = ? WHERE id = ?", rows))

    async def add_audit(self, records: list[AuditRecord]) -> None:
        if not records:
            return
        rows = [(r.id, r.ts, r.event, r.key_id, json.dumps(r.detail, default=str), r.host) for r in records]
        await self._call(lambda c: c.executemany(_INSERT_AUDIT, rows))

    async def list_audit(self, limit: int = 100) -> list[AuditRecord]:
        rows = await self._call(lambda c: c.execute(_SELECT_AUDIT, (limit,)).fetchall())
        return [
            AuditRecord(event=e, key_id=k, detail=json.loads(d), ts=ts, host=h, id=i)
            for i, ts, e, k, d, h in rows
        ]

    async def add_usage(self, records: list[UsageRecord]) -> None:
        if not records:
            return
        rows = [tuple(getattr(r, c) for c in USAGE_COLUMNS) for r in records]
        await self._call(lambda c: c.executemany(_INSERT_USAGE, rows))

    async def list_usage(self, since: float = 0.0, until: float | None = None) -> list[UsageRecord]:
        window = (since, math.inf if until is None else until)
        rows = await self._call(lambda c: c.execute(_SELECT_USAGE, window).fetchall())
        return [_usage_from_row(row) for row in rows]

    async def summarize_usage(self, since: float, until: float | None, by: str) -> list[UsageSummary]:
        query = _SUMMARY[by]  # KeyError for a grouping that is not one of USAGE_GROUPS
        window = (since, math.inf if until is None else until)
        rows = await self._call(lambda c: c.execute(query, window).fetchall())
        return [UsageSummary(str(g), int(n), int(e or 0), int(p or 0), int(t or 0)) for g, n, e, p, t in rows]

    async def budget_use(self, since: float, until: float | None, host: str) -> list[BudgetUse]:
        args = (host, host, since, math.inf if until is None else until)
        rows = await self._call(lambda c: c.execute(_BUDGET_USE, args).fetchall())
        return [BudgetUse(str(u), *(int(n or 0) for n in sums)) for u, *sums in rows]

    async def prune(self, audit_before: float | None, usage_before: float | None) -> tuple[int, int]:
        audit = 0 if audit_before is None else await self._delete_before("audit", audit_before)
        usage = 0 if usage_before is None else await self._delete_before("usage", usage_before)
        return audit, usage

    async def _delete_before(self, table: str, before: float) -> int:
        """Delete in batches, one transaction each, so writers wait at most one batch."""
        query, batch, deleted = _PRUNE[table], self.prune_batch, 0
        while True:
            n = await self._call(lambda c: c.execute(query, (before, batch)).rowcount)
            deleted += n
            if n < batch:
                return deleted
