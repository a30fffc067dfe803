"""A key limited to model patterns reaches only those models, on every field through which Ollama resolves
a model, read the way Ollama reads a body (Go: keys match without regard to case, the last one wins).

Each case is sent to the simulator directly too: it decodes like Ollama, so the test shows which model the
real server would have used had the agent let the request through.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import AgentHandle
from support import bearer

LONG_S = "\u017f"  # the long s: Go folds it to s, so long-s+"ource" names the field source
SECRET = "secret-model"


@pytest.fixture(scope="module")
def agent(ready_agent: AgentHandle) -> Iterator[AgentHandle]:
    admin = ready_agent.key("admin")
    for name in (SECRET, "tinyllama"):
        code, body, _ = ready_agent.post("/api/pull", {"model": name, "stream": False}, admin)
        assert code == 200, body
    yield ready_agent


def ollama_url(agent: AgentHandle) -> str:
    return f"http://127.0.0.1:{agent.config['ollama']['port']}"


def send(url: str, method: str, path: str, body: Any, key: str | None = None) -> tuple[int, Any]:
    data = body if isinstance(body, str) else json.dumps(body)
    code, answer, _ = http_raw(method, url + path, data.encode(), bearer(key) if key else {})
    return code, answer


def http_raw(method: str, url: str, data: bytes, headers: dict[str, str]) -> tuple[int, Any, Any]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        url, data=data, method=method, headers={**headers, "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw, status, hdrs = resp.read(), resp.status, resp.headers
    except urllib.error.HTTPError as err:
        raw, status, hdrs = err.read(), err.code, err.headers
    text = raw.decode()
    try:
        return status, json.loads(text.splitlines()[-1] if text.strip() else "null"), hdrs
    except ValueError:
        return status, text, hdrs


def limited(agent: AgentHandle, role: str) -> tuple[str, str]:
    return agent.create_key(role, None, "--models", "tinyllama*", "mine-*")


def shown_system(agent: AgentHandle, model: str) -> str | None:
    code, body = send(ollama_url(agent), "POST", "/api/show", {"model": model})
    return body.get("system") if code == 200 else None


def test_create_from_a_model_the_key_may_not_use_is_refused(agent: AgentHandle) -> None:
    key, key_id = limited(agent, "admin")
    # `from` copies the base model (its weights, system prompt, template) into a name the key may use
    code, body = send(
        agent.url, "POST", "/api/create", {"model": "mine-a", "from": SECRET, "stream": False}, key
    )
    assert code == 403 and SECRET in body["error"] and key_id in body["error"]
    # the older Modelfile's FROM line (a server before the create rewrite reads it) is checked too
    modelfile = f"# copy it\nFROM tinyllama\nFROM {SECRET}\nSYSTEM hi\n"
    code, body = send(
        agent.url, "POST", "/api/create", {"model": "mine-b", "modelfile": modelfile, "stream": False}, key
    )
    assert code == 403 and SECRET in body["error"]
    # neither was created
    assert shown_system(agent, "mine-a") is None and shown_system(agent, "mine-b") is None
    # allowed sources work: a model of the key, a Modelfile FROM it
    ok = {"model": "mine-c", "from": "tinyllama", "system": "terse", "stream": False}
    assert send(agent.url, "POST", "/api/create", ok, key)[0] == 200
    fine = {"model": "mine-d", "modelfile": "FROM tinyllama\nSYSTEM terse", "stream": False}
    assert send(agent.url, "POST", "/api/create", fine, key)[0] == 200
    assert shown_system(agent, "mine-d") == "terse"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/chat", {"model": "tinyllama", "Model": SECRET, "messages": [], "stream": False}, "model"),
        ("/api/generate", {"model": "tinyllama", "MODEL": SECRET, "prompt": "hi", "stream": False}, "model"),
        ("/api/show", {"name": "tinyllama", "Name": SECRET}, "name"),
        (
            "/v1/chat/completions",
            {"model": "tinyllama", "mOdel": SECRET, "messages": [{"role": "user", "content": "hi"}]},
            "model",
        ),
        ("/api/embed", {"model": "tinyllama", "Model": SECRET, "input": "hi"}, "model"),
    ],
)
def test_a_field_named_twice_under_any_case_is_refused(
    agent: AgentHandle, path: str, body: dict[str, Any], field: str
) -> None:
    key, _ = limited(agent, "user")
    code, answer = send(agent.url, "POST", path, body, key)
    assert code == 400 and repr(field) in str(answer["error"]) and "once" in str(answer["error"])
    # what the agent refused: Ollama would have served the last one, the secret model
    direct_code, direct = send(ollama_url(agent), "POST", path, body)
    assert direct_code == 200, direct
    assert SECRET in json.dumps(direct)


def test_go_folding_beyond_ascii_is_read_as_ollama_reads_it(agent: AgentHandle) -> None:
    key, _ = limited(agent, "admin")
    sneaky = {"source": "tinyllama", f"{LONG_S}ource": SECRET, "destination": "mine-copy"}
    code, answer = send(agent.url, "POST", "/api/copy", sneaky, key)
    assert code == 400 and "'source'" in answer["error"]
    # alone, the folded key is the source: checked like one
    code, answer = send(
        agent.url, "POST", "/api/copy", {f"{LONG_S}ource": SECRET, "destination": "mine-x"}, key
    )
    assert code == 403 and SECRET in answer["error"]
    # the simulator, like Ollama, copies the secret model under the long-s key
    assert send(ollama_url(agent), "POST", "/api/copy", sneaky)[0] == 200
    assert shown_system(agent, "mine-copy") == shown_system(agent, SECRET)


def test_a_field_in_another_case_is_checked_as_the_field(agent: AgentHandle) -> None:
    key, key_id = limited(agent, "user")
    for path, body in (
        ("/api/chat", {"Model": SECRET, "messages": [], "stream": False}),
        ("/v1/completions", {"MODEL": SECRET, "prompt": "hi"}),
        ("/api/show", {"NAME": SECRET}),
    ):
        code, answer = send(agent.url, "POST", path, body, key)
        assert code == 403 and SECRET in str(answer["error"]) and key_id in str(answer["error"]), path
    # and allowed when it names an allowed model (the record carries it)
    code, answer = send(
        agent.url, "POST", "/api/chat", {"Model": "tinyllama", "messages": [], "stream": False}, key
    )
    assert code == 200 and answer["model"] == "tinyllama"


def test_unlimited_keys_are_not_affected(agent: AgentHandle) -> None:
    admin = agent.key("admin")
    body = {"model": "tinyllama-2", "from": SECRET, "stream": False}
    assert send(agent.url, "POST", "/api/create", body, admin)[0] == 200


def test_a_scheme_prefix_does_not_pass_for_an_allowed_name(agent: AgentHandle) -> None:
    """Ollama's name parser takes `x://` as a scheme and drops it: the rest is the model it runs."""
    key, _ = limited(agent, "user")
    sneaky = "tinyllama://registry.ollama.ai/library/" + SECRET
    for path, body in (
        ("/api/chat", {"model": sneaky, "messages": [], "stream": False}),
        ("/v1/completions", {"model": sneaky, "prompt": "hi"}),
    ):
        code, answer = send(agent.url, "POST", path, body, key)
        assert code == 400 and "invalid model name" in str(answer["error"]), (path, answer)
    # the long form of an allowed model is that model
    long_form = {"model": "registry.ollama.ai/library/tinyllama", "messages": [], "stream": False}
    assert send(agent.url, "POST", "/api/chat", long_form, key)[0] == 200


def test_a_limited_key_creates_only_from_models(agent: AgentHandle) -> None:
    """Blobs by digest may be another model's layers (registry digests are public); a remote host is a
    proxy elsewhere: neither is open to a model-limited key."""
    key, key_id = limited(agent, "admin")
    digest = "sha256:" + "0" * 64
    for field, value in (
        ("files", {"model.gguf": digest}),
        ("adapters", {"lora.gguf": digest}),
        ("draft_files", {"d.gguf": digest}),
        ("remote_host", "http://elsewhere:11434"),
    ):
        body = {"model": "mine-blob", field: value, "stream": False}
        code, answer = send(agent.url, "POST", "/api/create", body, key)
        assert code == 403 and field in answer["error"] and key_id in answer["error"], field


def test_usage_asked_under_a_name_go_does_not_fold_is_asked_again(agent: AgentHandle) -> None:
    """Go folds no dotless i to i: spelt with one, `include_usage` is no field Ollama knows."""
    key, key_id = limited(agent, "user")
    body = {
        "model": "tinyllama",
        "messages": [{"role": "user", "content": "one two three"}],
        "stream": True,
        "stream_options": {"\u0131nclude_usage": True},
    }
    code, text = send_text(agent.url, "/v1/chat/completions", body, key)
    assert code == 200
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert all(e.get("usage") is None for e in events)  # as Ollama would answer this client
    rows = usage_rows_of(agent, key_id)
    assert rows and rows[-1]["completion_tokens"] == 3


def test_a_repeated_stream_flag_is_read_as_ollama_reads_it(agent: AgentHandle) -> None:
    key, key_id = limited(agent, "user")
    raw = (
        '{"model": "tinyllama", "messages": [{"role": "user", "content": "a b"}],'
        ' "stream": true, "Stream": false, "stream": true}'
    )
    code, text = send_text(agent.url, "/v1/chat/completions", raw, key)
    assert code == 200 and text.startswith("data: ")  # Go takes the last: a stream
    assert usage_rows_of(agent, key_id)[-1]["stream"] == 1


def send_text(url: str, path: str, body: Any, key: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    req = urllib.request.Request(
        url + path, data=data, method="POST", headers={**bearer(key), "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def usage_rows_of(agent: AgentHandle, key_id: str) -> list[dict[str, Any]]:
    import sqlite3

    from support import wait_until

    def rows() -> list[dict[str, Any]]:
        with sqlite3.connect(agent.dir / "agent.db") as conn:
            conn.row_factory = sqlite3.Row
            return [
                dict(r) for r in conn.execute("SELECT * FROM usage WHERE key_id = ? ORDER BY ts", (key_id,))
            ]

    return wait_until(rows, 5, f"usage records of key {key_id}")
