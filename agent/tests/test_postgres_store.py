"""The PostgreSQL store against a real server: migrations (from empty, from the previous version, several
agents at once), least privilege, idempotent inserts and roll-ups, reports over partial days, retention,
TLS verification."""

from __future__ import annotations

import asyncio
import random
import secrets
import ssl
import time
from collections import defaultdict
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import asyncpg
import pytest

from llmfleet_agent.keys import KeyRecord
from llmfleet_agent.roles import Role
from llmfleet_agent.store import migrations
from llmfleet_agent.store.base import USAGE_GROUPS, AuditRecord
from llmfleet_agent.store.errors import StoreError
from llmfleet_agent.store.postgres import PostgresStore
from llmfleet_agent.store.setup import Credential, setup_roles, setup_schema
from llmfleet_agent.store.urls import parse_postgres
from llmfleet_agent.usage import UsageRecord

DAY = 86400.0


def store_for(
    postgres: Any, db: str, user: str = "postgres", password: str | None = None, **kw: Any
) -> PostgresStore:
    url = parse_postgres(postgres.url(user, db, tls=kw.pop("tls", False)))
    return PostgresStore(url, password or postgres.password, **kw)


def record(ts: float, i: int, **kw: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "ts": ts,
        "request_id": f"{i:016x}",
        "key_id": "k1",
        "method": "POST",
        "route": "/api/chat",
        "model": "llama3:latest",
        "status": 200,
        "stream": True,
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "ttfb_ms": 1.5,
        "duration_ms": 9.25,
        "error": None,
        "host": "i-1",
        "user": None,
    }
    values.update(kw)
    return UsageRecord(**values)


async def with_roles(postgres: Any, db: str) -> tuple[Credential, Credential]:
    """The owner and agent roles of `db`, made by `db setup` with the superuser (RDS: the master)."""
    owner = Credential(f"{db}_o"[:63], secrets.token_urlsafe(12))
    agent = Credential(f"{db}_a"[:63], secrets.token_urlsafe(12))
    conn = await asyncpg.connect(postgres.admin_dsn(db))
    try:
        await setup_roles(conn, db, owner, agent)
        await setup_schema(conn, owner.user)
    finally:
        await conn.close()
    return owner, agent


async def test_migrations_from_empty_then_nothing_to_do(postgres: Any, pg_database: str) -> None:
    conn = await asyncpg.connect(postgres.admin_dsn(pg_database))
    try:
        assert await migrations.schema_version(conn) == 0
        start, end, applied = await migrations.upgrade(conn)
        assert (start, end, len(applied)) == (0, migrations.HEAD, len(migrations.MIGRATIONS))
        assert await migrations.upgrade(conn) == (end, end, [])
        tables = {
            r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        assert {"keys", "audit", "usage_daily", "llmfleet_schema"} <= tables
    finally:
        await conn.close()


async def test_upgrade_from_the_previous_version_keeps_records_and_rolls_them_up(
    postgres: Any, pg_database: str
) -> None:
    """Records stored under every earlier schema are still there at head, and the roll-ups added later
    count them: a report equals the raw rows."""
    now = time.time()
    for previous in range(1, migrations.HEAD):
        db = f"{pg_database}_v{previous}"
        postgres.create_database(db)
        conn = await asyncpg.connect(postgres.admin_dsn(db))
        try:
            await migrations.upgrade(conn, target=previous)
            assert await migrations.schema_version(conn) == previous
            await conn.execute("SELECT llmfleet_usage_partition(now())")
            await conn.execute(
                "INSERT INTO usage (ts, request_id, host, key_id, method, route, model, status, stream,"
                " prompt_tokens, completion_tokens, duration_ms)"
                " SELECT to_timestamp($1 - g * 60), 'old' || g, 'i-old', 'k-old', 'POST', '/api/chat', 'm',"
                " 200, false, 2, 3, 1.0 FROM generate_series(1, 50) g",
                now,
            )
            if await conn.fetchval("SELECT to_regclass('usage_daily') IS NOT NULL"):
                # under these schemas an agent's insert adds the roll-ups too (llmfleet_add_usage); rows
                # put in directly are rolled up as a bulk load is (the records may span midnight)
                await conn.execute(
                    "SELECT llmfleet_rebuild_usage_daily((now() AT TIME ZONE 'UTC')::date - 1,"
                    " (now() AT TIME ZONE 'UTC')::date)"
                )
            await conn.execute(
                "INSERT INTO keys (id, name, role, hash, created) VALUES ('k-old', 'old', 'user', 'h', 1)"
            )
            start, end, _ = await migrations.upgrade(conn)
            assert (start, end) == (previous, migrations.HEAD)
        finally:
            await conn.close()
        store = store_for(postgres, db)
        await store.open()
        try:
            assert len(await store.list_usage(now - DAY)) == 50
            assert [k.id for k in await store.list_keys()] == ["k-old"]
            rows = await store.summarize_usage(now - 3 * DAY, now + 1, "host")
            assert [(r.group, r.requests, r.prompt_tokens) for r in rows] == [("i-old", 50, 100)]
        finally:
            await store.close()


async def test_three_agents_upgrading_at_once_apply_each_migration_once(
    postgres: Any, pg_database: str
) -> None:
    conns = [await asyncpg.connect(postgres.admin_dsn(pg_database)) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrations.upgrade(c) for c in conns))
        applied = [name for _, _, names in results for name in names]
        assert sorted(applied) == sorted(f"{m.version:04d} {m.name}" for m in migrations.MIGRATIONS)
        assert await conns[0].fetchval("SELECT count(*) FROM llmfleet_schema") == len(migrations.MIGRATIONS)
    finally:
        for c in conns:
            await c.close()


async def as_owner_store(postgres: Any, database: str, owner: Any, key: KeyRecord) -> None:
    store = store_for(postgres, database, owner.user, owner.password)
    await store.open()
    try:
        await store.put_key(key)
    finally:
        await store.close()


async def test_the_agent_role_may_only_do_what_an_agent_does(postgres: Any, pg_database: str) -> None:
    owner, agent = await with_roles(postgres, pg_database)
    # the agent's credential cannot migrate: the agent says who must
    early = store_for(postgres, pg_database, agent.user, agent.password)
    with pytest.raises(StoreError, match="db upgrade"):
        await early.open()
    await early.close()
    as_owner = store_for(postgres, pg_database, owner.user, owner.password)
    await as_owner.open()  # the owner's credential migrates at open
    await as_owner.close()

    store = store_for(postgres, pg_database, agent.user, agent.password)
    await store.open()
    try:
        now = time.time()
        await store.add_usage([record(now, 1)])
        await store.add_audit([AuditRecord("drain", "k1", {"x": 1})])
        assert len(await store.list_usage(now - 10)) == 1
        assert await store.list_keys() == []
        await store.touch_keys({"nope": now})
        conn = await store.connect()
        try:
            for statement in (
                "DELETE FROM usage",
                "TRUNCATE usage",
                "DELETE FROM audit",
                "UPDATE usage SET status = 1",
                "INSERT INTO keys (id, name, role, hash, created) VALUES ('x', 'x', 'admin', 'h', 1)",
                "UPDATE keys SET role = 'admin'",
                "DELETE FROM usage_daily",
                "CREATE TABLE mine (x int)",
                "DROP TABLE usage_daily",
                "SELECT llmfleet_rebuild_usage_daily(current_date, current_date)",
                # usage and its roll-ups only through llmfleet_add_usage: no host rewrites the reports
                "INSERT INTO usage (ts, request_id, method, route, status, stream, duration_ms)"
                " VALUES (now(), 'x', 'GET', '/', 200, false, 1)",
                "UPDATE usage_daily SET requests = 0",
                "INSERT INTO usage_daily VALUES (current_date, 'h', 'k', 'u', 'm', 1, 0, 0, 0)",
                # what expires is the owner's setting, not a host's
                "UPDATE llmfleet_settings SET value = interval '1 second'",
                "SELECT lo_import('/etc/passwd')",
                "DELETE FROM llmfleet_leases",
            ):
                with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                    await conn.execute(statement)
            # keys only through the personal-key functions, which touch personal keys only: an operator's
            # key can be neither made, changed nor revoked from a host
            operators = KeyRecord.new("llmf_" + "o" * 40, "ops", Role.OPERATOR)
            await as_owner_store(postgres, pg_database, owner, operators)
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await store.put_key(KeyRecord.new("llmf_" + "x" * 40, "x", Role.ADMIN))
            with pytest.raises(asyncpg.exceptions.RaiseError, match="needs an owner"):
                await conn.execute(
                    "SELECT llmfleet_put_personal_key('x', 'x', 'admin', 'h', '[]', 1, NULL, NULL, NULL,"
                    " NULL, NULL, NULL, NULL, NULL, NULL)"
                )
            await conn.execute("SELECT llmfleet_set_personal_grant($1, 'user', '[]', NULL, 1)", operators.id)
            await conn.execute("SELECT llmfleet_revoke_personal_key($1, 1)", operators.id)
            assert await store.get_key(operators.id) == operators
            guid = "01a355f7-abd1-46bd-af83-be128a8ac944"
            personal = replace(KeyRecord.new("llmf_" + "p" * 40, "mine", Role.USER, ttl=3600), owner_id=guid)
            await store.put_key(personal)
            stored = await store.get_key(personal.id)
            assert stored is not None and stored.checked is not None  # the database's clock, not the host's
            await store.set_key_grant(personal.id, Role.USER, ("tinyllama*",), "the account is disabled", 5.0)
            changed = await store.get_key(personal.id)
            assert changed is not None and changed.suspended == "the account is disabled"
            assert changed.models == ("tinyllama*",) and changed.checked == stored.checked
            # what a host may not put in a personal key: more than operator, no expiry, a bad owner or models
            for bad in (
                replace(personal, id="b1", role=Role.ADMIN),
                replace(personal, id="b2", expires=None),
                replace(personal, id="b3", expires=time.time() + 500 * 86400),
                replace(personal, id="b4", owner_id="not-a-guid"),
            ):
                with pytest.raises(asyncpg.exceptions.RaiseError):
                    await store.put_key(bad)
            with pytest.raises(asyncpg.exceptions.RaiseError):
                await store.set_key_grant(personal.id, Role.ADMIN, (), None, None)
            with pytest.raises(asyncpg.exceptions.RaiseError):
                await conn.execute(
                    "SELECT llmfleet_set_personal_grant($1, 'user', 'null', NULL, 1)", personal.id
                )
            # a lease lasts at most an hour, whatever a host asks
            assert await store.take_lease("job", "i-x", 1e9)
            until = postgres.psql(
                "SELECT extract(epoch FROM until - now()) FROM llmfleet_leases", pg_database
            )
            assert float(until) <= 3600
            with pytest.raises(asyncpg.exceptions.UniqueViolationError):  # no overwriting a key by its id
                await store.put_key(personal)
        finally:
            await conn.close()
    finally:
        await store.close()
    # nobody else may even connect
    other = f"{pg_database}_x"[:63]
    postgres.psql(f"CREATE ROLE {other} LOGIN PASSWORD 'pw-{other}'")
    with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
        await asyncpg.connect(
            host="127.0.0.1",
            port=postgres.port,
            user=other,
            password=f"pw-{other}",
            database=pg_database,
            ssl=False,
        )


async def test_inserts_are_idempotent_and_roll_ups_count_each_record_once(
    postgres: Any, pg_database: str
) -> None:
    store = store_for(postgres, pg_database)
    await store.open()
    try:
        now = time.time()
        batch = [record(now - i, i, status=500 if i % 4 == 0 else 200) for i in range(40)]
        await store.add_usage(batch)
        await store.add_usage([*batch[10:], record(now, 1000)])  # a replay, partly new
        rows = await store.list_usage(now - DAY)
        assert len(rows) == 41
        assert len({r.request_id for r in rows}) == 41
        conn = await store.connect()
        try:
            daily = await conn.fetchrow(
                "SELECT sum(requests), sum(errors), sum(prompt_tokens) FROM usage_daily"
            )
        finally:
            await conn.close()
        assert tuple(daily) == (41, 10, 123)
        audit = AuditRecord("drain", "k1", {"a": 1})
        await store.add_audit([audit])
        await store.add_audit([audit])
        assert [a.id for a in await store.list_audit()] == [audit.id]
    finally:
        await store.close()


async def test_records_with_nul_are_kept_and_wild_times_are_data_errors(
    postgres: Any, pg_database: str
) -> None:
    """PostgreSQL text cannot hold NUL: it is stored as U+FFFD rather than the record lost (an anonymous
    client could otherwise keep its failed logins out of the audit). A time far in the future is a record
    the database can never take: a data error, so the batch writer drops that one record only."""
    store = store_for(postgres, pg_database)
    await store.open()
    try:
        now = time.time()
        await store.add_usage([record(now, 1, model="bad\x00name", error="e\x00")])
        assert [(r.model, r.error) for r in await store.list_usage(now - 10)] == [
            ("bad\ufffdname", "e\ufffd")
        ]
        await store.add_audit(
            [AuditRecord("auth_failed", None, {"path": "/api/tags\x00x", "n\x00": ["\x00"]})]
        )
        assert (await store.list_audit())[0].detail == {"path": "/api/tags\ufffdx", "n\ufffd": ["\ufffd"]}
        with pytest.raises(ValueError):
            await store.add_usage([record(now + 400 * DAY, 2)])
    finally:
        await store.close()


def expected(
    records: list[UsageRecord], since: float, until: float, by: str, names: dict[str, str]
) -> list[tuple[Any, ...]]:
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for r in records:
        if not since <= r.ts < until:
            continue
        label = {
            "key": "-"
            if r.key_id is None
            else r.key_id + (f" ({names[r.key_id]})" if r.key_id in names else ""),
            "user": r.user or names.get(r.key_id or "", "-") if r.user or r.key_id in names else "-",
            "model": r.model or "-",
            "host": r.host or "-",
            "day": datetime.fromtimestamp(r.ts, tz=timezone.utc).strftime("%Y-%m-%d"),
        }[by]
        g = groups[label]
        g[0] += 1
        g[1] += r.status >= 400
        g[2] += r.prompt_tokens or 0
        g[3] += r.completion_tokens or 0
    return [(k, *v) for k, v in sorted(groups.items())]


async def test_reports_over_partial_days_equal_the_raw_records(postgres: Any, pg_database: str) -> None:
    """Whole days come from the roll-ups, the ends from raw rows: every grouping, for windows that start
    and end mid-day, at midnight, or within one day, equals a count over the records themselves."""
    from llmfleet_agent.keys import KeyRecord
    from llmfleet_agent.roles import Role

    rng = random.Random(12)
    now = time.time()
    start = now - 12 * DAY
    records = [
        record(
            start + rng.random() * 12 * DAY,
            i,
            key_id=rng.choice(["k1", "k2", None, "gone"]),
            model=rng.choice(["a:1", "b:2", None]),
            host=rng.choice(["i-1", "i-2", None]),
            user=rng.choice([None, None, "ann@corp"]),
            status=rng.choice([200, 200, 200, 429, 502]),
            prompt_tokens=rng.choice([None, 1, 7]),
            completion_tokens=rng.randint(0, 40),
        )
        for i in range(3000)
    ]
    store = store_for(postgres, pg_database)
    await store.open()
    try:
        for key_id, name in (("k1", "alice"), ("k2", "build bot")):
            await store.put_key(KeyRecord(key_id, name, Role.USER, "h"))
        for i in range(0, len(records), 500):
            await store.add_usage(records[i : i + 500])
        names = {"k1": "alice", "k2": "build bot"}
        midnight = start // DAY * DAY + 2 * DAY
        windows = [
            (start - DAY, now + DAY),
            (start + 0.3 * DAY, now - 2.7 * DAY),
            (midnight, midnight + 5 * DAY),
            (midnight + 0.1 * DAY, midnight + 0.6 * DAY),
            (midnight - 0.5 * DAY, midnight + 0.5 * DAY),
        ]
        for since, until in windows:
            for by in USAGE_GROUPS:
                got = [
                    (r.group, r.requests, r.errors, r.prompt_tokens, r.completion_tokens)
                    for r in await store.summarize_usage(since, until, by)
                ]
                assert got == expected(records, since, until, by, names), (by, since, until)
        # the last second a report may name (9999-12-31T23:59:59Z) is a window like any other
        assert await store.summarize_usage(253402300798, 253402300799, "day") == []
    finally:
        await store.close()


async def test_retention_drops_whole_old_months_and_keeps_roll_ups(postgres: Any, pg_database: str) -> None:
    """What expires is the fleet's setting in the database (set by the owner with `db upgrade
    --usage-retention`), measured from the database's clock: what an agent passes is ignored."""
    from llmfleet_agent.store.postgres import set_retention

    store = store_for(postgres, pg_database)
    await store.open()
    try:
        now = time.time()
        old = now - 100 * DAY
        await store.add_usage(
            [record(old + i, i) for i in range(30)] + [record(now - i, 100 + i) for i in range(5)]
        )
        await store.add_audit([AuditRecord("old", None, {}, ts=old), AuditRecord("new", None, {}, ts=now)])
        # the defaults (400 days, 90 days) keep the usage; an agent asking for more is not heard
        assert await store.prune(now + DAY, now + DAY) == (1, 0)
        assert len(await store.list_usage(0)) == 35
        conn = await store.connect()
        try:
            assert await set_retention(conn, "usage_retention", 60 * DAY)
            assert not await set_retention(conn, "usage_retention", 60 * DAY)
        finally:
            await conn.close()
        assert await store.retention() == {"usage_retention": 60 * DAY, "audit_retention": 90 * DAY}
        assert await store.prune(None, None) == (0, 30)
        assert len(await store.list_usage(0)) == 5
        assert [a.event for a in await store.list_audit()] == ["new"]
        # the report for the old days still answers, from the roll-ups
        rows = await store.summarize_usage(old // DAY * DAY, old // DAY * DAY + DAY, "host")
        assert [(r.group, r.requests) for r in rows] == [("i-1", 30)]
        # a late record for a dropped month (a spool replayed after a long outage) is stored again
        await store.add_usage([record(old + 1000, 999)])
        assert len(await store.list_usage(0)) == 6
    finally:
        await store.close()


async def test_tls_verifies_the_server_certificate(postgres: Any, pg_database: str, tmp_path: Any) -> None:
    ok = store_for(postgres, pg_database, tls=True)
    await ok.open()
    assert await ok.list_keys() == []
    await ok.close()
    from postgres import make_ca_and_cert

    other_ca, _, _ = make_ca_and_cert(tmp_path / "other")
    url = parse_postgres(
        postgres.url("postgres", pg_database, tls=True).replace(str(postgres.ca), str(other_ca))
    )
    wrong = PostgresStore(url, postgres.password)
    with pytest.raises(ssl.SSLCertVerificationError):
        await wrong.check_schema()
    # the name is checked too: "localhost" is in the certificate, a name that is not fails verify-full
    named = parse_postgres(postgres.url("postgres", pg_database, tls=True, host="localhost"))
    store = PostgresStore(named, postgres.password)
    await store.check_schema()


async def test_a_store_away_at_start_opens_and_answers_later(postgres: Any, pg_database: str) -> None:
    """The agent starts while the database is away (writers spool, keys come from the cache)."""
    from support import free_port

    url = parse_postgres(f"postgresql://postgres@127.0.0.1:{free_port()}/{pg_database}?sslmode=disable")
    store = PostgresStore(url, postgres.password, connect_timeout=1)
    await store.open()
    try:
        with pytest.raises(OSError):
            await store.list_keys()
    finally:
        await store.close()


def test_the_password_comes_from_the_systemd_credential_when_there_is_one(
    tmp_path: Any, monkeypatch: Any
) -> None:
    """store.password_file names the root-only source; under systemd (LoadCredential=) the service reads
    the copy in $CREDENTIALS_DIRECTORY of the same name instead; without one, the file itself."""
    from llmfleet_agent.store.postgres import read_password

    source = tmp_path / "etc" / "db-password"
    source.parent.mkdir()
    source.write_text("from-the-file\n")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert read_password(source) == "from-the-file"
    creds = tmp_path / "run-credentials"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert read_password(source) == "from-the-file"  # no credential of that name: the file
    (creds / "db-password").write_text("from-systemd")
    assert read_password(source) == "from-systemd"
    (creds / "db-password").write_text("")
    with pytest.raises(StoreError, match="is empty"):
        read_password(source)
