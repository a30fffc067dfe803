"""The proxy when things go wrong: clients leaving, Ollama dying, bad requests, limits, draining."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import struct
import threading
import time
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
    # Ollama never sent its counts: the pieces the client got are recorded (the error line is the agent's)
    assert failed["error"] and failed["completion_tokens"] == 1 + (len(rest) - 1)
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


# ----- faults never lose a record -----------------------------------------------------------------------
class Call(threading.Thread):
    """One request in a thread: (status, body, headers) when it ends."""

    def __init__(self, url: str, body: dict[str, Any], key: str, path: str = "/api/chat") -> None:
        super().__init__(daemon=True)
        self.args_ = (url + path, body, {"Authorization": f"Bearer {key}"})
        self.result: tuple[int, Any, Any] | None = None
        self.start()

    def run(self) -> None:
        self.result = http("POST", *self.args_, timeout=30)

    def outcome(self, timeout: float = 20) -> tuple[int, Any, Any]:
        self.join(timeout)
        assert self.result is not None, "the request did not end"
        return self.result


def inflight(agent: AgentHandle) -> int:
    return int(agent.get("/agent/idle", agent.key("operator"))[1]["inflight"])


def record_of(agent: AgentHandle, request_id: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((r for r in usage_rows(agent) if r["request_id"] == request_id), None)

    return wait_until(find, 5, f"the record of request {request_id}")


def test_ollama_killed_during_a_non_streamed_request(slow_agent: AgentHandle) -> None:
    key = slow_agent.key("user")
    pid = slow_agent.ollama()["pid"]
    call = Call(slow_agent.url, chat(stream=False), key)
    wait_until(lambda: inflight(slow_agent) == 1, 5, "the request to be in flight")
    os.kill(pid, signal.SIGKILL)
    code, body, headers = call.outcome()
    assert code == 502 and "ollama failed before answering" in body["error"], body
    record = record_of(slow_agent, headers["X-Request-Id"])
    assert (
        record["status"] == 502 and record["error"] == body["error"] and record["model"] == "tinyllama:latest"
    )


def test_ollama_frozen_during_a_non_streamed_request(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent({**SLOW, "proxy": {"read_timeout": 1}})
    agent.start().wait_ready()
    pid = agent.ollama()["pid"]
    call = Call(agent.url, chat(stream=False), agent.key("user"))
    wait_until(lambda: inflight(agent) == 1, 5, "the request to be in flight")
    os.kill(pid, signal.SIGSTOP)
    try:
        code, body, headers = call.outcome()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert code == 504 and "did not answer within 1s" in body["error"], body
    assert record_of(agent, headers["X-Request-Id"])["status"] == 504


def test_clients_that_go_away_are_499_never_ollamas_fault(make_agent) -> None:  # type: ignore[no-untyped-def]
    """Writing to a client that reset its connection fails in aiohttp with an error of the same family as
    reading from Ollama: each must be told apart, and neither is an unhandled error."""
    agent: AgentHandle = make_agent({"ollama": {"env": {"LLMFLEET_SIM_TOKEN_DELAY": "0"}}})
    agent.start().wait_ready()
    key = agent.key("user")
    port = agent.config["listen"]["port"]
    payload = json.dumps(chat(words=" ".join(f"w{i}" for i in range(4000)))).encode()
    for i in range(24):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        head = (
            f"POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        sock.sendall(head.encode() + payload)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        # leave at once, while the agent is writing the stream: half with a reset, half with a FIN (then
        # the transport is closing before aiohttp learns the connection is lost, and a write fails)
        if i % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    wait_until(lambda: len(usage_rows(agent)) >= 24, 10, "a record for each request")
    wait_until(lambda: inflight(agent) == 0, 10, "nothing in flight")
    rows = usage_rows(agent)
    assert [(r["status"], r["error"]) for r in rows] == [(499, "client disconnected")] * 24
    log = agent.log()
    assert "Traceback" not in log and "unhandled error" not in log and "mid-answer" not in log


def test_a_client_gone_before_the_end_of_a_large_answer_is_499(make_agent) -> None:  # type: ignore[no-untyped-def]
    """The answer's last bytes go with its end, in one write: a client that leaves while that write is
    still under way (a large unstreamed answer to a slow reader) did not get the answer, and its record
    says so."""
    agent: AgentHandle = make_agent({"ollama": {"env": {"LLMFLEET_SIM_TOKEN_DELAY": "0"}}})
    agent.start().wait_ready()
    key = agent.key("user")
    port = agent.config["listen"]["port"]
    # 20,000 inputs: about 13 MiB of embeddings in one JSON answer with a Content-Length, more than the
    # kernel's socket buffers take (then the agent's last write waits for the reader)
    payload = json.dumps({"model": "tinyllama", "input": [f"w{i}" for i in range(20000)]}).encode()
    for i in range(2):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        head = (
            f"POST /api/embed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        sock.sendall(head.encode() + payload)
        got = b""
        while len(got) < 256 * 1024:  # a slow reader: a quarter of a MiB, then it leaves
            chunk = sock.recv(16384)
            assert chunk, "the agent closed the connection"
            got += chunk
            time.sleep(0.002)
        assert got.startswith(b"HTTP/1.1 200")
        if i % 2:  # a reset; else a FIN, with bytes still on their way to it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    wait_until(lambda: len(usage_rows(agent)) >= 2, 10, "a record for each request")
    rows = usage_rows(agent)
    assert [(r["route"], r["status"], r["error"]) for r in rows] == [
        ("/api/embed", 499, "client disconnected")
    ] * 2


def test_sigterm_gives_one_grace_then_ends_streams_with_their_own_error(make_agent) -> None:  # type: ignore[no-untyped-def]
    grace = 2.0
    agent: AgentHandle = make_agent({**SLOW, "listen": {"shutdown_timeout": grace}})
    agent.start().wait_ready()
    key = agent.key("user")
    long = Stream(agent.url, "/api/chat", chat(words=" ".join(f"w{i}" for i in range(400))), key)
    short = Stream(agent.url, "/api/chat", chat(words="one two three four five six seven eight"), key)
    long_lines, short_lines = long.lines(), short.lines()
    next(long_lines), next(short_lines)
    assert agent.proc is not None
    stopped_at = time.monotonic()
    agent.proc.signal(signal.SIGTERM)
    short_rest = list(short_lines)
    assert json.loads(short_rest[-1])["done"] is True  # finished within the grace: whole
    long_rest = list(long_lines)
    assert json.loads(long_rest[-1]) == {"error": "agent shutting down"}
    assert agent.proc.wait(timeout=20) == 0
    took = time.monotonic() - stopped_at
    assert grace <= took < 2 * grace, took  # one grace, not two
    rows = {r["request_id"]: r for r in usage_rows(agent)}
    cut = rows[long.headers["X-Request-Id"]]
    assert (cut["status"], cut["error"]) == (503, "agent shutting down")
    assert rows[short.headers["X-Request-Id"]]["status"] == 200
    log = agent.log()
    assert "Traceback" not in log and "cutting 1 request(s)" in log
