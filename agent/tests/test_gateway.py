"""The fleet gateway (issue 14): three agents with different models behind one gateway, all on one
PostgreSQL store. Each model's requests reach a host that has it (the official openai and ollama clients,
streamed and not); the model lists are the fleet's; a host gone before the first byte makes way for
another; one usage record per request, written by the host that served it; the caller's model scope holds
at the gateway."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest
import yaml
from agents import AGENT, AgentHandle, deep_merge, new_agent
from support import Proc, Stream, bearer, free_port, http, wait_until
from test_shared_store import FleetDB, upgrade

pytestmark = pytest.mark.slow

BUDGET = 60
REFRESH = 0.3
WRITER_INTERVAL = 1.0  # how long an agent's record may wait before the store has it (batching.BatchWriter)
MODELS = {"i-aaa": ["tinyllama:latest"], "i-bbb": ["qwen2:0.5b"], "i-ccc": ["tinyllama:latest", "phi3:mini"]}


def make_key(agent: AgentHandle, db: FleetDB, name: str, *extra: str) -> tuple[str, str]:
    secret = "llmf_" + secrets.token_urlsafe(32)
    made = agent.cli(
        "keys", "create", "--name", name, *extra, "--from-stdin", "--stdin-json", "--json",
        stdin=db.owner_stdin(key=secret),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return secret, json.loads(made.stdout)["id"]


class Gateway:
    def __init__(
        self,
        directory: Path,
        db: FleetDB,
        hosts: dict[str, AgentHandle],
        key: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        key_file = directory / "gateway-key"
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        self.port = free_port()
        config = {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "store": db.store(),
            "host_id": "gateway-1" if directory.name == "gateway" else directory.name,
            "state_dir": str(directory / "state"),
            "auth": {"refresh_interval": 0.5},
            "gateway": {
                "key_file": str(key_file),
                "hosts": [{"id": host_id, "url": agent.url} for host_id, agent in hosts.items()],
                "refresh_interval": 0.5,
                "eject_after": 1,
                "eject_for": 60,
            },
        }
        self.config = directory / "gateway.yaml"
        self.config.write_text(yaml.safe_dump(deep_merge(config, extra or {})))
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc([AGENT, "gateway", "--config", str(self.config)], directory / "gateway.log")
        try:
            wait_until(lambda: http("GET", self.url + "/readyz")[0] == 200, 30, "the gateway's /readyz")
        except AssertionError:
            self.proc.stop()
            raise AssertionError(f"the gateway did not start:\n{self.proc.output()[-2000:]}") from None

    def status(self, key: str) -> dict[str, Any]:
        code, body, _ = http("GET", self.url + "/gateway/status", headers=bearer(key))
        assert code == 200, body
        return dict(body)


@pytest.fixture
def fleet(
    fleet_db: FleetDB, tmp_path: Path
) -> Iterator[tuple[Gateway, dict[str, AgentHandle], dict[str, str]]]:
    agents: dict[str, AgentHandle] = {}
    for host_id, models in MODELS.items():
        overrides = deep_merge(
            fleet_db.agent_overrides(host_id),
            # answers take a little while (10 ms a token), so that requests overlap
            {
                "ollama": {"models": models, "env": {"LLMFLEET_SIM_TOKEN_DELAY": "0.01"}},
                "auth": {"gateway_sources": ["127.0.0.1/32"]},
            },
        )
        agents[host_id] = new_agent(tmp_path / host_id, overrides)
    first = agents["i-aaa"]
    upgrade(first, fleet_db)
    gateway_key, _ = make_key(first, fleet_db, "gateway-1", "--role", "operator", "--gateway")
    keys = {
        "user": make_key(first, fleet_db, "alice", "--role", "user")[0],
        "operator": make_key(first, fleet_db, "ops", "--role", "operator")[0],
        "admin": make_key(first, fleet_db, "root", "--role", "admin")[0],
        "tiny": make_key(first, fleet_db, "tiny-only", "--role", "user", "--models", "tinyllama*")[0],
        "webui": make_key(first, fleet_db, "open-webui", "--role", "user", "--frontend")[0],
    }
    gateway: Gateway | None = None
    try:  # whatever fails on the way, every process started is stopped
        for agent in agents.values():
            agent.start()
        for agent in agents.values():
            agent.wait_ready(60)
        # a budget the gateway holds (the agents have none: what stops the person is the gateway)
        budgets = {
            "budgets": {"users": {"kim@example.com": {"day": BUDGET}}, "refresh_interval": REFRESH},
            # a non-streamed answer longer than this is a 504 (the next chunk waited for that long)
            "proxy": {"read_timeout": 1.5},
        }
        gateway = Gateway(tmp_path / "gateway", fleet_db, agents, gateway_key, budgets)
        wait_until(
            lambda: all(h["ready"] for h in gateway.status(keys["operator"])["hosts"]), 30, "every host ready"
        )
        yield gateway, agents, keys
    finally:
        if gateway is not None:
            gateway.proc.stop()
        for agent in agents.values():
            if agent.proc is not None:
                agent.proc.stop()


def served_by(db: FleetDB, request_id: str) -> list[str]:
    """The host of each usage record of the request (one, when all is well)."""
    rows = db.postgres.psql(f"SELECT host FROM usage WHERE request_id = '{request_id}'", db.database)
    return rows.splitlines()


def test_one_endpoint_for_every_model_on_every_host(
    fleet: tuple[Gateway, dict[str, AgentHandle], dict[str, str]], fleet_db: FleetDB
) -> None:
    gateway, _agents, keys = fleet
    # the fleet's models, once each
    code, tags, _ = http("GET", gateway.url + "/api/tags", headers=bearer(keys["user"]))
    assert code == 200 and [m["name"] for m in tags["models"]] == [
        "phi3:mini",
        "qwen2:0.5b",
        "tinyllama:latest",
    ]
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=keys["user"])
    assert sorted(m.id for m in client.models.list()) == ["phi3:mini", "qwen2:0.5b", "tinyllama:latest"]
    # a limited key sees its own
    code, tags, _ = http("GET", gateway.url + "/api/tags", headers=bearer(keys["tiny"]))
    assert [m["name"] for m in tags["models"]] == ["tinyllama:latest"]

    # each model reaches a host that has it, through both official clients, streamed and not
    native = ollama.Client(host=gateway.url, headers={"Authorization": f"Bearer {keys['user']}"})
    for model, hosts in (
        ("qwen2:0.5b", {"i-bbb"}),
        ("phi3:mini", {"i-ccc"}),
        ("tinyllama", {"i-aaa", "i-ccc"}),
    ):
        reply = native.chat(model=model, messages=[{"role": "user", "content": "hello there"}])
        assert reply.message.content
        parts = list(native.generate(model=model, prompt="one two three", stream=True))
        assert parts[-1].done
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        request_id = raw.headers["x-request-id"]
        wait_until(lambda r=request_id: len(served_by(fleet_db, r)) == 1, 15, "the record of the request")
        (host,) = served_by(fleet_db, request_id)
        assert host in hosts, (model, host)
        chunks = list(
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
            )
        )
        assert chunks

    # the record is the caller's, written once, by the host
    rows = fleet_db.postgres.psql(
        "SELECT count(*), count(DISTINCT request_id), bool_and(host LIKE 'i-%')::text FROM usage"
        " WHERE route NOT IN ('/api/tags', '/v1/models')",
        fleet_db.database,
    )
    total, distinct, all_hosts = rows.split("|")
    assert total == distinct and all_hosts == "true", rows

    # a model no host has: 404 naming it; the caller's scope holds at the gateway
    code, body, _ = http(
        "POST", gateway.url + "/api/chat", {"model": "llama9", "messages": []}, bearer(keys["user"])
    )
    assert code == 404 and "llama9" in body["error"]
    chat = {"model": "qwen2:0.5b", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    code, body, _ = http("POST", gateway.url + "/api/chat", chat, bearer(keys["tiny"]))
    assert code == 403 and "may not use model" in body["error"]
    # the gateway's status names every host, its models and state
    status = gateway.status(keys["operator"])
    assert {h["id"]: h["models"] for h in status["hosts"]} == {
        host: sorted(models) for host, models in MODELS.items()
    }
    assert http("GET", gateway.url + "/gateway/status", headers=bearer(keys["user"]))[0] == 403

    # model management is done on the hosts: refused at the gateway, naming where to do it, touching none
    for method, path, body in (
        ("POST", "/api/pull", {"model": "tinyllama"}),
        ("DELETE", "/api/delete", {"model": "tinyllama"}),
        ("POST", "/api/copy", {"source": "tinyllama", "destination": "mine"}),
    ):
        code, answer, _ = http(method, gateway.url + path, body, bearer(keys["admin"]))
        assert code == 501 and "agent_models" in answer["error"] and path in answer["error"], answer
        assert http(method, gateway.url + path, body, bearer(keys["user"]))[0] == 403
        assert http(method, gateway.url + path, body)[0] == 401
    # a blob upload: refused before its body is read, and its connection ends rather than read it (a
    # client that keeps connections alive: urllib asks every answer to close)
    conn = HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.request("POST", "/api/blobs/sha256:" + "0" * 64, b"x" * 4096, bearer(keys["admin"]))
        answer = conn.getresponse()
        assert answer.status == 501 and b"agent_models" in answer.read()
        assert answer.getheader("Connection") == "close"
    finally:
        conn.close()
    assert {h["id"]: h["models"] for h in gateway.status(keys["operator"])["hosts"]} == {
        host: sorted(models) for host, models in MODELS.items()
    }


def test_a_host_gone_before_the_first_byte_makes_way_for_another(
    fleet: tuple[Gateway, dict[str, AgentHandle], dict[str, str]], fleet_db: FleetDB
) -> None:
    gateway, agents, keys = fleet
    gone = agents["i-aaa"]
    assert gone.proc is not None
    gone.proc.stop()  # tinyllama is on i-aaa and i-ccc; the gateway has not noticed yet
    chat = {"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    for _ in range(6):
        code, body, headers = http("POST", gateway.url + "/api/chat", chat, bearer(keys["user"]))
        assert code == 200, body
        request_id = headers["X-Request-Id"]
        wait_until(lambda r=request_id: len(served_by(fleet_db, r)) == 1, 15, "the record of the request")
        assert served_by(fleet_db, request_id) == ["i-ccc"]
    wait_until(
        lambda: not {h["id"]: h for h in gateway.status(keys["operator"])["hosts"]}["i-aaa"]["ready"],
        10,
        "the gateway to see i-aaa gone",
    )
    # the model only i-aaa's peer has left still works; a model of a host that is gone gets 503 or 404
    assert (
        http("POST", gateway.url + "/api/chat", {**chat, "model": "phi3:mini"}, bearer(keys["user"]))[0]
        == 200
    )


def test_a_budget_holds_through_the_gateway(
    fleet: tuple[Gateway, dict[str, AgentHandle], dict[str, str]], fleet_db: FleetDB
) -> None:
    """The hosts record what they serve; the gateway reads it from the store and stops the person within
    one writer interval plus one refresh interval of the budget being spent (docs/budgets.md)."""
    gateway, _agents, keys = fleet
    headers = {**bearer(keys["webui"]), "X-OpenWebUI-User-Email": "kim@example.com"}
    chat = {"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    served, crossed_at, late = 0, None, []
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, f"no 429 within 60 s; {served} tokens served"
        started = time.monotonic()
        code, body, _ = http("POST", gateway.url + "/api/chat", chat, headers)
        if code == 429:
            assert f"daily budget of {BUDGET} tokens" in body["error"], body
            break
        assert code == 200, body
        if crossed_at is not None:
            late.append(started - crossed_at)
        served += body["prompt_eval_count"] + body["eval_count"]
        if crossed_at is None and served >= BUDGET:
            crossed_at = time.monotonic()
    assert crossed_at is not None and served >= BUDGET
    assert all(after <= WRITER_INTERVAL + REFRESH + 1.0 for after in late), late
    # the person's records are on the hosts, under the frontend's key, naming the person
    rows = fleet_db.postgres.psql(
        "SELECT count(*), bool_and(host LIKE 'i-%')::text FROM usage WHERE user_name = 'kim@example.com'"
        " AND status = 200",
        fleet_db.database,
    )
    assert rows.split("|")[1] == "true", rows


def test_two_gateways_serve_the_same_fleet_alike(
    fleet: tuple[Gateway, dict[str, AgentHandle], dict[str, str]], fleet_db: FleetDB, tmp_path: Path
) -> None:
    """Gateways share nothing but the database: a second one sees the same hosts and models, and requests
    through either are served and recorded once."""
    first, agents, keys = fleet
    gateway_key = (first.config.parent / "gateway-key").read_text().strip()
    second = Gateway(tmp_path / "gateway-2", fleet_db, agents, gateway_key)
    try:
        wait_until(lambda: all(h["ready"] for h in second.status(keys["operator"])["hosts"]), 30, "ready")
        for gateway in (first, second):
            code, tags, _ = http("GET", gateway.url + "/api/tags", headers=bearer(keys["user"]))
            assert [m["name"] for m in tags["models"]] == ["phi3:mini", "qwen2:0.5b", "tinyllama:latest"]
        chat = {"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}], "stream": False}
        ids = []
        for index in range(10):
            gateway = (first, second)[index % 2]
            code, body, headers = http("POST", gateway.url + "/api/chat", chat, bearer(keys["user"]))
            assert code == 200, body
            ids.append(headers["X-Request-Id"])
        for request_id in ids:
            wait_until(lambda r=request_id: len(served_by(fleet_db, r)) == 1, 15, "one record per request")
    finally:
        second.proc.stop()


LONG = {"role": "user", "content": " ".join(["word"] * 300)}  # a 300-token answer: 3 s


def test_requests_spread_over_the_hosts_and_a_slow_answer_ejects_none(
    fleet: tuple[Gateway, dict[str, AgentHandle], dict[str, str]], fleet_db: FleetDB
) -> None:
    gateway, _agents, keys = fleet
    body = {"model": "tinyllama", "messages": [LONG], "stream": True}
    streams = [Stream(gateway.url, "/api/chat", body, keys["user"]) for _ in range(6)]
    try:
        assert all(s.status == 200 for s in streams)
        routed = {h["id"]: h["routed"] for h in gateway.status(keys["operator"])["hosts"]}
        # tinyllama is on i-aaa and i-ccc: fewest in flight first, so they share the six
        assert routed["i-aaa"] == 3 and routed["i-ccc"] == 3 and routed["i-bbb"] == 0, routed
    finally:
        for stream in streams:
            stream.close()
    # a non-streamed answer slower than proxy.read_timeout: 504 for the caller, no fault of the host's
    code, answer, _ = http("POST", gateway.url + "/api/chat", {**body, "stream": False}, bearer(keys["user"]))
    assert code == 504, answer
    hosts = {h["id"]: h for h in gateway.status(keys["operator"])["hosts"]}
    assert hosts["i-aaa"]["ejected_for"] is None and hosts["i-ccc"]["ejected_for"] is None, hosts


def test_when_no_host_takes_it_the_gateway_records_the_request(
    fleet: tuple[Gateway, dict[str, AgentHandle], dict[str, str]], fleet_db: FleetDB
) -> None:
    gateway, agents, keys = fleet
    for host in ("i-aaa", "i-ccc"):
        proc = agents[host].proc
        assert proc is not None
        proc.stop()
    chat = {"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    code, body, headers = http("POST", gateway.url + "/api/chat", chat, bearer(keys["user"]))
    assert code == 503 and "127.0.0.1" not in body["error"], body  # the hosts' addresses stay in the logs
    request_id = headers["X-Request-Id"]
    wait_until(lambda: served_by(fleet_db, request_id) == ["gateway-1"], 15, "the gateway's record of it")
