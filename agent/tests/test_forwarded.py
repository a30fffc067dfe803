"""Behind a load balancer (listen.forwarded_by): the client's address is the last X-Forwarded-For entry
when the connection comes from the load balancer, so throttles, the audit log and the access log name the
client, not the load balancer; from anywhere else the header changes nothing."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing

from conftest import AgentHandle
from support import bearer, http

from llmfleet_agent.addresses import parse_networks
from llmfleet_agent.forwarded import client_address


def test_the_client_is_the_last_forwarded_address_from_the_load_balancer_only() -> None:
    lb = parse_networks(["10.42.0.0/20"])
    assert client_address("10.42.3.4", "203.0.113.9", lb) == "203.0.113.9"
    # what the client wrote before the load balancer's own entry is not believed
    assert client_address("10.42.3.4", "127.0.0.1, 198.51.100.7", lb) == "198.51.100.7"
    assert client_address("::ffff:10.42.3.4", "198.51.100.7", lb) == "198.51.100.7"
    assert client_address("10.99.0.1", "203.0.113.9", lb) == "10.99.0.1"  # not from the load balancer
    assert client_address("10.42.3.4", "not-an-address", lb) == "10.42.3.4"
    assert client_address("10.42.3.4", None, lb) == "10.42.3.4"


def _audited_remotes(agent: AgentHandle) -> list[str]:
    with closing(sqlite3.connect(agent.dir / "agent.db")) as db:
        rows = db.execute("SELECT detail FROM audit WHERE event = 'auth_failed'").fetchall()
    return sorted(json.loads(detail)["remote"] for (detail,) in rows)


def test_behind_a_load_balancer_failures_name_the_client(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent({"listen": {"forwarded_by": ["127.0.0.1/32"]}})
    agent.start()
    for client in ("203.0.113.9", "198.51.100.7"):
        headers = {**bearer("llmf_wrong"), "X-Forwarded-For": f"127.0.0.1, {client}"}
        assert http("GET", f"{agent.url}/api/tags", headers=headers)[0] == 401
    assert agent.proc is not None
    agent.proc.stop()
    assert _audited_remotes(agent) == ["198.51.100.7", "203.0.113.9"]


def test_without_forwarded_by_the_header_is_ignored(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent()
    agent.start()
    headers = {**bearer("llmf_wrong"), "X-Forwarded-For": "203.0.113.9"}
    assert http("GET", f"{agent.url}/api/tags", headers=headers)[0] == 401
    assert agent.proc is not None
    agent.proc.stop()
    assert _audited_remotes(agent) == ["127.0.0.1"]
