"""API keys: created, listed, revoked with the CLI; stored only as hashes; checked on every route."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import pytest
from conftest import AgentHandle
from support import wait_until

from llmfleet_agent.keys import KeyRecord, generate_secret, key_id_for, model_matches
from llmfleet_agent.roles import Role

CONTROL_ROUTES = [
    ("GET", "/agent/status", "operator"),
    ("GET", "/agent/idle", "operator"),
    ("POST", "/agent/drain", "operator"),
    ("POST", "/agent/resume", "operator"),
]
PUBLIC_ROUTES = [("GET", "/healthz"), ("GET", "/readyz")]
RANK = {"user": 0, "operator": 1, "admin": 2}


def test_generated_keys_are_long_random_and_hash_to_stable_ids() -> None:
    a, b = generate_secret(), generate_secret()
    assert a != b and len(a) >= 43
    record = KeyRecord.new(a, "ci", Role.USER)
    assert record.id == key_id_for(a) and a not in record.hash
    assert record.matches(a) and not record.matches(b)


def test_model_patterns() -> None:
    patterns = ("llama3*", "mistral:7b", "phi3:latest")
    assert model_matches(patterns, "llama3:8b")
    assert model_matches(patterns, "phi3")  # no tag means latest
    assert not model_matches(patterns, "mistral:latest")
    assert model_matches((), "anything")


def _request(agent: AgentHandle, method: str, path: str, key: str | None) -> tuple[int, Any]:
    if method == "GET":
        code, body, _ = agent.get(path, key)
    else:
        code, body, _ = agent.post(path, None, key)
    return code, body


def test_role_matrix_on_every_control_route(ready_agent: AgentHandle) -> None:
    for method, path, needed in CONTROL_ROUTES:
        code, body = _request(ready_agent, method, path, None)
        assert code == 401, (path, body)
        assert "error" in body
        code, body = _request(ready_agent, method, path, "llmf_" + "x" * 40)
        assert code == 401, (path, body)
        for role in RANK:
            code, body = _request(ready_agent, method, path, ready_agent.key(role))
            expected = 200 if RANK[role] >= RANK[needed] else 403
            assert code == expected, (method, path, role, body)
            if expected == 403:
                assert f"needs {needed}" in body["error"]
    # leave the shared agent as it was
    ready_agent.post("/agent/resume", None, ready_agent.key("operator"))
    for method, path in PUBLIC_ROUTES:
        assert _request(ready_agent, method, path, None)[0] == 200


def test_unknown_route_needs_a_key_then_is_404(ready_agent: AgentHandle) -> None:
    assert ready_agent.get("/nowhere")[0] == 401
    code, body, _ = ready_agent.get("/nowhere", ready_agent.key("admin"))
    assert code == 404 and "no route" in body["error"]


def test_store_holds_no_secret(ready_agent: AgentHandle) -> None:
    secret, key_id = ready_agent.create_key("user", "secret-check")
    assert ready_agent.get("/agent/idle", secret)[0] == 403  # the key works (user role)
    db = ready_agent.dir / "agent.db"
    blobs = b"".join(p.read_bytes() for p in db.parent.glob("agent.db*"))
    assert secret.encode() not in blobs
    assert key_id.encode() in blobs
    assert secret not in ready_agent.log()


def test_keys_list_shows_metadata_never_secrets(ready_agent: AgentHandle) -> None:
    secret, key_id = ready_agent.create_key("operator", "lister", "--models", "llama3*", "--expires", "30d")
    ready_agent.get("/agent/idle", secret)
    res = ready_agent.cli("keys", "list", "--json")
    assert res.returncode == 0, res.stderr
    assert secret not in res.stdout
    entry = next(k for k in json.loads(res.stdout) if k["id"] == key_id)
    assert entry["name"] == "lister" and entry["role"] == "operator" and entry["models"] == ["llama3*"]
    assert entry["expires"] == pytest.approx(entry["created"] + 30 * 86400, abs=5)
    assert "hash" not in entry
    # last use is recorded (in the background, within the refresh interval)
    wait_until(
        lambda: next(
            k for k in json.loads(ready_agent.cli("keys", "list", "--json").stdout) if k["id"] == key_id
        )["last_used"],
        10,
        "last_used to be recorded",
    )
    table = ready_agent.cli("keys", "list").stdout
    assert key_id in table and "LAST USED" in table and secret not in table


def test_revoked_key_is_refused(ready_agent: AgentHandle) -> None:
    secret, key_id = ready_agent.create_key("operator", "to-revoke")
    assert ready_agent.get("/agent/idle", secret)[0] == 200
    res = ready_agent.cli("keys", "revoke", key_id)
    assert res.returncode == 0 and "revoked" in res.stdout
    wait_until(lambda: ready_agent.get("/agent/idle", secret)[0] == 401, 10, "the revocation to take effect")
    body = ready_agent.get("/agent/idle", secret)[1]
    assert "revoked" in body["error"]
    # the failure is logged with the key's id, never its secret
    failures = [line for line in ready_agent.log().splitlines() if "authentication failed" in line]
    assert any(f'"key_id":"{key_id}"' in line for line in failures)
    assert secret not in ready_agent.log()
    missing = ready_agent.cli("keys", "revoke", "0000000000000000")
    assert missing.returncode != 0 and "no key with id" in missing.stderr


def test_expired_key_is_refused(ready_agent: AgentHandle) -> None:
    secret, _ = ready_agent.create_key("operator", "short-lived", "--expires", "2s")
    started = time.monotonic()
    code = ready_agent.get("/agent/idle", secret)[0]
    assert code == 200 or time.monotonic() - started > 2
    wait_until(lambda: ready_agent.get("/agent/idle", secret)[0] == 401, 10, "the key to expire")
    assert "expired" in ready_agent.get("/agent/idle", secret)[1]["error"]


def test_key_from_stdin_is_stored_idempotently(ready_agent: AgentHandle) -> None:
    secret = "shared-fleet-key-" + "k" * 40
    args = ("keys", "create", "--name", "fleet-ops", "--role", "operator", "--from-stdin")
    first = ready_agent.cli(*args, stdin=secret + "\n")
    assert first.returncode == 0 and first.stdout.startswith("created"), first.stderr
    assert secret not in first.stdout
    again = ready_agent.cli(*args, stdin=secret)
    assert again.returncode == 0 and again.stdout.startswith("unchanged")
    assert ready_agent.get("/agent/idle", secret)[0] == 200
    short = ready_agent.cli(*args, stdin="too-short")
    assert short.returncode != 0 and "at least 32 characters" in short.stderr


def test_duplicate_active_name_is_refused(ready_agent: AgentHandle) -> None:
    ready_agent.create_key("user", "dup")
    res = ready_agent.cli("keys", "create", "--name", "dup", "--role", "user")
    assert res.returncode != 0 and "--name" in res.stderr


def test_audit_records_key_actions_and_auth_failures(make_agent) -> None:  # type: ignore[no-untyped-def]
    # auth failures are audited when their window closes (test_bounds.py): a short one here
    agent: AgentHandle = make_agent({"auth": {"failure_window": 1}})
    agent.start()
    _, key_id = agent.create_key("user", "audited")
    agent.cli("keys", "revoke", key_id)
    agent.get("/agent/status")  # no key
    db = agent.dir / "agent.db"

    def events() -> set[tuple[str, str | None]]:
        with sqlite3.connect(db) as conn:
            return set(conn.execute("SELECT event, key_id FROM audit").fetchall())

    wait_until(lambda: ("auth_failed", None) in events(), 10, "the auth failure to be audited")
    assert ("key_created", key_id) in events() and ("key_revoked", key_id) in events()
