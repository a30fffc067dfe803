"""Usage records (exact, and kept across a stop) and Prometheus metrics (moving with requests)."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from typing import Any

from conftest import AgentHandle
from prometheus_client.parser import text_string_to_metric_families
from support import Stream, bearer, http, wait_until

from llmfleet_agent.activity import Activity
from llmfleet_agent.metrics import Metrics

MSG = [{"role": "user", "content": "count these five words"}]
# (path, body, streamed): each gives known counts from Ollama
REQUESTS: list[tuple[str, dict[str, Any], bool]] = [
    ("/api/chat", {"model": "tinyllama", "messages": MSG, "stream": False}, False),
    ("/api/chat", {"model": "tinyllama", "messages": MSG}, True),
    ("/api/generate", {"model": "tinyllama", "prompt": "one two three", "stream": False}, False),
    (
        "/api/generate",
        {"model": "tinyllama", "prompt": "one two three four", "options": {"num_predict": 2}},
        True,
    ),
    ("/api/embed", {"model": "tinyllama", "input": ["alpha beta", "gamma"]}, False),
    ("/v1/chat/completions", {"model": "tinyllama", "messages": MSG}, False),
    ("/v1/chat/completions", {"model": "tinyllama", "messages": MSG, "stream": True}, True),
    ("/v1/completions", {"model": "tinyllama", "prompt": "six seven", "stream": True}, True),
    ("/v1/embeddings", {"model": "tinyllama", "input": "a b c d"}, False),
]


def expected_counts(direct: str, path: str, body: dict[str, Any], streamed: bool) -> tuple[Any, Any]:
    """What Ollama itself reports for this request (asked directly, with usage for OpenAI streams)."""
    if path.startswith("/v1/"):
        answer = http("POST", direct + path, {**body, "stream": False})[1]
        usage = answer["usage"]
        return usage["prompt_tokens"], usage.get("completion_tokens")
    if streamed:
        lines = list(Stream(direct, path, body).lines())
        final = json.loads(lines[-1])
    else:
        final = http("POST", direct + path, body)[1]
    return final.get("prompt_eval_count"), final.get("eval_count")


def send(agent: AgentHandle, path: str, body: dict[str, Any], streamed: bool, key: str) -> None:
    if streamed:
        lines = list(Stream(agent.url, path, body, key).lines())
        assert lines and b"error" not in lines[-1]
    else:
        code, answer, _ = http("POST", agent.url + path, body, bearer(key))
        assert code == 200, answer


def test_one_exact_record_per_request_even_when_stopped_right_after(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent()
    agent.start().wait_ready()
    direct = f"http://127.0.0.1:{agent.config['ollama']['port']}"
    key, key_id = agent.create_key("user", "counted")
    expected = [expected_counts(direct, *r) for r in REQUESTS]
    for path, body, streamed in REQUESTS:
        send(agent, path, body, streamed, key)
    assert agent.proc is not None
    agent.proc.signal(signal.SIGTERM)  # at once after the last answer: nothing may be lost
    assert agent.proc.wait(timeout=15) == 0
    with sqlite3.connect(agent.dir / "agent.db") as conn:
        rows = conn.execute(
            "SELECT route, status, stream, prompt_tokens, completion_tokens, key_id, model, duration_ms,"
            " ttfb_ms FROM usage ORDER BY ts"
        ).fetchall()
    assert len(rows) == len(REQUESTS)
    for (path, _, streamed), want, row in zip(REQUESTS, expected, rows, strict=True):
        route, status, stream, prompt, completion, rkey, model, duration, ttfb = row
        assert (route, status, bool(stream), rkey, model) == (path, 200, streamed, key_id, "tinyllama:latest")
        assert (prompt, completion) == want, path
        assert duration > 0 and ttfb is not None and ttfb <= duration
    assert expected[0][0] == 4 and expected[3] == (4, 2)  # the counts are the simulator's real ones


def test_usage_command_summarises(ready_agent: AgentHandle) -> None:
    key, key_id = ready_agent.create_key("user", "summarised")
    for _ in range(3):
        send(ready_agent, *REQUESTS[0], key=key)
    http(
        "POST",
        ready_agent.url + "/api/chat",
        {"model": "missing-model", "messages": MSG, "stream": False},
        bearer(key),
    )

    def mine() -> dict[str, Any] | None:
        res = ready_agent.cli("usage", "--by", "key", "--json", "--since", "1h")
        rows = [r for r in json.loads(res.stdout)["rows"] if r["group"].startswith(key_id)]
        return rows[0] if rows and rows[0]["requests"] == 4 else None

    row = wait_until(mine, 10, "the records to be written")
    assert row["group"] == f"{key_id} (summarised)"
    assert (row["errors"], row["prompt_tokens"], row["completion_tokens"]) == (1, 12, 12)
    table = ready_agent.cli("usage", "--by", "model").stdout
    assert "tinyllama:latest" in table and "PROMPT TOKENS" in table
    bad = ready_agent.cli("usage", "--since", "whenever")
    assert bad.returncode == 1 and "--since" in bad.stderr
    # a duration may say never (no limit), which is no window
    never = ready_agent.cli("usage", "--since", "never")
    assert never.returncode == 1 and "--since: 'never' has no start" in never.stderr


def scrape(agent: AgentHandle) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, text, headers = agent.get("/metrics", agent.key("operator"))
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_move_with_requests(ready_agent: AgentHandle) -> None:
    before = scrape(ready_agent)
    key = ready_agent.key("user")
    for _ in range(3):
        send(ready_agent, *REQUESTS[0], key=key)
    send(ready_agent, *REQUESTS[6], key=key)
    http(
        "POST", ready_agent.url + "/api/chat", {"model": "tinyllama"}, bearer(key)
    )  # 400: no messages? Ollama decides
    after = scrape(ready_agent)

    def delta(name: str, **labels: str) -> float:
        k = (name, tuple(sorted(labels.items())))
        return after.get(k, 0.0) - before.get(k, 0.0)

    chat = {"route": "/api/chat", "model": "tinyllama:latest", "status": "200"}
    assert delta("llmfleet_requests_total", **chat) >= 3
    assert (
        delta("llmfleet_requests_total", route="/v1/chat/completions", model="tinyllama:latest", status="200")
        == 1
    )
    assert delta("llmfleet_prompt_tokens_total", model="tinyllama:latest") >= 3 * 4 + 4
    assert delta("llmfleet_completion_tokens_total", model="tinyllama:latest") >= 3 * 4 + 4
    assert delta("llmfleet_request_duration_seconds_count", route="/api/chat") >= 3
    assert delta("llmfleet_time_to_first_byte_seconds_count", route="/v1/chat/completions") == 1
    assert after[("llmfleet_inflight_requests", ())] == 0
    assert after[("llmfleet_ollama_state", (("state", "RUNNING"),))] == 1
    assert after[("llmfleet_draining", ())] == 0
    assert ("llmfleet_idle_seconds", ()) in after and ("llmfleet_ollama_restarts_total", ()) in after


def test_admin_actions_are_audited(ready_agent: AgentHandle) -> None:
    admin, admin_id = ready_agent.create_key("admin", "audited-admin")
    operator = ready_agent.key("operator")
    assert (
        http("POST", ready_agent.url + "/api/pull", {"model": "audit-me", "stream": False}, bearer(admin))[0]
        == 200
    )
    assert http("DELETE", ready_agent.url + "/api/delete", {"model": "audit-me"}, bearer(admin))[0] == 200
    assert ready_agent.post("/agent/drain", {"if_idle_for": 3600}, operator)[0] == 409
    assert ready_agent.post("/agent/resume", None, operator)[0] == 200

    def audit() -> list[tuple[str, str, dict[str, Any]]]:
        with sqlite3.connect(ready_agent.dir / "agent.db") as conn:
            rows = conn.execute("SELECT event, key_id, detail FROM audit").fetchall()
        return [(e, k, json.loads(d)) for e, k, d in rows]

    def seen() -> bool:
        # records are written in batches: the drain and resume may land a flush after the pull and delete
        rows = audit()
        events = {(e, k, d.get("model")) for e, k, d in rows}
        return (
            {
                ("model_pull", admin_id, "audit-me:latest"),
                ("model_delete", admin_id, "audit-me:latest"),
            }
            <= events
            and any(e == "drain" and d["drained"] is False for e, _, d in rows)
            and any(e == "resume" for e, _, _ in rows)
        )

    wait_until(seen, 10, "the model pull and delete, the refused drain and the resume to be audited")


def model_labels(agent: AgentHandle) -> set[str]:
    text = agent.get("/metrics", agent.key("operator"))[1]
    return {
        sample.labels["model"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "model" in sample.labels
    }


def test_metric_labels_and_recorded_names_are_bounded(make_agent) -> None:  # type: ignore[no-untyped-def]
    """Request text never becomes a label: labels name models Ollama has (else `other`), and a model name
    kept in a record is trimmed, normalised and cut."""
    agent: AgentHandle = make_agent()
    agent.start().wait_ready()
    user = bearer(agent.key("user"))
    http("POST", agent.url + "/api/chat", {"model": "tinyllama", "messages": MSG, "stream": False}, user)
    size_before = len(agent.get("/metrics", agent.key("operator"))[1])
    for pad in range(1, 41):
        body = {"model": "tinyllama" + " " * pad, "messages": MSG, "stream": False}
        http("POST", agent.url + "/api/chat", body, user)
    http("POST", agent.url + "/api/chat", {"model": "x" * 5000, "messages": MSG, "stream": False}, user)
    assert model_labels(agent) <= {"tinyllama:latest", "other", "-"}
    assert len(agent.get("/metrics", agent.key("operator"))[1]) < size_before + 2000
    wait_until(lambda: len(usage_rows(agent)) == 42, 5, "42 records")
    models = {row["model"] for row in usage_rows(agent)}
    assert "tinyllama:latest" in models
    assert all(len(m) <= 200 and m == m.strip() for m in models)


def usage_rows(agent: AgentHandle) -> list[dict[str, Any]]:
    with sqlite3.connect(agent.dir / "agent.db") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM usage ORDER BY ts")]


def test_a_scrape_sees_every_request_counted_before_it() -> None:
    """Requests are added up later, with others (later.py); a scrape adds up what is pending first."""
    metrics = Metrics(Activity(), lambda: None, lambda: None)

    def requests_total(text: bytes) -> float:
        families = text_string_to_metric_families(text.decode())
        samples = [s for f in families for s in f.samples if s.name == "llmfleet_requests_total"]
        return sum(s.value for s in samples if s.labels["route"] == "/api/chat")

    async def counted() -> tuple[float, float]:
        for _ in range(3):
            metrics.count_request("/api/chat", "tinyllama:latest", 200, 0.01, 0.005, 4, 4)
        assert len(metrics._pending) == 3  # put off: the timer has not run
        return requests_total(metrics.render()), len(metrics._pending)

    assert asyncio.run(counted()) == (3, 0)
    metrics.count_request("/api/chat", "tinyllama:latest", 200, 0.01, None, None, None)  # off the loop: now
    assert metrics._pending == [] and requests_total(metrics.render()) == 4
