"""Idle figures, the atomic drain and resume, through the agent's HTTP API."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from conftest import AgentHandle
from support import Stream, wait_until

# what dashboards, load balancers and Open WebUI poll: none of it is use of the host
READS: tuple[tuple[str, str, Any], ...] = (
    ("GET", "/api/tags", None),
    ("GET", "/api/ps", None),
    ("GET", "/api/version", None),
    ("POST", "/api/show", {"model": "tinyllama"}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/tinyllama:latest", None),
)


def _read(agent: AgentHandle, method: str, path: str, body: Any, key: str) -> int:
    return agent.get(path, key)[0] if method == "GET" else agent.post(path, body, key)[0]


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


def test_model_lists_and_metadata_do_not_count_as_activity(make_agent) -> None:  # type: ignore[no-untyped-def]
    """A poller (every 0.2 s for 2 s, every read route in turn) neither resets idle nor shows in flight."""
    agent: AgentHandle = make_agent()
    agent.start().wait_ready()
    user, op = agent.key("user"), agent.key("operator")
    answers: list[tuple[str, int]] = []
    stop = threading.Event()

    def poll() -> None:
        deadline = time.monotonic() + 2.0
        i = 0
        while time.monotonic() < deadline:
            method, path, body = READS[i % len(READS)]
            answers.append((path, _read(agent, method, path, body, user)))
            i += 1
            stop.wait(0.2)  # the poll rate, not a wait for a result

    samples = [agent.get("/agent/idle", op)[1]]
    poller = threading.Thread(target=poll)
    poller.start()
    while poller.is_alive():
        samples.append(agent.get("/agent/idle", op)[1])
    poller.join()
    samples.append(agent.get("/agent/idle", op)[1])

    assert len(answers) >= len(READS) and all(code == 200 for _, code in answers), answers
    assert all(s["inflight"] == 0 for s in samples), samples
    idle = [s["idle_seconds"] for s in samples]
    assert idle == sorted(idle), idle  # never reset by a poll
    assert idle[-1] >= idle[0] + 1.9, idle  # grew through the 2 s of polling
    assert len({s["last_activity"] for s in samples}) == 1, samples

    code, _, _ = agent.post(
        "/api/chat",
        {"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}], "stream": False},
        user,
    )
    assert code == 200
    after = agent.get("/agent/idle", op)[1]
    assert after["idle_seconds"] < idle[-1] and after["last_activity"] > samples[-1]["last_activity"], after


def test_draining_refuses_inference_and_management_but_serves_reads(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent()
    agent.start().wait_ready()
    user, op, admin = agent.key("user"), agent.key("operator"), agent.key("admin")
    code, body, _ = agent.post("/agent/drain", None, op)
    assert code == 200 and body["draining"] is True
    for method, path, request in READS:  # a host about to stop still answers what it has
        assert _read(agent, method, path, request, user) == 200, path
    chat = {"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    code, body, headers = agent.post("/api/chat", chat, user)
    assert code == 503 and "draining" in body["error"] and headers["Retry-After"], body
    code, body, _ = agent.post("/api/pull", {"model": "other", "stream": False}, admin)
    assert code == 503 and "draining" in body["error"], body


def test_a_pull_in_progress_keeps_the_host_awake(make_agent) -> None:  # type: ignore[no-untyped-def]
    """Model management is work someone waits for: it is in flight, so the host is not idle."""
    agent: AgentHandle = make_agent({"ollama": {"models": [], "env": {"LLMFLEET_SIM_PULL_DELAY": "0.2"}}})
    agent.start().wait_ready()
    op = agent.key("operator")
    pull = Stream(agent.url, "/api/pull", {"model": "tinyllama"}, agent.key("admin"))
    lines = pull.lines()
    assert pull.status == 200 and "status" in json.loads(next(lines))
    idle = agent.get("/agent/idle", op)[1]
    assert idle["inflight"] == 1 and idle["idle_seconds"] == 0, idle
    code, body, _ = agent.post("/agent/drain", {"if_idle_for": 0}, op)
    assert code == 409 and body["inflight"] == 1, body
    assert json.loads(list(lines)[-1]) == {"status": "success"}
    wait_until(lambda: agent.get("/agent/idle", op)[1]["inflight"] == 0, 5, "the pull to end")
