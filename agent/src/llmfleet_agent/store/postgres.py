"""PostgreSQL store (asyncpg): the fleet's shared keys, usage and audit (RDS in a deployment).

A small pool; TLS verified against the CA file of the URL (store/urls.py); every statement bounded by
`store.statement_timeout`, so a slow database counts as away (the writers then spool). Usage inserts are
idempotent by (ts, request_id) and keep the daily roll-ups in the same statement, counting only rows that
were new. Reports read roll-ups for whole days and raw rows only for the partial days at either end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Iterable
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import asyncpg

from ..credentials import CredentialError, read_credential
from ..keys import KEY_COLUMNS, KeyRecord, key_from_row, key_to_row
from ..logs import event
from ..roles import Role
from ..tasks import cancel
from ..usage import UsageRecord
from . import migrations
from .base import AuditRecord, BudgetUse, UsageSummary
from .errors import StoreError
from .urls import PostgresURL

log = logging.getLogger("llmfleet.store")

DAY = 86400.0
# what "the database is away" looks like (as opposed to refusing us): writers spool, readers keep caches
AWAY = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
)
# rows deleted per transaction when pruning audit records
AUDIT_PRUNE_BATCH = 5000


def read_password(path: Path) -> str:
    """The password in `path`, or in the systemd credential of that name (credentials.py)."""
    try:
        return read_credential(path, "store.password_file")
    except CredentialError as exc:
        raise StoreError(str(exc)) from None


def ssl_context(url: PostgresURL) -> ssl.SSLContext | bool:
    if url.sslmode == "disable":
        return False
    try:
        ctx = ssl.create_default_context(cafile=str(url.sslrootcert) if url.sslrootcert else None)
    except (OSError, ssl.SSLError) as exc:
        raise StoreError(f"sslrootcert {url.sslrootcert}: cannot load the CA file: {exc}") from None
    ctx.check_hostname = True  # verify-full: the only verified mode urls.py admits
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, tz=timezone.utc)


def _epoch(value: datetime) -> float:
    return value.timestamp()


# built from the constant KEY_COLUMNS (keys.py), never from input
_SELECT_KEYS = f"SELECT {', '.join(KEY_COLUMNS)} FROM keys"  # noqa: S608
_UPSERT_KEY = (
    f"INSERT INTO keys ({', '.join(KEY_COLUMNS)})"  # noqa: S608
    f" VALUES ({', '.join(f'${i + 1}' for i in range(len(KEY_COLUMNS)))})"
    f" ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in KEY_COLUMNS if c != 'id')}"
)
# a personal key is never a frontend's or a gateway's: the function takes every column but those
PERSONAL_KEY_COLUMNS = tuple(c for c in KEY_COLUMNS if c not in ("frontend", "gateway"))
_PUT_PERSONAL_KEY = (
    f"SELECT llmfleet_put_personal_key({', '.join(f'${i + 1}' for i in range(len(PERSONAL_KEY_COLUMNS)))})"
)


# migrations.py: the agent adds usage only through this function (rows and roll-ups in one statement)
_ADD_USAGE = (
    "SELECT llmfleet_add_usage($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[],"
    " $6::text[], $7::text[], $8::text[], $9::smallint[], $10::boolean[], $11::integer[], $12::integer[],"
    " $13::float8[], $14::float8[], $15::text[])"
)


def _text(value: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL: it becomes U+FFFD, so a record is never refused (and lost) for
    it (an anonymous client could otherwise keep its failed logins out of the audit)."""
    return value.replace("\x00", "\ufffd") if value is not None and "\x00" in value else value


def _json_clean(value: Any) -> Any:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        return {_text(str(k)): _json_clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_clean(v) for v in value]
    return value


# the groups of a report, as base.USAGE_GROUPS defines their labels: fixed SQL, never built from input.
# Each: the roll-up columns it needs, the same from raw rows, its label, and whether it names keys. Both
# parts are summed by those columns first, so only a few hundred rows are joined, labelled and sorted.
_GROUPS = {
    "key": (
        "key_id",
        "coalesce(key_id, '') AS key_id",
        "CASE WHEN p.key_id = '' THEN '-'"
        " ELSE p.key_id || coalesce(' (' || nullif(k.name, '') || ')', '') END",
        True,
    ),
    "user": (
        "user_name, key_id",
        "coalesce(user_name, '') AS user_name, coalesce(key_id, '') AS key_id",
        "coalesce(nullif(p.user_name, ''), nullif(k.name, ''), '-')",
        True,
    ),
    "model": ("model", "coalesce(model, '') AS model", "coalesce(nullif(p.model, ''), '-')", False),
    "host": ("host", "coalesce(host, '') AS host", "coalesce(nullif(p.host, ''), '-')", False),
    "day": ("day", "(ts AT TIME ZONE 'UTC')::date AS day", "to_char(p.day, 'YYYY-MM-DD')", False),
}
# whole days [$3, $4) from the roll-ups; the partial days [$1, $5) and [$6, $2) from raw rows
_REPORT = """
WITH p AS (
    SELECT {daily}, sum(requests) AS requests, sum(errors) AS errors,
           sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens
    FROM usage_daily WHERE day >= $3 AND day < $4
    GROUP BY {daily}
    UNION ALL
    SELECT {raw}, count(*), count(*) FILTER (WHERE status >= 400),
           coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0)
    FROM usage WHERE (ts >= $1 AND ts < $5) OR (ts >= $6 AND ts < $2)
    GROUP BY {positions}
)
SELECT ({label}) COLLATE "C" AS grp,
       sum(p.requests), sum(p.errors), sum(p.prompt_tokens), sum(p.completion_tokens)
FROM p {join}
GROUP BY 1 ORDER BY 1
"""
_REPORTS = {
    by: _REPORT.format(
        daily=daily,
        raw=raw,
        positions=", ".join(str(i + 1) for i in range(daily.count(",") + 1)),
        label=label,
        join="LEFT JOIN keys k ON k.id = nullif(p.key_id, '')" if names_keys else "",
    )
    for by, (daily, raw, label, names_keys) in _GROUPS.items()
}


# tokens per user over whole UTC days [$1, $2) (dates), this host's ($3) and the others', from the daily
# roll-ups (a few rows per user and day, whatever the traffic)
_BUDGET_USE = """
SELECT user_name,
       coalesce(sum(prompt_tokens + completion_tokens) FILTER (WHERE host = $3), 0),
       coalesce(sum(prompt_tokens + completion_tokens) FILTER (WHERE host <> $3), 0)
FROM usage_daily WHERE day >= $1 AND day < $2 AND user_name <> '' GROUP BY user_name
"""


def _months(records: Iterable[UsageRecord]) -> set[tuple[int, int]]:
    return {(d.year, d.month) for d in (_ts(r.ts) for r in records)}


def report_bounds(since: float, until: float) -> tuple[datetime, datetime, datetime, datetime]:
    """(first whole day, end of the whole days, end of the leading part, start of the trailing part): the
    whole UTC days inside [since, until) come from roll-ups, the rest from raw rows."""
    first_day = -(-since // DAY) * DAY  # the first midnight at or after since
    last_day = until // DAY * DAY  # the last midnight at or before until
    if first_day >= last_day:  # no whole day: everything from raw rows (last_day <= until: in range)
        return _ts(last_day), _ts(last_day), _ts(until), _ts(until)
    return _ts(first_day), _ts(last_day), _ts(first_day), _ts(last_day)


class PostgresStore:
    def __init__(
        self,
        url: PostgresURL,
        password: str,
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        statement_timeout: float = 10.0,
        migrate: bool = True,
    ) -> None:
        self.url = url
        self._password = password
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._statement_timeout = statement_timeout
        self._migrate = migrate
        self._pool: asyncpg.Pool | None = None
        self._months: set[tuple[int, int]] = set()
        self._checker: asyncio.Task[None] | None = None
        self._ssl = ssl_context(url)

    # --- connections -------------------------------------------------------------------------------------

    def connect_kwargs(self) -> dict[str, Any]:
        return {
            "host": self.url.host,
            "port": self.url.port,
            "user": self.url.user,
            "database": self.url.database,
            "password": self._password,
            "ssl": self._ssl,
            "timeout": self._connect_timeout,
            "command_timeout": self._statement_timeout,
            "server_settings": {
                "application_name": "llmfleet-agent",
                # the agent's statements are short: JIT compilation cost more than it saved (the report
                # over 10M rows, docs/performance.md)
                "jit": "off",
                "statement_timeout": str(int(self._statement_timeout * 1000)),
            },
        }

    async def connect(self) -> asyncpg.Connection:
        """One connection outside the pool (migrations, `db` commands)."""
        return await asyncpg.connect(**self.connect_kwargs())

    async def open(self) -> None:
        """Check the schema (upgrading it when this credential may), then keep a pool. The database being
        away is no error here: the pool connects lazily, writers spool, the key ring keeps what it has, and
        the schema is checked in the background until the database answers. A wrong password or a schema
        too old for this credential is an error (StoreError, asyncpg's own)."""
        try:
            await self.check_schema()
        except AWAY as exc:
            event(log, logging.ERROR, "database unreachable at start; spooling", error=repr(exc))
            self._checker = asyncio.create_task(self._check_later(), name="store-schema-check")
        self._pool = await asyncpg.create_pool(min_size=0, max_size=self._pool_size, **self.connect_kwargs())

    async def _check_later(self) -> None:
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            try:
                await self.check_schema()
            except AWAY:
                delay = min(delay * 2, 30.0)
                continue
            except Exception as exc:
                event(log, logging.ERROR, "the database cannot be used", error=str(exc))
                return
            event(log, logging.INFO, "database reachable; schema checked")
            return

    async def check_schema(self) -> None:
        conn = await self.connect()
        try:
            version = await migrations.schema_version(conn)
            if version >= migrations.HEAD:
                return
            if not self._migrate:
                raise StoreError(self._old_schema(version))
            try:
                await migrations.upgrade(conn)
            except asyncpg.exceptions.InsufficientPrivilegeError:
                raise StoreError(self._old_schema(version)) from None
        finally:
            await conn.close()

    def _old_schema(self, version: int) -> str:
        return (
            f"the database has schema version {version}, this agent needs"
            f" {migrations.HEAD}: run `llmfleet-agent db upgrade` with the owner's credential"
        )

    async def close(self) -> None:
        await cancel(self._checker)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("store is not open")
        return self._pool

    # --- keys ----------------------------------------------------------------------------------------------

    async def put_key(self, record: KeyRecord) -> None:
        """A personal key (the agent's credential) through llmfleet_put_personal_key, which writes only
        personal keys; any other key with the owner's credential (keys create)."""
        if record.personal:
            row = dict(zip(KEY_COLUMNS, key_to_row(record), strict=True))
            await self.pool.execute(_PUT_PERSONAL_KEY, *(row[c] for c in PERSONAL_KEY_COLUMNS))
            return
        await self.pool.execute(_UPSERT_KEY, *key_to_row(record))

    async def get_key(self, key_id: str) -> KeyRecord | None:
        row = await self.pool.fetchrow(_SELECT_KEYS + " WHERE id = $1", key_id)
        return None if row is None else key_from_row(row)

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self.pool.fetch(_SELECT_KEYS + " ORDER BY created, id")
        return [key_from_row(row) for row in rows]

    async def revoke_key(self, key_id: str, at: float) -> KeyRecord | None:
        """A personal key through llmfleet_revoke_personal_key (the agent's credential may); any other with
        the owner's credential."""
        record = await self.get_key(key_id)
        if record is None:
            return None
        if record.personal:
            await self.pool.execute("SELECT llmfleet_revoke_personal_key($1, $2)", key_id, at)
        else:
            await self.pool.execute(
                "UPDATE keys SET revoked = coalesce(revoked, $1) WHERE id = $2", at, key_id
            )
        return await self.get_key(key_id)

    async def set_key_grant(
        self, key_id: str, role: Role, models: tuple[str, ...], suspended: str | None, checked: float | None
    ) -> None:
        """A personal key's rights and state, as revalidation found its owner (personal keys only)."""
        await self.pool.execute(
            "SELECT llmfleet_set_personal_grant($1, $2, $3, $4, $5)",
            key_id,
            role.value,
            json.dumps(list(models)),
            suspended,
            checked,
        )

    async def take_lease(self, name: str, holder: str, seconds: float) -> bool:
        """True when `holder` holds the lease `name` for the next `seconds` (one agent of the fleet at a
        time does a job such as revalidation); a lease not renewed runs out."""
        return bool(await self.pool.fetchval("SELECT llmfleet_take_lease($1, $2, $3)", name, holder, seconds))

    async def touch_keys(self, last_used: dict[str, float]) -> None:
        if not last_used:
            return
        await self.pool.execute(
            "UPDATE keys SET last_used = v.at FROM unnest($1::text[], $2::float8[]) AS v(id, at)"
            " WHERE keys.id = v.id AND (keys.last_used IS NULL OR keys.last_used < v.at)",
            list(last_used),
            list(last_used.values()),
        )

    # --- audit ---------------------------------------------------------------------------------------------

    async def add_audit(self, records: list[AuditRecord]) -> None:
        if not records:
            return
        try:
            await self.pool.execute(
                "INSERT INTO audit (id, ts, event, key_id, host, detail)"
                " SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[],"
                " $6::jsonb[]) ON CONFLICT (id) DO NOTHING",
                [_text(r.id) for r in records],
                [_ts(r.ts) for r in records],
                [_text(r.event) for r in records],
                [_text(r.key_id) for r in records],
                [_text(r.host) for r in records],
                [json.dumps(_json_clean(r.detail), default=str) for r in records],
            )
        except (asyncpg.exceptions.DataError, asyncpg.exceptions.IntegrityConstraintViolationError) as exc:
            raise ValueError(f"the database refused an audit record: {exc}") from exc

    async def list_audit(self, limit: int = 100) -> list[AuditRecord]:
        rows = await self.pool.fetch(
            "SELECT id, ts, event, key_id, host, detail FROM audit ORDER BY ts DESC LIMIT $1", limit
        )
        return [
            AuditRecord(
                event=r["event"],
                key_id=r["key_id"],
                detail=json.loads(r["detail"]),
                ts=_epoch(r["ts"]),
                host=r["host"],
                id=r["id"],
            )
            for r in rows
        ]

    # --- usage ---------------------------------------------------------------------------------------------

    async def _ensure_partitions(self, records: list[UsageRecord], force: bool = False) -> None:
        for year, month in sorted(_months(records)):
            if force or (year, month) not in self._months:
                first = datetime(year, month, 1, tzinfo=timezone.utc)
                await self.pool.execute("SELECT llmfleet_usage_partition($1)", first)
                self._months.add((year, month))

    async def add_usage(self, records: list[UsageRecord]) -> None:
        if not records:
            return
        columns = (
            [_ts(r.ts) for r in records],
            [_text(r.request_id) for r in records],
            [_text(r.host) for r in records],
            [_text(r.key_id) for r in records],
            [_text(r.user) for r in records],
            [_text(r.method) for r in records],
            [_text(r.route) for r in records],
            [_text(r.model) for r in records],
            [r.status for r in records],
            [r.stream for r in records],
            [r.prompt_tokens for r in records],
            [r.completion_tokens for r in records],
            [r.ttfb_ms for r in records],
            [r.duration_ms for r in records],
            [_text(r.error) for r in records],
        )
        try:
            await self._ensure_partitions(records)
            try:
                await self.pool.execute(_ADD_USAGE, *columns)
            except asyncpg.exceptions.CheckViolationError:
                # no partition for a row: one was dropped (retention) after this agent last saw it
                await self._ensure_partitions(records, force=True)
                await self.pool.execute(_ADD_USAGE, *columns)
        except (asyncpg.exceptions.DataError, asyncpg.exceptions.IntegrityConstraintViolationError) as exc:
            # a record the database can never take (a time far outside the partitions, a number too big)
            raise ValueError(f"the database refused a usage record: {exc}") from exc

    async def list_usage(self, since: float = 0.0, until: float | None = None) -> list[UsageRecord]:
        rows = await self.pool.fetch(
            "SELECT ts, request_id, key_id, method, route, model, status, stream, prompt_tokens,"
            " completion_tokens, ttfb_ms, duration_ms, error, host, user_name FROM usage"
            " WHERE ts >= $1 AND ts < $2 ORDER BY ts, request_id",
            _ts(since),
            _ts(time.time() + DAY if until is None else until),
        )
        return [
            UsageRecord(
                ts=_epoch(r["ts"]),
                request_id=r["request_id"],
                key_id=r["key_id"],
                method=r["method"],
                route=r["route"],
                model=r["model"],
                status=r["status"],
                stream=r["stream"],
                prompt_tokens=r["prompt_tokens"],
                completion_tokens=r["completion_tokens"],
                ttfb_ms=r["ttfb_ms"],
                duration_ms=r["duration_ms"],
                error=r["error"],
                host=r["host"],
                user=r["user_name"],
            )
            for r in rows
        ]

    async def summarize_usage(self, since: float, until: float | None, by: str) -> list[UsageSummary]:
        query = _REPORTS[by]
        end = time.time() if until is None else until
        first_day, last_day, lead_end, trail_start = report_bounds(since, end)
        rows = await self.pool.fetch(
            query, _ts(since), _ts(end), first_day.date(), last_day.date(), lead_end, trail_start
        )
        return [UsageSummary(str(g), int(n), int(e or 0), int(p or 0), int(c or 0)) for g, n, e, p, c in rows]

    async def budget_use(self, since: float, until: float | None, host: str) -> list[BudgetUse]:
        last = date.max if until is None else _ts(until).date()
        rows = await self.pool.fetch(_BUDGET_USE, _ts(since).date(), last, host)
        return [BudgetUse(str(u), int(own), int(other)) for u, own, other in rows]

    async def prune(self, audit_before: float | None, usage_before: float | None) -> tuple[int, int]:
        """Remove what the fleet's retention settings let go. The cutoffs are the database's (now() less
        the owner's settings, `db upgrade --usage-retention/--audit-retention`), not this agent's: one
        host's configuration or clock cannot shorten what the fleet keeps. The arguments are ignored."""
        del audit_before, usage_before
        audit = 0
        while True:
            n = int(await self.pool.fetchval("SELECT llmfleet_prune_audit()"))
            audit += n
            if n < AUDIT_PRUNE_BATCH:
                break
        usage = int(await self.pool.fetchval("SELECT llmfleet_drop_expired_usage()"))
        if usage:
            self._months.clear()
        return audit, usage

    async def retention(self) -> dict[str, float | None]:
        """The fleet's retention settings, in seconds (None: kept for ever)."""
        rows = await self.pool.fetch("SELECT name, extract(epoch FROM value) AS s FROM llmfleet_settings")
        return {r["name"]: None if r["s"] is None else float(r["s"]) for r in rows}


async def set_retention(conn: asyncpg.Connection, name: str, seconds: float | None) -> bool:
    """Set one retention setting (owner); True when it changed."""
    if name not in ("usage_retention", "audit_retention"):
        raise ValueError(f"no setting {name!r}")
    before = await conn.fetchval(
        "SELECT extract(epoch FROM value) FROM llmfleet_settings WHERE name = $1", name
    )
    if (before is None and seconds is None) or (
        before is not None and seconds is not None and float(before) == seconds
    ):
        return False
    await conn.execute(
        "UPDATE llmfleet_settings SET value = make_interval(secs => $2) WHERE name = $1", name, seconds
    )
    return True
