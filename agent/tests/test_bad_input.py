"""Bad input gets a clear 4xx JSON error, never a 500: bodies, fields the agent reads, what aiohttp's
parser refuses, `Expect: 100-continue` before the key, bodies sent too slowly."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
from conftest import AgentHandle
from support import bearer, http, wait_until

DEEP = "[" * 1000 + "]" * 1000  # 2 KB
CHAT = {"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}]}


def raw_json_post(agent: AgentHandle, path: str, data: str, key: str) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        agent.url + path,
        data=data.encode(),
        method="POST",
        headers={**bearer(key), "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        assert err.headers["Content-Type"].startswith("application/json")
        return err.code, json.loads(err.read())


class Raw:
    """A bare HTTP/1.1 connection: what a client library would not send."""

    def __init__(self, agent: AgentHandle, timeout: float = 10) -> None:
        port = agent.config["listen"]["port"]
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def head(self) -> tuple[int, dict[str, str]]:
        """Read one status line and its headers."""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed; got {self.buf!r}")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers

    def body(self, headers: dict[str, str]) -> Any:
        length = int(headers["content-length"])
        while len(self.buf) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        data, self.buf = self.buf[:length], self.buf[length:]
        return json.loads(data)

    def response(self) -> tuple[int, dict[str, str], Any]:
        status, headers = self.head()
        return status, headers, self.body(headers)

    def close(self) -> None:
        self.sock.close()


def request_head(agent: AgentHandle, method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{agent.config['listen']['port']}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize(
    "path", ["/api/chat", "/api/generate", "/v1/chat/completions", "/api/show", "/api/create", "/agent/drain"]
)
def test_json_nested_too_deeply_is_a_400(ready_agent: AgentHandle, path: str) -> None:
    code, body = raw_json_post(ready_agent, path, DEEP, ready_agent.key("admin"))
    assert code == 400 and "nested too deeply" in body["error"], body
    nested_object = '{"model": ' + '{"a": ' * 1000 + "1" + "}" * 1000 + "}"
    code, body = raw_json_post(ready_agent, path, nested_object, ready_agent.key("admin"))
    assert code == 400, body


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": "yes"}, "stream_options"),
        ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": [1]}, "stream_options"),
        (
            "/v1/completions",
            {"model": "tinyllama", "prompt": "x", "stream": True, "stream_options": 7},
            "stream_options",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "stream": True, "stream_options": {"include_usage": "no"}},
            "include_usage",
        ),
        ("/v1/chat/completions", {**CHAT, "stream": "true"}, "stream"),
        ("/api/chat", {**CHAT, "stream": 1}, "stream"),
        ("/api/generate", {"model": ["tinyllama"], "prompt": "x"}, "model"),
        ("/api/create", {"model": "x", "modelfile": {"FROM": "tinyllama"}}, "modelfile"),
    ],
)
def test_fields_the_agent_reads_are_type_checked(
    ready_agent: AgentHandle, path: str, body: dict[str, Any], field: str
) -> None:
    code, answer, headers = http("POST", ready_agent.url + path, body, bearer(ready_agent.key("admin")))
    assert code == 400 and field in answer["error"], answer
    assert headers["X-Request-Id"]


def test_stream_options_in_another_case_still_gets_the_usage_counted(ready_agent: AgentHandle) -> None:
    """The agent sets stream_options once, canonically; Ollama reads what the agent decided on."""
    body = {**CHAT, "stream": True, "Stream_Options": {"Include_Usage": False}}
    code, text, _ = http(
        "POST", ready_agent.url + "/v1/chat/completions", body, bearer(ready_agent.key("user"))
    )
    assert code == 200
    events = [line for line in text.splitlines() if line.startswith("data: {")]
    # the client did not ask for the usage chunk: it does not get it
    assert events and all(json.loads(e[6:]).get("usage") is None for e in events)


def test_parser_errors_are_json(ready_agent: AgentHandle) -> None:
    big = Raw(ready_agent)
    big.send(request_head(ready_agent, "GET", "/api/tags", {"X-Big": "a" * 20000}))
    status, headers, body = big.response()
    assert 400 <= status < 500 and headers["content-type"].startswith("application/json")
    assert isinstance(body["error"], str) and len(body["error"]) <= 210
    big.close()
    framing = Raw(ready_agent)
    framing.send(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
    status, headers, body = framing.response()
    assert status == 400 and headers["content-type"].startswith("application/json") and body["error"]
    framing.close()
    garbage = Raw(ready_agent)
    garbage.send(b"\x16\x03\x01 not http at all\r\n\r\n")
    status, headers, body = garbage.response()
    assert status == 400 and "error" in body
    garbage.close()


def test_bad_chunked_body_is_a_400(ready_agent: AgentHandle) -> None:
    raw = Raw(ready_agent)
    headers = {
        **bearer(ready_agent.key("user")),
        "Transfer-Encoding": "chunked",
        "Content-Type": "application/json",
    }
    raw.send(request_head(ready_agent, "POST", "/api/chat", headers) + b"zz\r\n{}\r\n0\r\n\r\n")
    status, headers, body = raw.response()
    assert status == 400 and headers["content-type"].startswith("application/json"), body
    raw.close()


def test_expect_continue_waits_for_the_key(ready_agent: AgentHandle) -> None:
    payload = json.dumps({**CHAT, "stream": False}).encode()
    plain = {
        "Content-Type": "application/json",
        "Content-Length": str(len(payload)),
        "Expect": "100-continue",
    }
    anonymous = Raw(ready_agent)
    anonymous.send(request_head(ready_agent, "POST", "/api/chat", plain))
    status, headers, body = anonymous.response()
    assert status == 401 and "credential" in body["error"]  # not "100 Continue": the body was not invited
    anonymous.close()
    user = Raw(ready_agent)
    user.send(request_head(ready_agent, "POST", "/api/chat", {**plain, **bearer(ready_agent.key("user"))}))
    assert user.head()[0] == 100
    user.send(payload)
    status, headers, body = user.response()
    assert status == 200 and body["message"]["content"] == "hi"
    user.close()
    odd = Raw(ready_agent)
    odd.send(request_head(ready_agent, "POST", "/api/chat", {**plain, "Expect": "something-else"}))
    status, headers, body = odd.response()
    assert status == 417 and headers["content-type"].startswith("application/json")
    odd.close()


@pytest.fixture
def impatient_agent(make_agent) -> AgentHandle:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent({"limits": {"body_timeout": 1}})
    agent.start().wait_ready()
    return agent


def test_a_body_sent_too_slowly_is_a_408_and_counts_against_the_key_meanwhile(
    impatient_agent: AgentHandle,
) -> None:
    agent = impatient_agent
    key, _ = agent.create_key("user", "single", "--max-concurrent", "1")
    payload = json.dumps({**CHAT, "stream": False}).encode()
    slow = Raw(agent)
    headers = {**bearer(key), "Content-Type": "application/json", "Content-Length": str(len(payload))}
    slow.send(request_head(agent, "POST", "/api/chat", headers))
    slow.send(payload[:1])
    # the slow request holds the key's one slot from the moment it was authenticated
    wait_until(
        lambda: http("POST", agent.url + "/api/chat", {**CHAT, "stream": False}, bearer(key))[0] == 429,
        5,
        "a second request of the key to be refused while the first sends its body",
    )
    started = time.monotonic()
    for byte in payload[1:5]:  # a byte now and then does not keep it alive
        time.sleep(0.3)
        try:
            slow.send(bytes([byte]))
        except OSError:
            break
    status, headers, body = slow.response()
    assert status == 408 and "not received within 1s" in body["error"] and headers["x-request-id"]
    assert time.monotonic() - started < 5
    slow.close()
    # the slot is free again
    assert http("POST", agent.url + "/api/chat", {**CHAT, "stream": False}, bearer(key))[0] == 200


def test_a_name_that_cannot_be_stored_does_not_stop_the_records(ready_agent: AgentHandle) -> None:
    """A lone surrogate in a model name (valid JSON) must not stick the usage writer: records go on."""
    key, key_id = ready_agent.create_key("user", "surrogate")
    raw_json_post(ready_agent, "/api/chat", '{"model": "tinyllama\\ud800", "stream": false}', key)
    http("POST", ready_agent.url + "/api/chat", {**CHAT, "stream": False}, bearer(key))

    def rows() -> list[tuple[str, int]]:
        import sqlite3

        with sqlite3.connect(ready_agent.dir / "agent.db") as conn:
            return conn.execute(
                "SELECT model, status FROM usage WHERE key_id = ? ORDER BY ts", (key_id,)
            ).fetchall()

    got = wait_until(lambda: len(rows()) == 2 and rows(), 5, "both records")
    assert got[0][0] == "tinyllama\ufffd" and got[1] == ("tinyllama:latest", 200)
    assert "store write failed" not in ready_agent.log()


def test_a_client_that_leaves_mid_body_is_recorded_without_a_traceback(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent()
    agent.start().wait_ready()
    key, key_id = agent.create_key("user", "leaver")
    payload = json.dumps({**CHAT, "stream": False}).encode()
    for extra in ({"Content-Length": str(len(payload))}, {"Transfer-Encoding": "chunked"}):
        raw = Raw(agent)
        raw.send(request_head(agent, "POST", "/api/chat", {**bearer(key), **extra}))
        raw.send(payload[:10] if "Content-Length" in extra else b"a\r\n" + payload[:10] + b"\r\n")
        wait_until(lambda: agent.get("/agent/idle", agent.key("operator"))[0] == 200, 5, "the agent")
        raw.close()

    def records() -> list[Any]:
        import sqlite3

        with sqlite3.connect(agent.dir / "agent.db") as conn:
            return conn.execute("SELECT status FROM usage WHERE key_id = ?", (key_id,)).fetchall()

    wait_until(lambda: len(records()) == 2, 5, "a record for each request")
    assert all(status in (400, 499) for (status,) in records())
    assert "Traceback" not in agent.log() and "unhandled error" not in agent.log()


def test_a_gzip_body_is_forwarded_decoded(ready_agent: AgentHandle) -> None:
    import gzip
    import urllib.request

    data = gzip.compress(json.dumps({**CHAT, "stream": False}).encode())
    headers = {
        **bearer(ready_agent.key("user")),
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
    }
    req = urllib.request.Request(ready_agent.url + "/api/chat", data=data, method="POST", headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200 and json.loads(resp.read())["message"]["content"] == "hi"
