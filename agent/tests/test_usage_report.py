"""The usage report: `GET /agent/usage` and `llmfleet-agent usage` (one query, reports.py), the SQLite
store's groupings and window, its schema upgrade from the previous version, and idempotent writes."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from agents import new_agent
from conftest import AGENT, AgentHandle
from support import bearer, http, wait_until

from llmfleet_agent import reports
from llmfleet_agent.keys import KeyRecord, generate_secret
from llmfleet_agent.roles import Role
from llmfleet_agent.store import SQLiteStore
from llmfleet_agent.store.base import USAGE_GROUPS, AuditRecord
from llmfleet_agent.usage import UsageRecord

DAY = 86400.0
BASE = 1714521600.0  # 2024-05-01T00:00:00Z
WINDOW = {"since": "2024-05-01T00:00:00Z", "until": "2024-05-04T00:00:00Z"}
UNKNOWN_KEY = "feedfacecafe0000"
FORMULA = "=cmd|' /C calc'!A0"
QUOTED = 'Doe, "J"'


def usage(
    ts: float,
    request_id: str,
    key_id: str | None,
    model: str | None,
    host: str | None,
    user: str | None,
    status: int = 200,
    prompt: int | None = None,
    completion: int | None = None,
) -> UsageRecord:
    return UsageRecord(
        ts, request_id, key_id, "POST", "/api/chat", model, status, False, prompt, completion, 1.0, 2.0, None,
        host, user,
    )  # fmt: skip


def records(key_id: str) -> list[UsageRecord]:
    """Five records in WINDOW (three UTC days) and two just outside it (one before since, one at until)."""
    return [
        usage(BASE + 10, "r1", key_id, "tinyllama:latest", "host-a", None, 200, 3, 5),
        usage(BASE + 3600, "r2", key_id, "tinyllama:latest", "host-b", "bob", 500),
        usage(BASE + DAY + 5, "r3", UNKNOWN_KEY, None, None, QUOTED, 200, 7, 11),
        usage(BASE + DAY + 100, "r4", None, "", "", None, 200, 0, 0),  # empty text counts as absent
        usage(BASE + 2 * DAY, "r5", None, "-1+2", "@evil", FORMULA, 404, 1, 1),
        usage(BASE - 1, "r0", key_id, "tinyllama:latest", "host-a", None, 200, 100, 100),
        usage(BASE + 3 * DAY, "r6", key_id, "tinyllama:latest", "host-a", None, 200, 100, 100),
    ]


def expected(key_id: str) -> dict[str, list[dict[str, Any]]]:
    """WINDOW's rows for each grouping, by the label rules of store/base.py."""

    def row(group: str, requests: int, errors: int, prompt: int, completion: int) -> dict[str, Any]:
        return {
            "group": group,
            "requests": requests,
            "errors": errors,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
        }

    by = {
        "key": [
            row(f"{key_id} (alice-key)", 2, 1, 3, 5),
            row(UNKNOWN_KEY, 1, 0, 7, 11),
            row("-", 2, 1, 1, 1),
        ],
        "user": [
            row("alice-key", 1, 0, 3, 5),  # no user: the key's name
            row("bob", 1, 1, 0, 0),
            row(QUOTED, 1, 0, 7, 11),
            row("-", 1, 0, 0, 0),
            row(FORMULA, 1, 1, 1, 1),
        ],
        "model": [row("tinyllama:latest", 2, 1, 3, 5), row("-", 2, 0, 7, 11), row("-1+2", 1, 1, 1, 1)],
        "host": [
            row("host-a", 1, 0, 3, 5),
            row("host-b", 1, 1, 0, 0),
            row("-", 2, 0, 7, 11),
            row("@evil", 1, 1, 1, 1),
        ],
        "day": [row("2024-05-01", 2, 1, 3, 5), row("2024-05-02", 2, 0, 7, 11), row("2024-05-03", 1, 1, 1, 1)],
    }
    # ordered by the label's code points
    return {name: sorted(rows, key=lambda r: r["group"]) for name, rows in by.items()}


async def _seed(path: Path) -> str:
    store = SQLiteStore(path)
    await store.open()
    try:
        key = KeyRecord.new(generate_secret(), "alice-key", Role.USER)
        await store.put_key(key)
        await store.add_usage(records(key.id))
        return key.id
    finally:
        await store.close()


def get_raw(url: str, headers: dict[str, str]) -> tuple[int, bytes, Any]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


# ----- the SQLite store ----------------------------------------------------------------------------------
async def test_store_groups_and_labels(tmp_path: Path) -> None:
    key_id = await _seed(tmp_path / "agent.db")
    store = SQLiteStore(tmp_path / "agent.db")
    await store.open()
    try:
        want = expected(key_id)
        for by in USAGE_GROUPS:
            rows = await store.summarize_usage(BASE, BASE + 3 * DAY, by)
            assert [vars(r) for r in rows] == want[by], by
        # half-open: since included, until excluded; until None: no upper bound
        assert [r.request_id for r in await store.list_usage(BASE + 10, BASE + 3600)] == ["r1"]
        assert [r.request_id for r in await store.list_usage(BASE - 1, BASE + 10)] == ["r0"]
        assert len(await store.list_usage(BASE + 3 * DAY, None)) == 1
        assert len(await store.list_usage()) == 7
        whole = await store.summarize_usage(0, None, "day")
        assert [(r.group, r.requests) for r in whole] == [
            ("2024-04-30", 1), ("2024-05-01", 2), ("2024-05-02", 2), ("2024-05-03", 1), ("2024-05-04", 1),
        ]  # fmt: skip
        assert await store.summarize_usage(BASE + 11, BASE + 3600, "key") == []
        record = (await store.list_usage(BASE + 10, BASE + 11))[0]
        assert (record.host, record.user, record.stream) == ("host-a", None, False)
        with pytest.raises(KeyError):
            await store.summarize_usage(0, None, "route")
    finally:
        await store.close()


async def test_writes_are_idempotent(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "agent.db")
    await store.open()
    try:
        first = usage(BASE, "req-1", None, "m", "h", None)
        later = usage(BASE + 1, "req-1", None, "m", "h", None)  # the same id at another time: another record
        await store.add_usage([first, first])
        await store.add_usage([first, later])  # a replay (the spool after a crash) is stored once
        assert [r.ts for r in await store.list_usage()] == [BASE, BASE + 1]
        audit = AuditRecord("drain", "k1", {"x": 1}, ts=BASE, host="h")
        await store.add_audit([audit, audit])
        await store.add_audit([audit, AuditRecord("resume", "k1", ts=BASE + 1)])
        listed = await store.list_audit()
        assert [(a.event, a.id) for a in listed][1] == ("drain", audit.id)
        assert len(listed) == 2 and listed[1] == audit
    finally:
        await store.close()


# the previous version's schema, as it made its databases
OLD_SCHEMA = """
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
    rpm       INTEGER
);
CREATE TABLE IF NOT EXISTS audit (
    ts      REAL NOT NULL,
    event   TEXT NOT NULL,
    key_id  TEXT,
    detail  TEXT NOT NULL DEFAULT '{}'
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
    error             TEXT
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
"""


def _columns(db: Path, table: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


async def test_a_database_of_the_previous_version_is_upgraded(tmp_path: Path) -> None:
    db = tmp_path / "agent.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(OLD_SCHEMA)
        conn.execute(
            "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (BASE, "old-1", None, "POST", "/api/chat", "tinyllama:latest", 200, 1, 4, 6, 1.0, 2.0, None),
        )
        conn.execute("INSERT INTO audit VALUES (?, ?, ?, ?)", (BASE, "drain", None, '{"old": true}'))
        conn.execute("INSERT INTO audit VALUES (?, ?, ?, ?)", (BASE + 1, "resume", None, "{}"))
    conn.close()
    ids: list[str] = []
    for _ in range(2):  # the upgrade is done once; opening an upgraded file again changes nothing
        store = SQLiteStore(db)
        await store.open()
        try:
            old = (await store.list_usage())[:1]
            assert [(r.request_id, r.host, r.user, r.prompt_tokens) for r in old] == [
                ("old-1", None, None, 4)
            ]
            audit = [a for a in await store.list_audit() if a.host is None]  # the old rows
            assert [a.detail for a in audit] == [{}, {"old": True}]
            assert all(len(a.id) == 24 for a in audit) and audit[0].id != audit[1].id
            assert ids in ([], [a.id for a in audit])  # ids given once, kept
            ids = [a.id for a in audit]
            await store.add_usage(
                [usage(BASE + 5, "new-1", None, "tinyllama:latest", "host-a", "ann", 200, 1, 1)]
            )
            await store.add_audit([AuditRecord("drain", ts=BASE + 5, host="host-a", id="a" * 24)])
            rows = await store.summarize_usage(BASE, None, "host")
            assert [(r.group, r.requests, r.prompt_tokens) for r in rows] == [("-", 1, 4), ("host-a", 1, 1)]
            users = await store.summarize_usage(BASE, None, "user")
            assert [(r.group, r.requests) for r in users] == [("-", 1), ("ann", 1)]
            assert (await store.list_audit(1))[0].host == "host-a"
        finally:
            await store.close()
    assert _columns(db, "usage")[-2:] == ["host", "user"]
    assert _columns(db, "audit")[-2:] == ["host", "id"]
    with sqlite3.connect(db) as conn:
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    conn.close()
    assert {"usage_request", "audit_id"} <= indexes


# ----- parameters and renderings --------------------------------------------------------------------------
NOW = 1714608000.0  # 2024-05-02T00:00:00Z


@pytest.mark.parametrize(
    ("text", "ts"),
    [
        ("2024-05-01T00:00:00Z", BASE),
        ("2024-05-01t02:00:00+02:00", BASE),
        ("2024-05-01 00:00:00.5z", BASE + 0.5),
        ("1714521600", BASE),
        (" 1714521600.25 ", BASE + 0.25),
        ("0001714521600", BASE),  # a bare number is a time, never a duration
        ("2024-05-01T02:00:00 02:00", BASE),  # `+02:00` unencoded in a query string
        ("12h", NOW - 12 * 3600),
        ("1d", BASE),
        ("1.5H", NOW - 5400),
        ("99999w", 0.0),  # before 1970: from 1970
    ],
)
def test_times(text: str, ts: float) -> None:
    assert reports.parse_time("since", text, NOW) == ts


@pytest.mark.parametrize(
    ("since", "until", "by", "parameter", "words"),
    [
        ("whenever", None, None, "since", "is not a time; give an RFC 3339 time"),
        ("never", None, None, "since", "'never' has no start"),
        (None, "never", None, "until", "'never' has no end"),
        ("-1d", None, None, "since", "is not a time"),
        ("2024-05-01T00:00:00", None, None, "since", "is not a time"),  # no zone
        ("2024-02-30T00:00:00Z", None, None, "since", "is not a valid time"),
        (None, "999999999999.5", None, "until", "outside 1970-01-01 to 9999-12-31"),
        ("1d", "2d", None, "since", "must be before until"),
        ("1714521600", "1714521600", None, "since", "must be before until"),
        (None, None, "route", "by", "one of key, user, model, host, day"),
        ("x" * 5000, None, None, "since", "[cut from 5000 chars]"),
        ("1:11 " * 3000, None, None, "since", "is not a time"),  # refused before a pattern looks
    ],
)
def test_bad_parameters(
    since: str | None, until: str | None, by: str | None, parameter: str, words: str
) -> None:
    with pytest.raises(reports.ReportError) as caught:
        reports.parse_query(since, until, by, now=NOW)
    assert caught.value.parameter == parameter and words in caught.value.reason
    assert str(caught.value).startswith(f"{parameter}: ") and len(str(caught.value)) < 1000


def test_defaults() -> None:
    assert reports.parse_query(now=NOW) == reports.ReportQuery(NOW - 7 * DAY, NOW, "key")


def test_csv_cells_never_become_formulas() -> None:
    assert [reports.csv_cell(t) for t in ("-", "=1+1", "+1", "-1", "@SUM(A1)", "\t=1", "a=1", "")] == [
        "-", "'=1+1", "'+1", "'-1", "'@SUM(A1)", "'\t=1", "a=1", "",
    ]  # fmt: skip


def test_accept_negotiation() -> None:
    csv_wanted = ("text/csv", "text/*", "TEXT/CSV; charset=utf-8", "application/json;q=0.5, text/csv")
    json_wanted = (
        "",
        "*/*",
        "application/json",
        "text/csv;q=0.5, application/json",
        "text/html",
        "text/csv;q=x",
    )
    assert all(reports.wants_csv(a) for a in csv_wanted)
    assert not any(reports.wants_csv(a) for a in json_wanted)


# ----- the route and the command, against a running agent ------------------------------------------------
@pytest.fixture(scope="module")
def report_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentHandle, str]]:
    """An agent whose store holds `records` before it starts; (agent, the named key's id)."""
    # records of 2024 are kept whatever the date (the default retention would prune them at start)
    agent = new_agent(tmp_path_factory.mktemp("report-agent"), {"store": {"usage_retention": None}})
    key_id = asyncio.run(_seed(agent.dir / "agent.db"))
    agent.start().wait_ready()
    yield agent, key_id
    assert agent.proc is not None
    agent.proc.stop()


def report(agent: AgentHandle, accept: str | None = None, **params: str) -> tuple[int, bytes, Any]:
    headers = bearer(agent.key("operator"))
    if accept:
        headers["Accept"] = accept
    return get_raw(f"{agent.url}/agent/usage?{urllib.parse.urlencode(params)}", headers)


@pytest.mark.parametrize("by", USAGE_GROUPS)
def test_each_grouping(report_agent: tuple[AgentHandle, str], by: str) -> None:
    agent, key_id = report_agent
    code, raw, headers = report(agent, **WINDOW, by=by)
    assert code == 200 and headers["Content-Type"].startswith("application/json"), raw
    body = json.loads(raw)
    assert body == {**WINDOW, "by": by, "rows": expected(key_id)[by]}


def test_the_window_is_half_open(report_agent: tuple[AgentHandle, str]) -> None:
    agent, _ = report_agent

    def requests(**params: str) -> int:
        code, raw, _ = report(agent, **params)
        assert code == 200, raw
        return sum(row["requests"] for row in json.loads(raw)["rows"])

    assert requests(since=str(BASE + 10), until=str(BASE + 3600)) == 1  # r1 only: since included
    assert requests(since=str(BASE - 1), until=str(BASE + 10)) == 1  # r0 only: until excluded
    assert requests(since=str(BASE - 1), until="2024-05-04T00:00:00.000001Z") == 7
    assert requests(since=str(BASE - 1)) == 7  # until now
    assert requests(since="2024-05-01T02:00:00+02:00", until="2024-05-01T00:00:11Z") == 1
    # the same, with the `+` not encoded (a query string reads it as a space)
    code, raw, _ = get_raw(
        f"{agent.url}/agent/usage?since=2024-05-01T02:00:00+02:00&until=2024-05-01T00:00:11Z",
        bearer(agent.key("operator")),
    )
    assert code == 200 and sum(r["requests"] for r in json.loads(raw)["rows"]) == 1, raw
    assert requests(since="1h") == 0  # none of the records is recent
    code, raw, _ = report(agent)  # the defaults: 7 days back to now, by key
    body = json.loads(raw)
    since, until = (datetime.fromisoformat(body[k]).timestamp() for k in ("since", "until"))
    assert code == 200 and body["by"] == "key" and abs(until - since - 7 * DAY) < 1e-3
    assert abs(until - time.time()) < 60


def test_csv(report_agent: tuple[AgentHandle, str]) -> None:
    agent, key_id = report_agent
    code, raw, headers = report(agent, "text/csv", **WINDOW, by="user")
    assert code == 200 and headers["Content-Type"] == "text/csv; charset=utf-8"
    assert raw.decode() == (
        "group,requests,errors,prompt_tokens,completion_tokens\r\n"
        "-,1,0,0,0\r\n"
        "'=cmd|' /C calc'!A0,1,1,1,1\r\n"
        '"Doe, ""J""",1,0,7,11\r\n'
        "alice-key,1,0,3,5\r\n"
        "bob,1,1,0,0\r\n"
    )
    for by in USAGE_GROUPS:
        code, raw, _ = report(agent, "text/csv", **WINDOW, by=by)
        parsed = list(csv.DictReader(io.StringIO(raw.decode(), newline="")))
        want = expected(key_id)[by]
        assert [r["group"] for r in parsed] == [reports.csv_cell(r["group"]) for r in want]
        assert [int(r["requests"]) for r in parsed] == [r["requests"] for r in want]
    model_lines = report(agent, "text/csv", **WINDOW, by="model")[1].decode().splitlines()[1:]
    host_lines = report(agent, "text/csv", **WINDOW, by="host")[1].decode().splitlines()[1:]
    assert [line.split(",")[0] for line in model_lines] == ["-", "'-1+2", "tinyllama:latest"]
    assert [line.split(",")[0] for line in host_lines] == ["-", "'@evil", "host-a", "host-b"]
    # JSON unless CSV is preferred
    assert report(agent, "*/*", **WINDOW)[2]["Content-Type"].startswith("application/json")


@pytest.mark.parametrize(
    ("query", "parameter", "words"),
    [
        ("since=whenever", "since", "since: 'whenever' is not a time"),
        ("since=2024-05-02T00:00:00Z&until=2024-05-01T00:00:00Z", "since", "must be before until"),
        ("until=1999-01-01T00:00:00Z", "since", "must be before until"),
        ("by=route", "by", "by: 'route' is not a grouping"),
        ("by=", "by", "by: '' is not a grouping"),
        ("format=csv", "format", "unknown parameter(s) 'format'"),
        ("since=1d&since=2d", "since", "since: given more than once"),
    ],
)
def test_bad_requests(report_agent: tuple[AgentHandle, str], query: str, parameter: str, words: str) -> None:
    agent, _ = report_agent
    code, body, headers = agent.get(f"/agent/usage?{query}", agent.key("operator"))
    assert code == 400 and headers["Content-Type"].startswith("application/json"), body
    assert body["parameter"] == parameter and words in body["error"], body


def test_the_report_needs_an_operator(report_agent: tuple[AgentHandle, str]) -> None:
    agent, _ = report_agent
    assert agent.get("/agent/usage")[0] == 401
    code, body, _ = agent.get("/agent/usage", agent.key("user"))
    assert code == 403 and "needs operator" in body["error"]
    assert agent.get("/agent/usage", agent.key("admin"))[0] == 200


def test_the_command_gives_the_routes_report(report_agent: tuple[AgentHandle, str]) -> None:
    agent, key_id = report_agent
    window = ("--since", WINDOW["since"], "--until", WINDOW["until"])
    for by in USAGE_GROUPS:
        printed = agent.cli("usage", *window, "--by", by, "--json")
        assert printed.returncode == 0, printed.stderr
        assert json.loads(printed.stdout) == json.loads(report(agent, **WINDOW, by=by)[1])
        argv = [AGENT, "usage", "--config", str(agent.config_path), *window, "--by", by, "--csv"]
        raw = subprocess.run(argv, capture_output=True, timeout=60, check=True).stdout  # bytes: CRLF kept
        assert raw == report(agent, "text/csv", **WINDOW, by=by)[1]
    table = agent.cli("usage", *window, "--by", "key").stdout.splitlines()
    assert table[0] == "usage from 2024-05-01T00:00:00Z until 2024-05-04T00:00:00Z, by key"
    assert table[1].split() == ["KEY", "REQUESTS", "ERRORS", "PROMPT", "TOKENS", "COMPLETION", "TOKENS"]
    assert table[-1].split() == ["total", "5", "2", "11", "17"]
    assert any(line.startswith(f"{key_id} (alice-key) ") for line in table)
    # the same checks, worded for a command line
    bad = agent.cli("usage", "--since", "2024-05-02T00:00:00Z", "--until", "2024-05-01T00:00:00Z")
    assert bad.returncode == 1 and "--since: must be before until" in bad.stderr
    bad = agent.cli("usage", "--until", "whenever")
    assert bad.returncode == 1 and "--until: 'whenever' is not a time" in bad.stderr
    assert agent.cli("usage", "--json", "--csv").returncode == 2  # one output format


def test_a_request_is_in_the_report(report_agent: tuple[AgentHandle, str]) -> None:
    agent, _ = report_agent
    key, key_id = agent.create_key("user", "live")
    body = {"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    assert http("POST", agent.url + "/api/chat", body, bearer(key))[0] == 200

    def mine() -> dict[str, Any] | None:
        rows = json.loads(report(agent, since="10m", by="key")[1])["rows"]
        return next((r for r in rows if r["group"] == f"{key_id} (live)"), None)

    row = wait_until(mine, 10, "the request's record")
    assert (row["requests"], row["errors"]) == (1, 0) and row["prompt_tokens"] > 0
    users = json.loads(report(agent, since="10m", by="user")[1])["rows"]
    assert any(r["group"] == "live" for r in users)  # no user on the record: the key's name


def test_a_frontend_key_records_its_end_users_and_other_keys_cannot(make_agent: Any) -> None:
    """Open WebUI's forwarded user headers name the person behind each request, for a frontend key only:
    with any other key the same headers are ignored (a client cannot charge its use to someone else)."""
    agent = make_agent().start()
    agent.wait_ready()
    made = agent.cli("keys", "create", "--name", "open-webui", "--role", "user", "--frontend", "--json")
    assert made.returncode == 0, made.stderr
    frontend = json.loads(made.stdout)
    assert frontend["frontend"] is True
    plain = agent.key("user")
    chat = {"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    people = {
        "ada@corp.example.com": {
            "X-OpenWebUI-User-Email": "ada@corp.example.com",
            "X-OpenWebUI-User-Id": "1",
        },
        "7f3c": {"X-OpenWebUI-User-Id": "7f3c", "X-OpenWebUI-User-Name": "Grace"},
    }
    for headers in people.values():
        for key in (frontend["key"], plain):
            code, _, _ = http("POST", agent.url + "/api/chat", chat, {**bearer(key), **headers})
            assert code == 200

    def by_user() -> dict[str, int] | None:
        code, body, _ = agent.get("/agent/usage?since=1h&by=user", agent.key("operator"))
        assert code == 200, body
        rows = {row["group"]: row["requests"] for row in body["rows"]}
        return rows if sum(rows.values()) >= 4 else None

    rows = wait_until(by_user, 10, "the four records in the report")
    assert rows == {"ada@corp.example.com": 1, "7f3c": 1, "fixture-user": 2}
