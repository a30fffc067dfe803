"""The proxy when things go wrong: clients leaving, Ollama dying, bad requests, limits, draining."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
from typing import Any

import pytest
from conftest import AgentHandle
from support import Stream, http, wait_until

WORDS = " ".join(f"w{i}" for i in range(40))
SLOW = {"ollama": {"env": {"LLMFLEET_SIM_TOKEN_DELAY": "0.05"}}}


def chat(stream: bool = True, words: str = WORDS, model: str = "tinyllama") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": words}], "stream": stream}


def usage_rows(agent: AgentHandle) -> list[dict[str, Any]]:
    with sqlite3.connect(agent.dir / "agent.db") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY ts")]


@pytest.fixture
def slow_agent(make_agent) -> AgentHandle:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent(SLOW)
    agent.start().wait_ready()
    return agent


def test_client_disconnect_cancels_the_generation(slow_agent: AgentHandle) -> None:
    stream = Stream(slow_agent.url, "/api/chat", chat(), slow_agent.key("user"))
    lines = stream.lines()
    first = [next(lines) for _ in range(3)]
    assert all(b'"done":false' in line for line in first)
    stream.close()
    wait_until(
        lambda: "client disconnected, generation cancelled" in slow_agent.log(),
        5,
        "Ollama to stop generating",
    )
    wait_until(lambda: any(r["status"] == 499 for r in usage_rows(slow_agent)), 5, "the 499 record")
    assert slow_agent.get("/agent/idle", slow_agent.key("operator"))[1]["inflight"] == 0


def test_ollama_killed_mid_stream(slow_agent: AgentHandle) -> None:
    pid = slow_agent.ollama()["pid"]
    stream = Stream(slow_agent.url, "/api/chat", chat(), slow_agent.key("user"))
    lines = stream.lines()
    assert b'"done":false' in next(lines)
    os.kill(pid, signal.SIGKILL)
    rest = list(lines)
    last = json.loads(rest[-1])
    assert "error" in last and "mid-answer" in last["error"]
    assert all(b'"done":true' not in line for line in rest)
    wait_until(lambda: any(r["status"] == 502 for r in usage_rows(slow_agent)), 5, "the failed record")
    failed = next(r for r in usage_rows(slow_agent) if r["status"] == 502)
    assert failed["error"] and failed["completion_tokens"] is None
    slow_agent.wait_ready()
    code, body, _ = http(
        "POST",
        slow_agent.url + "/api/chat",
        chat(stream=False, words="after recovery"),
        {"Authorization": f"Bearer {slow_agent.key('user')}"},
    )
    assert code == 200 and body["message"]["content"] == "after recovery"


def test_ollama_killed_mid_sse_stream(slow_agent: AgentHandle) -> None:
    pid = slow_agent.ollama()["pid"]
    body = {"model": "tinyllama", "messages": [{"role": "user", "content": WORDS}], "stream": True}
    stream = Stream(slow_agent.url, "/v1/chat/completions", body, slow_agent.key("user"))
    lines = stream.lines()
    assert next(lines).startswith(b"data: {")
    os.kill(pid, signal.SIGKILL)
    rest = list(lines)
    assert rest[-1].startswith(b"data: ")
    error = json.loads(rest[-1][6:])["error"]
    assert "mid-answer" in error["message"]
    assert b"data: [DONE]" not in rest


def test_bad_requests_get_json_errors(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent({"limits": {"max_body_bytes": 2048}})
    agent.start().wait_ready()
    user = {"Authorization": f"Bearer {agent.key('user')}"}
    code, body, _ = http("POST", agent.url + "/api/chat", chat(words="x " * 3000), user)
    assert code == 413 and "too large" in body["error"] and "2048" in body["error"]
    code, body, _ = http(
        "POST", agent.url + "/api/generate", None, {**user, "Content-Type": "application/json"}
    )
    assert code == 400
    for bad, expected in (({"prompt": "no model"}, "missing field: model"), ({"model": 7}, "model name")):
        code, body, _ = http("POST", agent.url + "/api/generate", bad, user)
        assert code == 400 and expected in body["error"], body
    import urllib.request

    req = urllib.request.Request(agent.url + "/api/chat", data=b'{"model": ', method="POST", headers=user)
    try:
        urllib.request.urlopen(req, timeout=5)
    except urllib.error.HTTPError as err:
        assert err.code == 400 and "not valid JSON" in json.loads(err.read())["error"]
    else:
        pytest.fail("malformed JSON was accepted")
    code, body, _ = http("GET", agent.url + "/api/nothing-here", None, user)
    assert code == 404 and "error" in body
    code, body, _ = http("POST", agent.url + "/api/chat", chat(stream=False, model="never-pulled"), user)
    assert code == 404 and "not found" in body["error"]  # Ollama's own error, passed through
    # nothing was lost: every refused request has its record
    wait_until(lambda: {413, 400, 404} <= {r["status"] for r in usage_rows(agent)}, 5, "records of refusals")


def test_per_key_concurrency_and_rate_limits(slow_agent: AgentHandle) -> None:
    one_at_a_time, _ = slow_agent.create_key("user", "single", "--max-concurrent", "1")
    stream = Stream(slow_agent.url, "/api/chat", chat(), one_at_a_time)
    lines = stream.lines()
    next(lines)
    code, body, headers = http(
        "POST",
        slow_agent.url + "/api/chat",
        chat(stream=False, words="x"),
        {"Authorization": f"Bearer {one_at_a_time}"},
    )
    assert code == 429 and "limit 1" in body["error"] and int(headers["Retry-After"]) >= 1
    assert b'"done":true' in list(lines)[-1]  # the first request was not disturbed

    two_a_minute, _ = slow_agent.create_key("user", "slowpoke", "--rpm", "2")
    auth = {"Authorization": f"Bearer {two_a_minute}"}
    codes = [http("GET", slow_agent.url + "/api/version", None, auth)[0] for _ in range(3)]
    assert codes == [200, 200, 429]
    code, body, headers = http("GET", slow_agent.url + "/api/version", None, auth)
    assert code == 429 and 1 <= int(headers["Retry-After"]) <= 60


def test_not_running_is_503_at_once(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent(
        {
            "ollama": {
                "env": {"LLMFLEET_SIM_EXIT_AT_ONCE": "1"},
                "restart": {"initial_delay": 0.05, "max_delay": 0.1, "max_failures": 2},
            }
        }
    )
    agent.start()
    wait_until(lambda: agent.ollama()["state"] == "FATAL", 10, "FATAL")
    code, body, headers = http(
        "POST",
        agent.url + "/api/chat",
        chat(stream=False),
        {"Authorization": f"Bearer {agent.key('user')}"},
        timeout=5,
    )
    assert code == 503 and "FATAL" in body["error"] and headers["Retry-After"]


def test_draining_refuses_new_work_and_lets_streams_finish(slow_agent: AgentHandle) -> None:
    user, op = slow_agent.key("user"), slow_agent.key("operator")
    stream = Stream(slow_agent.url, "/api/chat", chat(), user)
    lines = stream.lines()
    next(lines)
    idle = slow_agent.get("/agent/idle", op)[1]
    assert idle["inflight"] == 1 and idle["idle_seconds"] == 0
    code, body, _ = slow_agent.post("/agent/drain", {"if_idle_for": 0}, op)
    assert code == 409 and body["inflight"] == 1  # busy: no drain
    code, _, _ = slow_agent.post("/agent/drain", None, op)
    assert code == 200
    code, body, headers = http(
        "POST",
        slow_agent.url + "/api/chat",
        chat(stream=False, words="x"),
        {"Authorization": f"Bearer {user}"},
    )
    assert code == 503 and "draining" in body["error"] and headers["Retry-After"]
    rest = list(lines)
    final = json.loads(rest[-1])
    assert final["done"] is True and final["eval_count"] == 40  # the stream in flight finished whole
    assert slow_agent.get("/agent/idle", op)[1]["inflight"] == 0


def test_first_chunk_is_not_held_back(slow_agent: AgentHandle) -> None:
    """With a slow model the first token arrives long before the last: nothing buffers the stream."""
    got: list[float] = []
    stream = Stream(slow_agent.url, "/api/chat", chat(), slow_agent.key("user"))
    done = threading.Event()

    def read() -> None:
        import time

        for _ in stream.lines():
            got.append(time.monotonic())
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(10)
    # 40 tokens 0.05 s apart: the lines arrived spread over the generation, not in one lump at the end
    assert got[-1] - got[0] > 1.0
