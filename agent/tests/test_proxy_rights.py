"""The rights matrix: no key, user, operator, admin and a model-limited key, on every route."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from conftest import AgentHandle
from support import bearer, http

BLOB = b"llmfleet rights test blob"
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
CHAT = {"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}], "stream": False}

# (method, path, body, role needed, status the allowed key gets); order matters for the admin routes
ROUTES: list[tuple[str, str, Any, str, int]] = [
    ("POST", "/api/generate", {"model": "tinyllama", "prompt": "hi", "stream": False}, "user", 200),
    ("POST", "/api/chat", CHAT, "user", 200),
    ("POST", "/api/embed", {"model": "tinyllama", "input": "hi"}, "user", 200),
    ("POST", "/api/embeddings", {"model": "tinyllama", "prompt": "hi"}, "user", 200),
    ("POST", "/api/show", {"model": "tinyllama"}, "user", 200),
    ("GET", "/api/tags", None, "user", 200),
    ("GET", "/api/ps", None, "user", 200),
    ("GET", "/api/version", None, "user", 200),
    ("POST", "/v1/chat/completions", {"model": "tinyllama", "messages": CHAT["messages"]}, "user", 200),
    ("POST", "/v1/completions", {"model": "tinyllama", "prompt": "hi"}, "user", 200),
    ("POST", "/v1/embeddings", {"model": "tinyllama", "input": "hi"}, "user", 200),
    ("GET", "/v1/models", None, "user", 200),
    ("GET", "/v1/models/tinyllama:latest", None, "user", 200),
    ("GET", "/metrics", None, "operator", 200),
    ("GET", "/agent/status", None, "operator", 200),
    ("POST", "/api/pull", {"model": "tinyllama", "stream": False}, "admin", 200),
    ("POST", "/api/push", {"model": "tinyllama", "stream": False}, "admin", 200),
    ("POST", "/api/create", {"model": "rights-made", "from": "tinyllama", "stream": False}, "admin", 200),
    ("POST", "/api/copy", {"source": "tinyllama", "destination": "rights-copy"}, "admin", 200),
    ("DELETE", "/api/delete", {"model": "rights-copy"}, "admin", 200),
    ("HEAD", f"/api/blobs/{DIGEST}", None, "admin", 404),
    ("POST", f"/api/blobs/{DIGEST}", BLOB, "admin", 201),
]
RANK = {"user": 0, "operator": 1, "admin": 2}


def call(agent: AgentHandle, method: str, path: str, body: Any, key: str | None) -> tuple[int, Any]:
    if isinstance(body, bytes):
        req = urllib.request.Request(
            agent.url + path, data=body, method=method, headers=bearer(key) if key else {}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")
    code, answer, _ = http(method, agent.url + path, body, headers=bearer(key) if key else None)
    return code, answer


@pytest.mark.parametrize("role", ["none", "user", "operator", "admin"])
def test_role_matrix(ready_agent: AgentHandle, role: str) -> None:
    key = None if role == "none" else ready_agent.key(role)
    for method, path, body, needed, ok in ROUTES:
        code, answer = call(ready_agent, method, path, body, key)
        expected = 401 if role == "none" else (ok if RANK[role] >= RANK[needed] else 403)
        assert code == expected, (role, method, path, answer)
        if expected in (401, 403) and method != "HEAD":
            assert "error" in answer


def test_model_limited_key(ready_agent: AgentHandle) -> None:
    key, key_id = ready_agent.create_key("user", "tiny-only", "--models", "tinyllama*")
    ready_agent.post("/api/pull", {"model": "other-model", "stream": False}, ready_agent.key("admin"))
    for method, path, body, needed, ok in ROUTES:
        if needed != "user":
            continue
        assert call(ready_agent, method, path, body, key)[0] == ok, path
        if isinstance(body, dict) and "model" in body:
            code, answer = call(ready_agent, method, path, {**body, "model": "other-model"}, key)
            assert code == 403, path
            assert "other-model" in answer["error"] and key_id in answer["error"]
    code, answer = call(ready_agent, "GET", "/v1/models/other-model:latest", None, key)
    assert code == 403 and "other-model" in answer["error"]
    # lists show only the key's models; an unlimited key sees them all
    tags = call(ready_agent, "GET", "/api/tags", None, key)[1]
    assert [m["name"] for m in tags["models"]] and all(
        m["name"].startswith("tinyllama") for m in tags["models"]
    )
    models = call(ready_agent, "GET", "/v1/models", None, key)[1]
    assert [m["id"] for m in models["data"]] == ["tinyllama:latest"]
    everything = call(ready_agent, "GET", "/api/tags", None, ready_agent.key("user"))[1]
    assert "other-model:latest" in [m["name"] for m in everything["models"]]
