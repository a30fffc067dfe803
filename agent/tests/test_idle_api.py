"""Idle figures, the atomic drain and resume, through the agent's HTTP API."""

from __future__ import annotations

from conftest import AgentHandle
from support import wait_until


def test_idle_grows_drain_refuses_then_drains_and_resumes(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent()
    agent.start().wait_ready()
    op = agent.key("operator")
    first = agent.get("/agent/idle", op)[1]
    assert set(first) == {"idle_seconds", "inflight", "last_activity", "draining"}
    wait_until(
        lambda: agent.get("/agent/idle", op)[1]["idle_seconds"] > first["idle_seconds"] + 0.3,
        5,
        "idle_seconds to grow",
    )

    code, body, _ = agent.post("/agent/drain", {"if_idle_for": 3600}, op)
    assert code == 409, body
    assert body["draining"] is False and "idle for" in body["error"]
    assert agent.readyz()[0] == 200  # nothing changed

    code, body, _ = agent.post("/agent/drain", {"if_idle_for": 0.2}, op)
    assert code == 200, body
    assert body["draining"] is True
    code, ready = agent.readyz()
    assert code == 503 and "draining" in ready["reason"]
    assert agent.get("/agent/idle", op)[1]["draining"] is True

    code, body, _ = agent.post("/agent/resume", None, op)
    assert code == 200 and body["draining"] is False
    assert body["idle_seconds"] < 1.0  # idle counts again from the resume
    assert agent.readyz()[0] == 200


def test_drain_without_condition_and_bad_bodies(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent()
    agent.start().wait_ready()
    op = agent.key("operator")
    for bad in ({"if_idle_for": -1}, {"if_idle_for": "soon"}, {"when": 3}, [1]):
        code, body, _ = agent.post("/agent/drain", bad, op)
        assert code == 400, (bad, body)
        assert "error" in body
    assert agent.readyz()[0] == 200  # bad requests changed nothing
    code, body, _ = agent.post("/agent/drain", None, op)
    assert code == 200 and body["draining"] is True
    assert agent.readyz()[0] == 503
