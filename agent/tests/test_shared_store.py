"""Two real agents on one real PostgreSQL database: keys made once work on both and a revocation reaches
both within auth.refresh_interval; usage of both in one report, exactly one record per request; the
database away for a while loses nothing; three agents starting at once on an empty database."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from agents import AGENT, AgentHandle
from support import Proc, bearer, http, wait_until
from test_postgres_store import with_roles

pytestmark = pytest.mark.slow

REFRESH = 0.5
CHAT = {"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}], "stream": False}


class FleetDB:
    """A database set up as the collection sets it up: roles by `db setup`, the schema by `db upgrade`
    with the owner's credential; agents connect with the agent's credential from a password file."""

    def __init__(self, postgres: Any, database: str, directory: Path) -> None:
        self.postgres, self.database, self.dir = postgres, database, directory
        self.owner, self.agent = asyncio.run(with_roles(postgres, database))
        directory.mkdir(parents=True, exist_ok=True)
        self.password_file = directory / "db-password"
        self.password_file.write_text(self.agent.password + "\n")
        self.password_file.chmod(0o600)

    def store(self) -> dict[str, Any]:
        return {
            "url": self.postgres.url(self.agent.user, self.database, tls=True),
            "password_file": str(self.password_file),
        }

    def owner_stdin(self, **extra: Any) -> str:
        return json.dumps({"store": {"user": self.owner.user, "password": self.owner.password}, **extra})

    def agent_overrides(self, name: str, **extra: Any) -> dict[str, Any]:
        return {
            "store": self.store(),
            "host_id": name,
            "state_dir": str(self.dir / name),
            "auth": {"refresh_interval": REFRESH},
            **extra,
        }


def upgrade(agent: AgentHandle, db: FleetDB) -> dict[str, Any]:
    done = agent.cli("db", "upgrade", "--stdin-json", stdin=db.owner_stdin())
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def create_key(agent: AgentHandle, db: FleetDB, role: str, name: str) -> tuple[str, str]:
    secret = "llmf_" + secrets.token_urlsafe(32)
    made = agent.cli(
        "keys",
        "create",
        "--name",
        name,
        "--role",
        role,
        "--from-stdin",
        "--stdin-json",
        "--json",
        stdin=db.owner_stdin(key=secret),
    )
    assert made.returncode == 0, made.stderr
    return secret, json.loads(made.stdout)["id"]


ANSWERED: dict[str, int] = {}  # agent directory -> requests answered 200 (each leaves one record)


def chat(agent: AgentHandle, key: str) -> int:
    status, _, _ = http("POST", agent.url + "/api/chat", CHAT, bearer(key), timeout=30)
    if status == 200:
        ANSWERED[str(agent.dir)] = ANSWERED.get(str(agent.dir), 0) + 1
    return status


def test_two_agents_one_database(make_agent: Any, fleet_db: FleetDB) -> None:
    ANSWERED.clear()
    a = make_agent(fleet_db.agent_overrides("i-aaa"), name="a")
    b = make_agent(fleet_db.agent_overrides("i-bbb"), name="b")
    # the agent's own credential may not migrate: it says so, and who can
    early = a.cli("db", "upgrade")
    assert early.returncode == 1 and "permission denied" in early.stderr
    assert upgrade(a, fleet_db)["to"] >= 2
    a.start(), b.start()
    a.wait_ready(30), b.wait_ready(30)

    # a key made once, from one place, works on both agents at once
    key, key_id = create_key(a, fleet_db, "operator", "ops")
    assert chat(a, key) == 200 and chat(b, key) == 200
    for _ in range(4):
        assert chat(a, key) == 200
    for _ in range(2):
        assert chat(b, key) == 200

    # revoked once, refused by both within the refresh interval
    revoked = a.cli("keys", "revoke", key_id, "--stdin-json", stdin=fleet_db.owner_stdin())
    assert revoked.returncode == 0, revoked.stderr
    t0 = time.monotonic()
    for agent in (a, b):
        wait_until(lambda agent=agent: chat(agent, key) == 401, REFRESH + 3, f"{agent.dir.name} to refuse")
    assert time.monotonic() - t0 < REFRESH + 3

    # one report, from either agent, over both hosts: exactly one record per request answered
    viewer, _ = create_key(a, fleet_db, "operator", "viewer")

    # records are written in the background: wait for as many as were answered (b may have answered a
    # few more while its key cache was still to refresh), then the exact count below
    want = {"i-aaa": ANSWERED[str(a.dir)], "i-bbb": ANSWERED[str(b.dir)]}

    def by_host() -> dict[str, int] | None:
        status, body, _ = http("GET", b.url + "/agent/usage?since=1h&by=host", None, bearer(viewer))
        assert status == 200, body
        rows = {row["group"]: row["requests"] for row in body["rows"]}
        return rows if all(rows.get(host, 0) >= n for host, n in want.items()) else None

    rows = wait_until(by_host, 10, "both agents' records in one report")
    # 401s are not proxied requests: they leave no usage record (they are audited)
    assert rows == want
    conn_rows = fleet_db.postgres.psql(
        "SELECT count(*), count(DISTINCT request_id) FROM usage", fleet_db.database
    )
    total, distinct = map(int, conn_rows.split("|"))
    assert total == distinct == sum(rows.values())


class Traffic:
    """Sequential chats through one agent in a thread, until stopped: the request id of each answer."""

    def __init__(self, agent: AgentHandle, key: str) -> None:
        self.agent, self.key = agent, key
        self.ids: list[str] = []
        self.failures: list[tuple[int, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            status, body, headers = http(
                "POST", self.agent.url + "/api/chat", CHAT, bearer(self.key), timeout=30
            )
            if status == 200:
                self.ids.append(headers["X-Request-Id"])
            else:
                self.failures.append((status, body))
            self._stop.wait(0.05)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def stored_ids(db: FleetDB, host: str) -> list[str]:
    """The host's request ids in the order the database received them (rows are only ever appended)."""
    out = db.postgres.psql(
        f"SELECT request_id FROM usage WHERE host = '{host}' ORDER BY tableoid::regclass::text, ctid",
        db.database,
    )
    return out.split() if out else []


def spool_of(agent: AgentHandle, key: str) -> dict[str, Any]:
    status, body, _ = http("GET", agent.url + "/agent/status", None, bearer(key))
    assert status == 200, body
    return body["store"]["usage"]


def test_database_away_for_20_seconds_loses_nothing(make_agent: Any, fleet_db: FleetDB) -> None:
    """PostgreSQL stopped for 20 s while requests flow through two agents, then started again: the agents
    answered every request meanwhile, and every record arrives exactly once, in the order it was made."""
    a = make_agent(fleet_db.agent_overrides("i-aaa"), name="a")
    b = make_agent(fleet_db.agent_overrides("i-bbb"), name="b")
    upgrade(a, fleet_db)
    key, _ = create_key(a, fleet_db, "operator", "ops")
    a.start(), b.start()
    a.wait_ready(30), b.wait_ready(30)
    with Traffic(a, key) as ta, Traffic(b, key) as tb:
        wait_until(lambda: len(ta.ids) >= 5 and len(tb.ids) >= 5, 20, "traffic before the outage")
        fleet_db.postgres.stop()
        try:
            outage_start = (len(ta.ids), len(tb.ids))
            wait_until(lambda: spool_of(a, key)["spool"]["records"] > 0, 30, "records spooled on a")
            time.sleep(20)  # the outage itself: its length is the point of the test
            during = (len(ta.ids) - outage_start[0], len(tb.ids) - outage_start[1])
        finally:
            fleet_db.postgres.start()
        wait_until(lambda: len(ta.ids) >= outage_start[0] + during[0] + 5, 20, "traffic after the outage")
    assert ta.failures == [] and tb.failures == []  # every request answered, the outage included
    assert min(during) >= 20  # requests kept flowing through both agents while the database was away
    for agent, traffic, host in ((a, ta, "i-aaa"), (b, tb, "i-bbb")):
        wait_until(
            lambda t=traffic, h=host: len(stored_ids(fleet_db, h)) >= len(t.ids), 60, f"{host} replayed"
        )
        assert stored_ids(fleet_db, host) == traffic.ids  # exactly once each, in order
        spool = spool_of(agent, key)["spool"]
        assert spool["records"] == 0 and spool["dropped"] == 0


def test_records_spooled_before_a_sigkill_arrive_once(make_agent: Any, fleet_db: FleetDB) -> None:
    """An agent killed (SIGKILL) while its spool holds records: started again with the database back, it
    replays them; none is lost, none doubled."""
    a = make_agent(fleet_db.agent_overrides("i-aaa"), name="a")
    upgrade(a, fleet_db)
    key, _ = create_key(a, fleet_db, "operator", "ops")
    a.start()
    a.wait_ready(30)
    ids = []
    assert chat(a, key) == 200  # the first records reach the database
    fleet_db.postgres.stop()
    try:
        for _ in range(30):
            status, _, headers = http("POST", a.url + "/api/chat", CHAT, bearer(key), timeout=30)
            assert status == 200
            ids.append(headers["X-Request-Id"])

        def all_spooled() -> bool:
            usage = spool_of(a, key)
            return usage["pending"] == 0 and usage["spool"]["records"] >= len(ids)

        wait_until(all_spooled, 30, "every record in the spool")
        assert a.proc is not None
        a.proc.signal(signal.SIGKILL)
        a.proc.wait(10)
        a.proc.stop()  # the rest of its process group (the simulator)
    finally:
        fleet_db.postgres.start()
    a.start()
    a.wait_ready(30)
    wait_until(
        lambda: set(ids) <= set(stored_ids(fleet_db, "i-aaa")), 30, "the spool replayed after the kill"
    )
    stored = stored_ids(fleet_db, "i-aaa")
    assert len(stored) == len(set(stored))
    assert stored[-len(ids) :] == ids


def test_three_agents_starting_at_once_on_an_empty_database(make_agent: Any, fleet_db: FleetDB) -> None:
    """Agents whose credential may migrate (here the owner's) upgrade an empty database at start; three
    starting together apply each migration once and all become ready."""
    owner_pw = fleet_db.dir / "owner-password"
    owner_pw.write_text(fleet_db.owner.password)
    owner_pw.chmod(0o600)
    store = {
        "url": fleet_db.postgres.url(fleet_db.owner.user, fleet_db.database, tls=True),
        "password_file": str(owner_pw),
    }
    agents = [
        make_agent({**fleet_db.agent_overrides(f"i-{n}"), "store": store}, name=f"agent-{n}")
        for n in range(3)
    ]
    for agent in agents:
        agent.start()
    for agent in agents:
        agent.wait_ready(60)
    rows = fleet_db.postgres.psql("SELECT version FROM llmfleet_schema ORDER BY version", fleet_db.database)
    versions = [int(v) for v in rows.split()]
    assert versions == sorted(set(versions)) and versions[-1] >= 2
    status = agents[0].cli("db", "status", "--stdin-json", stdin=fleet_db.owner_stdin())
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["version"] == json.loads(status.stdout)["head"]


def test_an_agent_on_a_database_behind_it_says_who_must_upgrade(make_agent: Any, fleet_db: FleetDB) -> None:
    agent = make_agent(fleet_db.agent_overrides("i-old"), name="old")
    agent.proc = Proc([AGENT, "serve", "--config", str(agent.config_path)], agent.dir / "agent.log")
    assert agent.proc.wait(30) == 1
    assert "run `llmfleet-agent db upgrade` with the owner's credential" in agent.log()
    wrong = fleet_db.dir / "wrong-password"
    wrong.write_text("not-the-password")
    other = make_agent(
        {**fleet_db.agent_overrides("i-wrong"), "store": {**fleet_db.store(), "password_file": str(wrong)}},
        name="wrong",
    )
    other.proc = Proc([AGENT, "serve", "--config", str(other.config_path)], other.dir / "agent.log")
    assert other.proc.wait(30) == 1
    assert "password authentication failed" in other.log()
    assert "not-the-password" not in other.log()


def test_keys_while_the_database_is_away(make_agent: Any, fleet_db: FleetDB) -> None:
    """Known keys keep working (across a restart too, from the key cache); a key the agent never saw gets
    503, not 401; an agent that never saw the database starts and serves once it answers."""
    a = make_agent(fleet_db.agent_overrides("i-aaa"), name="a")
    upgrade(a, fleet_db)
    key, _ = create_key(a, fleet_db, "operator", "ops")
    a.start()
    a.wait_ready(30)
    assert chat(a, key) == 200
    cache = Path(a.config["state_dir"]) / "keys-cache.json"
    assert cache.stat().st_mode & 0o777 == 0o600 and key not in cache.read_text()
    fresh = make_agent(fleet_db.agent_overrides("i-new"), name="fresh")
    fleet_db.postgres.stop()
    try:
        assert chat(a, key) == 200
        stranger = "llmf_" + secrets.token_urlsafe(32)
        status, body, headers = http("POST", a.url + "/api/chat", CHAT, bearer(stranger), timeout=30)
        assert (status, headers.get("Retry-After")) == (503, "5") and "unreachable" in body["error"]
        assert a.proc is not None
        a.proc.stop()
        a.start()
        a.wait_ready(30)
        assert chat(a, key) == 200  # from the key cache, the database still away
        fresh.start()  # no cache: it starts all the same
        assert http("GET", fresh.url + "/healthz", None, {})[0] == 200
        assert chat(fresh, key) == 503
    finally:
        fleet_db.postgres.start()
    wait_until(lambda: chat(fresh, key) == 200, 15, "the fresh agent to know the key")


def test_a_ca_file_the_agent_cannot_read_is_named(make_agent: Any, fleet_db: FleetDB) -> None:
    store = {
        **fleet_db.store(),
        "url": fleet_db.store()["url"].replace(str(fleet_db.postgres.ca), "/nonexistent/ca.pem"),
    }
    agent = make_agent({**fleet_db.agent_overrides("i-ca"), "store": store}, name="ca")
    agent.proc = Proc([AGENT, "serve", "--config", str(agent.config_path)], agent.dir / "agent.log")
    assert agent.proc.wait(30) == 1
    assert "sslrootcert /nonexistent/ca.pem: cannot load the CA file" in agent.log()
    assert "cannot listen" not in agent.log()
