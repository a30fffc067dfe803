"""The agent's API fuzzed from the document it serves (schemathesis), against a running agent with the
simulator as its Ollama: no answer is a server error, every error is a JSON object that says why, and
every route that declares a key refuses a request without one.

Bounded and deterministic: each operation gets MAX_EXAMPLES valid requests (half of them naming a model
Ollama has, with the fields Ollama needs, so that they reach it) and, where it takes a body or
parameters, MAX_EXAMPLES invalid ones; derandomized, no deadline, no example database. Then a few hostile
bodies and path segments no schema describes (deep nesting, huge numbers, bad UTF-8, a newline, `..`) go
to every route that takes them. About 30 s on two cores.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from conftest import AgentHandle
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import ignored_auth
from support import bearer

from llmfleet_agent.proxy.routes import ROUTES
from llmfleet_agent.roles import Role

MAX_EXAMPLES = 25
DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
PATHS: dict[str, dict[str, Any]] = json.loads(DOCUMENT.read_text())["paths"]
MODEL = "tinyllama:latest"  # the agent's configured model (agents.base_config)
# what the admin routes pull, push, create, copy and delete: seeded as a copy of MODEL, so that the
# other routes keep theirs (a delete that takes removes only this one)
VICTIM = "fuzz-victim:latest"
SPECS = {f"{spec.method} {spec.path}": spec for spec in ROUTES}
# the fields Ollama needs besides the model, for the cases meant to reach it
_TEXT = {"prompt": "one two", "input": "one two", "messages": [{"role": "user", "content": "one two"}]}
NEEDS = {
    "/api/generate": ("prompt",),
    "/api/chat": ("messages",),
    "/api/embed": ("input",),
    "/api/embeddings": ("prompt",),
    "/v1/chat/completions": ("messages",),
    "/v1/completions": ("prompt",),
    "/v1/embeddings": ("input",),
}

SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
)


def _cases() -> list[Any]:
    """(operation, mode) for every operation in docs/openapi.json (test_openapi: the served document)."""
    cases = []
    for path, operations in PATHS.items():
        for method, operation in operations.items():
            label = f"{method.upper()} {path}"
            cases.append(pytest.param(label, GenerationMode.POSITIVE, id=f"{label} valid"))
            if "requestBody" in operation or "parameters" in operation:  # something to get wrong
                cases.append(pytest.param(label, GenerationMode.NEGATIVE, id=f"{label} invalid"))
    return cases


def answer_problem(method: str, path: str, status: int, content_type: str, text: str) -> str | None:
    """What is wrong with an answer: a server error, or an error that is not a JSON object naming it.

    The agent's own 5xx (502 Ollama failed, 503 Ollama not running or the host draining, 504 Ollama
    silent) all say that Ollama is away or the host is leaving service; here Ollama stays up (checked at
    the end) and every drain is resumed at once, so each of them would be a request that broke something.
    Only /readyz may answer 503: not ready is its answer, not an error (a case may delete a model).
    """
    if status >= 500 and not (status == 503 and path == "/readyz"):
        return f"server error {status}"
    if status < 400 or method == "HEAD":
        return None
    if not content_type.startswith("application/json"):
        return f"{status} with Content-Type {content_type!r}"
    try:
        body = json.loads(text)
    except ValueError:
        return f"{status} with a body that is not JSON"
    if not isinstance(body, dict) or ("error" not in body and path != "/readyz"):  # /readyz: its figures
        return f"{status} without an error object"
    return None


@schemathesis.check
def errors_are_json(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """No server error; an error's body is a JSON object with an `error`, as its Content-Type says."""
    content_type = response.headers.get("content-type", [""])[0]
    problem = answer_problem(case.method, case.path, response.status_code, content_type, response.text)
    assert problem is None, problem


def _reaching_ollama(case: schemathesis.Case, real: bool) -> schemathesis.Case:
    """When `real`: the case names a model Ollama has (its model fields, its path's model) and carries the
    fields Ollama needs, so that it gets past "model not found" to a generation, a list or a transfer."""
    spec = SPECS.get(f"{case.method} {case.path}")
    if not real or spec is None:
        return case
    model = VICTIM if spec.role is Role.ADMIN else MODEL
    if "model" in case.path_parameters:
        case.path_parameters = {**case.path_parameters, "model": model}
    if isinstance(case.body, dict):
        needed = {name: _TEXT[name] for name in NEEDS.get(spec.path, ())}
        models = {field: model for field in spec.model_fields if field in case.body}
        case.body = {**case.body, **needed, **models}
    return case


@pytest.fixture(scope="module")
def agent_api(ready_agent: AgentHandle) -> schemathesis.BaseSchema:
    admin = ready_agent.key("admin")
    code, body, _ = ready_agent.post("/api/copy", {"source": MODEL, "destination": VICTIM}, admin)
    assert code == 200, body
    url = f"{ready_agent.url}/openapi.json"
    api = schemathesis.openapi.from_url(url, headers=bearer(admin), config=schemathesis.Config())
    api.config.update(base_url=ready_agent.url)
    return api


@pytest.mark.slow
@pytest.mark.parametrize(("label", "mode"), _cases())
def test_fuzz(
    agent_api: schemathesis.BaseSchema, ready_agent: AgentHandle, label: str, mode: GenerationMode
) -> None:
    operation = agent_api.find_operation_by_label(label)
    assert operation is not None, f"{label} is in docs/openapi.json but the agent does not serve it"
    admin = ready_agent.key("admin")
    cases = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE:
        cases = st.builds(_reaching_ollama, cases, st.booleans())

    @SETTINGS
    @given(case=cases)
    def fuzz(case: schemathesis.Case) -> None:
        try:
            case.call_and_validate(headers=bearer(admin), checks=[errors_are_json, ignored_auth])
        finally:
            if case.path == "/agent/drain":  # a drain that took would refuse the next cases
                ready_agent.post("/agent/resume", key=admin)

    fuzz()


# bodies no schema describes; @MODEL@ is a model Ollama has
DEEP = b"[" * 1000 + b"]" * 1000
HOSTILE = {
    "empty": b"",
    "not utf-8": b'{"model": "\xff\xfe"}',
    "a lone surrogate": b'{"model": "\\ud800"}',
    "nested 1000 deep": DEEP,
    "nested 1000 deep inside": b'{"model": "@MODEL@", "options": ' + DEEP + b"}",
    "a number too large for a float": b'{"model": "@MODEL@", "options": {"temperature": 1e400}}',
    "an integer of 5000 digits": b'{"model": "@MODEL@", "options": {"seed": 1' + b"0" * 5000 + b"}}",
    "NaN": b'{"model": "@MODEL@", "options": {"temperature": NaN}}',
    "the model twice": b'{"model": "@MODEL@", "MODEL": "other"}',
    "stream not a boolean": b'{"model": "@MODEL@", "stream": "yes", "stream_options": "yes"}',
    "stream_options not an object": b'{"model": "@MODEL@", "stream": true, "stream_options": [1]}',
    "include_usage not a boolean": (
        b'{"model": "@MODEL@", "stream": true, "stream_options": {"include_usage": "yes"}, '
        b'"messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi"}'
    ),
}
JSON_OPERATIONS = [
    (method.upper(), path)
    for path, operations in PATHS.items()
    for method, operation in operations.items()
    if "application/json" in operation.get("requestBody", {}).get("content", {})
]
# path segments no schema describes, as sent (percent-encoded)
HOSTILE_SEGMENTS = {
    "a newline": "a%0Ab",
    "a NUL": "a%00b",
    "not utf-8": "%FF%FE",
    "an encoded slash": "a%2Fb",
    "a dot-dot": "..",
    "5000 characters": "a" * 5000,
}
PATH_OPERATIONS = [(method.upper(), path) for path, ops in PATHS.items() for method in ops if "{" in path]


def _send(url: str, method: str, body: bytes | None, key: str) -> tuple[int, str, str]:
    headers = {**bearer(key), "Content-Type": "application/json"}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, content_type, raw = response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        status, content_type, raw = err.code, err.headers["Content-Type"] or "", err.read()
    return status, content_type, raw.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_bodies(agent_api: schemathesis.BaseSchema, ready_agent: AgentHandle, name: str) -> None:
    admin = ready_agent.key("admin")
    problems = []
    for method, path in JSON_OPERATIONS:
        spec = SPECS.get(f"{method} {path}")
        model = VICTIM if spec is not None and spec.role is Role.ADMIN else MODEL
        body = HOSTILE[name].replace(b"@MODEL@", model.encode())
        try:
            status, content_type, text = _send(ready_agent.url + path, method, body, admin)
        finally:
            if path == "/agent/drain":
                ready_agent.post("/agent/resume", key=admin)
        problem = answer_problem(method, path, status, content_type, text)
        if problem:
            problems.append(f"{method} {path}: {problem}: {text[:200]}")
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("name", HOSTILE_SEGMENTS)
def test_hostile_paths(agent_api: schemathesis.BaseSchema, ready_agent: AgentHandle, name: str) -> None:
    admin = ready_agent.key("admin")
    problems = []
    for method, path in PATH_OPERATIONS:
        url = ready_agent.url + re.sub(r"{\w+}", HOSTILE_SEGMENTS[name], path)
        status, content_type, text = _send(url, method, b"x" if method == "POST" else None, admin)
        problem = answer_problem(method, path, status, content_type, text)
        if problem:
            problems.append(f"{method} {path}: {problem}: {text[:200]}")
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_ollama_and_the_agent_survived_the_fuzz(ready_agent: AgentHandle) -> None:
    """Runs after the others (file order): Ollama never restarted, the agent logged no unexpected error."""
    ollama = ready_agent.ollama()
    assert ollama["state"] == "RUNNING" and ollama["restarts"] == 0, ollama
    assert "Traceback" not in ready_agent.log()
