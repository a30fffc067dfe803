"""GET /openapi.json: the document the agent serves is docs/openapi.json, and `llmfleet-agent openapi`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import schemathesis
from conftest import AGENT, AgentHandle

from llmfleet_agent.proxy.routes import ROUTES

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
REGENERATE = "llmfleet-agent openapi > docs/openapi.json"


def test_docs_hold_the_served_document(ready_agent: AgentHandle) -> None:
    code, served, headers = ready_agent.get("/openapi.json", ready_agent.key("operator"))
    assert code == 200 and headers["Content-Type"].startswith("application/json")
    assert served == json.loads(DOCUMENT.read_text()), f"docs/openapi.json is stale: run `{REGENERATE}`"
    printed = subprocess.run([AGENT, "openapi"], capture_output=True, text=True, timeout=30, check=True)
    assert printed.stdout == DOCUMENT.read_text(), f"docs/openapi.json is stale: run `{REGENERATE}`"
    schemathesis.openapi.from_dict(served).validate()


def test_the_document_needs_an_operator(ready_agent: AgentHandle) -> None:
    assert ready_agent.get("/openapi.json")[0] == 401
    code, body, _ = ready_agent.get("/openapi.json", ready_agent.key("user"))
    assert code == 403 and "needs operator" in body["error"]


def test_every_route_and_role_is_described() -> None:
    paths = json.loads(DOCUMENT.read_text())["paths"]
    operations = {(method.upper(), path): op for path, ops in paths.items() for method, op in ops.items()}
    for spec in ROUTES:
        assert operations[(spec.method, spec.path)]["x-llmfleet-role"] == spec.role.value
    assert operations[("GET", "/healthz")]["security"] == []
    assert operations[("GET", "/openapi.json")]["x-llmfleet-role"] == "operator"
    assert ("HEAD", "/healthz") not in operations  # aiohttp's own HEAD beside a GET
    chat = operations[("POST", "/v1/chat/completions")]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["model"] and body["properties"]["stream_options"]["type"] == "object"
    assert body["additionalProperties"] is True
