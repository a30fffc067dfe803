"""The gateway's key on an agent (issue 14): from auth.gateway_sources only, it acts for the caller its
X-Llmfleet-* headers name - their role and model patterns decide, their key, person and the gateway's
request id are in the one usage record the agent writes; anyone else's such headers count for nothing."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import pytest
from agents import AgentHandle
from support import bearer, http, wait_until

from llmfleet_agent.config import ConfigError, parse_config

CHAT = {"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def records(agent: AgentHandle) -> list[dict[str, Any]]:
    with sqlite3.connect(agent.dir / "agent.db") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY ts")]


def gateway_key(agent: AgentHandle) -> str:
    made = agent.cli("keys", "create", "--name", "gateway-1", "--role", "operator", "--gateway", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["gateway"] is True
    return str(json.loads(made.stdout)["key"])


def acting(
    key: str, caller: str, role: str = "user", models: str = '["tinyllama*"]', **extra: str
) -> dict[str, str]:
    return {
        **bearer(key),
        "X-Llmfleet-Key-Id": caller,
        "X-Llmfleet-Role": role,
        "X-Llmfleet-Models": models,
        **extra,
    }


def test_the_gateway_acts_for_its_caller_and_the_agent_records_the_request_once(make_agent: Any) -> None:
    agent = make_agent({"auth": {"gateway_sources": ["127.0.0.1/32", "10.0.0.0/8"]}})
    gateway = gateway_key(agent)
    agent.start().wait_ready(30)

    request_id = "00112233aabbccdd"
    headers = acting(
        gateway,
        "3f2a9c0d1e2b4a5c",
        **{"X-Llmfleet-User": "ann@example.com", "X-Llmfleet-Request-Id": request_id},
    )
    code, _, answer_headers = http("POST", agent.url + "/api/chat", CHAT, headers)
    assert code == 200 and answer_headers["X-Request-Id"] == request_id
    wait_until(lambda: any(r["request_id"] == request_id for r in records(agent)), 10, "the record")
    (record,) = [r for r in records(agent) if r["request_id"] == request_id]  # exactly one
    assert record["key_id"] == "3f2a9c0d1e2b4a5c" and record["user"] == "ann@example.com"
    assert record["status"] == 200 and record["prompt_tokens"]

    # the caller's rights, not the gateway's: a model outside their patterns, an admin route
    code, body, _ = http(
        "POST", agent.url + "/api/chat", {**CHAT, "model": "llama3"}, acting(gateway, "3f2a9c0d1e2b4a5c")
    )
    assert code == 403 and "3f2a9c0d1e2b4a5c" in body["error"], body
    code, body, _ = http("POST", agent.url + "/api/pull", {"model": "x"}, acting(gateway, "3f2a9c0d1e2b4a5c"))
    assert code == 403 and "needs admin" in body["error"], body
    # without the headers the gateway is itself (an operator: its status polling)
    assert agent.get("/agent/status", gateway)[0] == 200

    # wrong headers are refused, naming the header
    code, body, _ = http(
        "POST", agent.url + "/api/chat", CHAT, acting(gateway, "3f2a9c0d1e2b4a5c", role="boss")
    )
    assert code == 400 and "X-Llmfleet-Role" in body["error"]
    code, body, _ = http("POST", agent.url + "/api/chat", CHAT, acting(gateway, "no spaces allowed"))
    assert code == 400 and "X-Llmfleet-Key-Id" in body["error"]

    # another key's X-Llmfleet-* headers count for nothing: its own id and rights, no person
    plain = agent.key("user")
    code, _, answer_headers = http(
        "POST",
        agent.url + "/api/chat",
        CHAT,
        acting(plain, "someone-else", role="admin", **{"X-Llmfleet-User": "bob"}),
    )
    assert code == 200
    mine = answer_headers["X-Request-Id"]
    wait_until(lambda: any(r["request_id"] == mine for r in records(agent)), 10, "the plain key's record")
    (record,) = [r for r in records(agent) if r["request_id"] == mine]
    assert record["key_id"] != "someone-else" and record["user"] is None


def test_the_gateways_time_limits_and_patterns_hold_on_the_agent(make_agent: Any) -> None:
    """The record takes the gateway's time (so a request recorded by both is stored once); the caller's
    limits were the gateway's to enforce, so the agent's defaults do not cut them again; patterns travel as
    JSON, a comma in one included."""
    agent = make_agent(
        {"auth": {"gateway_sources": ["127.0.0.1/32"]}, "limits": {"requests_per_minute_per_key": 2}}
    )
    gateway = gateway_key(agent)
    agent.start().wait_ready(30)
    stamp = f"{time.time() - 1.25:.6f}"
    headers = acting(
        gateway,
        "5a5a5a5a5a5a5a5a",
        **{"X-Llmfleet-Request-Id": "abcdef0123456789", "X-Llmfleet-Request-Ts": stamp},
    )
    assert http("POST", agent.url + "/api/chat", CHAT, headers)[0] == 200
    wait_until(lambda: any(r["request_id"] == "abcdef0123456789" for r in records(agent)), 10, "the record")
    (record,) = [r for r in records(agent) if r["request_id"] == "abcdef0123456789"]
    assert record["ts"] == float(stamp)
    # the agent's default of 2 a minute does not apply to what the gateway let through
    for _ in range(4):
        assert http("POST", agent.url + "/api/chat", CHAT, acting(gateway, "5a5a5a5a5a5a5a5a"))[0] == 200
    comma = acting(gateway, "5a5a5a5a5a5a5a5a", models='["tinyllam[a,b]:*"]')
    assert http("POST", agent.url + "/api/chat", CHAT, comma)[0] == 200
    # a time far from the agent's clock, patterns that are not a JSON array: 400 naming the header
    skewed = acting(gateway, "5a5a5a5a5a5a5a5a", **{"X-Llmfleet-Request-Ts": str(time.time() - 3600)})
    code, body, _ = http("POST", agent.url + "/api/chat", CHAT, skewed)
    assert code == 400 and "X-Llmfleet-Request-Ts" in body["error"]
    code, body, _ = http(
        "POST", agent.url + "/api/chat", CHAT, acting(gateway, "5a5a5a5a5a5a5a5a", models="tinyllama*")
    )
    assert code == 400 and "X-Llmfleet-Models" in body["error"]


def test_a_gateway_key_from_elsewhere_is_refused(make_agent: Any) -> None:
    agent = make_agent({"auth": {"gateway_sources": ["10.0.0.0/8"]}})
    gateway = gateway_key(agent)
    agent.start().wait_ready(30)
    code, body, _ = http("POST", agent.url + "/api/chat", CHAT, acting(gateway, "3f2a9c0d1e2b4a5c"))
    assert code == 403 and "accepted only from auth.gateway_sources, not from 127.0.0.1" in body["error"]
    # not even as itself
    assert agent.get("/agent/status", gateway)[0] == 403
    assert records(agent) == []  # refused before it was a request of anyone's

    def audited() -> list[str]:
        with sqlite3.connect(agent.dir / "agent.db") as conn:
            return [
                str(e) for (e,) in conn.execute("SELECT event FROM audit WHERE event = 'gateway_refused'")
            ]

    wait_until(lambda: len(audited()) == 2, 10, "both refusals audited")


def test_gateway_sources_are_addresses() -> None:
    with pytest.raises(ConfigError, match=r"auth\.gateway_sources: .*'the gateway' is not an address"):
        parse_config({"auth": {"gateway_sources": ["the gateway"]}})
    assert parse_config({"auth": {"gateway_sources": ["10.42.0.0/24", "fd00::1"]}}).auth.gateway_sources
    # the gateway sends agents its key: over TLS it must verify them
    with pytest.raises(ConfigError, match=r"gateway: .*agent_ca_file: required"):
        parse_config({"gateway": {"key_file": "/k", "deployment": "acme-llm"}})
    with pytest.raises(ConfigError, match=r"hosts \(a fixed list\) or deployment"):
        parse_config({"gateway": {"key_file": "/k", "agent_scheme": "http"}})


def test_an_ipv4_gateway_seen_through_a_dual_stack_socket_counts() -> None:
    from llmfleet_agent.gateway_identity import from_gateway

    assert from_gateway("::ffff:10.42.0.7", ["10.42.0.0/24"])
    assert not from_gateway("::ffff:10.43.0.7", ["10.42.0.0/24"])
    assert not from_gateway("not an address", ["0.0.0.0/0"])
