"""Tests of llmfleet.aws.agent_idle_batch against real agents (tests/agent_fleet.py, one operator key).

Four agents are started once for the module: `a` and `b` (plain), `slow` (the simulator streams a token
every 50 ms, so a request can be held in flight) and `tls` (a self-signed certificate for 127.0.0.1).
Every test resumes the agents it drained. The module runs in-process (tests/module_runs.py), and once
through the `ansible` CLI.
"""

import math
from collections.abc import Iterator
from typing import Any

import pytest
from agent_fleet import Fleet, fleet, free_port, wait_until
from ansible_collections.llmfleet.aws.plugins.modules import agent_idle_batch
from module_runs import ansible_module, fail_module, run_module
from support import Stream  # agent/tests/support.py, on sys.path through agent_fleet

SLOW_SIM = {"ollama": {"env": {"LLMFLEET_SIM_TOKEN_DELAY": "0.05"}}}
MODEL = "tinyllama:latest"


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with fleet(tmp_path_factory.mktemp("agent-idle-batch")) as made:
        made.add("a")
        made.add("b")
        made.add("slow", SLOW_SIM)
        made.add("tls", tls=True)
        made.start()
        yield made


@pytest.fixture
def fleet_(agents: Fleet) -> Iterator[Fleet]:
    """The fleet, every agent resumed after the test."""
    try:
        yield agents
    finally:
        for name in agents.agents:
            code, body = agents.request(name, "POST", "/agent/resume", key=agents.operator_key)
            assert code == 200, body


def batch(agents: Fleet, entries: list[dict[str, Any]], check: bool = False, **extra: Any) -> dict[str, Any]:
    return run_module(
        agent_idle_batch.main, {"agents": entries, "operator_key": agents.operator_key, **extra}, check
    )


def entry(agents: Fleet, name: str, **extra: Any) -> dict[str, Any]:
    return {"id": name, "url": agents.agents[name].url, **extra}


def chat(agents: Fleet, name: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "stream": False}
    return agents.request(name, "POST", "/api/chat", body, key=agents.user_key)[0]


def by_id(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["id"]: a for a in result["agents"]}


def test_each_agent_gets_its_own_decision_in_one_run(fleet_: Fleet) -> None:
    wait_until(lambda: fleet_.idle("a")["idle_seconds"] >= 0.2, 10, "a idle 0.2s")
    down = f"http://127.0.0.1:{free_port()}"
    entries = [
        entry(fleet_, "a", drain_if_idle_for=0.2),
        entry(fleet_, "b", drain_if_idle_for=3600),
        entry(fleet_, "slow"),  # report only
        {"id": "down", "url": down, "drain_if_idle_for": 0},
        {"id": "bad-url", "url": "ftp://10.0.0.1", "drain_if_idle_for": 0},
    ]
    result = batch(fleet_, entries)
    got = by_id(result)

    assert [a["id"] for a in result["agents"]] == ["a", "b", "slow", "down", "bad-url"]
    assert result["changed"] is True and result["drained"] == ["a"]
    assert got["a"]["answered"] and got["a"]["drained"] and got["a"]["draining"] and got["a"]["changed"]
    assert got["b"]["answered"] and not got["b"]["drained"] and got["b"]["status"] == 409
    assert "less than 3600s" in got["b"]["reason"] and got["b"]["would_drain"] is False
    assert got["slow"]["answered"] and not got["slow"]["drained"] and "would_drain" not in got["slow"]
    assert got["slow"]["status"] == 200 and got["slow"]["inflight"] == 0
    assert got["down"]["answered"] is False and got["down"]["agent_unreachable"] is True
    assert (
        got["down"]["msg"]
        == f"cannot reach the llmfleet agent at {down} (GET /agent/idle): Connection refused"
    )
    assert got["bad-url"]["answered"] is False and got["bad-url"]["agent_unreachable"] is False
    assert "bad-url" in got["bad-url"]["msg"] and "ftp://10.0.0.1" in got["bad-url"]["msg"]
    # what the agents did: a refuses inference now, b still serves
    assert chat(fleet_, "a") == 503 and chat(fleet_, "b") == 200


def test_check_mode_drains_nothing(fleet_: Fleet) -> None:
    wait_until(lambda: fleet_.idle("a")["idle_seconds"] >= 0.2, 10, "a idle 0.2s")
    result = batch(fleet_, [entry(fleet_, "a", drain_if_idle_for=0.2)], check=True)

    (a,) = result["agents"]
    assert (a["would_drain"], a["drained"], a["changed"]) == (True, False, True)
    assert result["drained"] == [] and result["changed"] is True
    assert fleet_.idle("a")["draining"] is False and chat(fleet_, "a") == 200


def test_a_request_in_flight_keeps_its_agent_and_completes(fleet_: Fleet) -> None:
    words = " ".join(f"word{i}" for i in range(60))  # 3 s of tokens at 50 ms each
    body = {"model": MODEL, "messages": [{"role": "user", "content": words}]}
    stream = Stream(fleet_.agents["slow"].url, "/api/chat", body, key=fleet_.user_key)
    try:
        assert stream.status == 200
        lines = stream.lines()
        next(lines)  # in flight
        result = batch(
            fleet_, [entry(fleet_, "slow", drain_if_idle_for=0), entry(fleet_, "b", drain_if_idle_for=0)]
        )
        rest = list(lines)
    finally:
        stream.close()

    got = by_id(result)
    assert got["slow"]["drained"] is False and got["slow"]["inflight"] == 1
    assert got["slow"]["reason"] == "not drained: 1 request(s) in flight"
    assert got["b"]["drained"] is True and result["drained"] == ["b"]
    assert rest and b'"done":true' in rest[-1].replace(b" ", b"")


def test_resume_takes_the_draining_ones_out_and_leaves_the_others(fleet_: Fleet) -> None:
    code, _body = fleet_.request("a", "POST", "/agent/drain", {}, key=fleet_.operator_key)
    assert code == 200

    would = batch(fleet_, [entry(fleet_, "a"), entry(fleet_, "b")], check=True, resume=True)
    assert [(a["changed"], a["resumed"]) for a in would["agents"]] == [(True, False), (False, False)]
    assert fleet_.idle("a")["draining"] is True

    result = batch(fleet_, [entry(fleet_, "a"), entry(fleet_, "b")], resume=True)
    got = by_id(result)
    assert (got["a"]["resumed"], got["a"]["draining"], got["a"]["changed"]) == (True, False, True)
    assert (got["b"]["resumed"], got["b"]["changed"]) == (False, False)
    assert result["changed"] is True and result["drained"] == []
    assert chat(fleet_, "a") == 200


def test_tls_each_agent_with_its_own_certificate(fleet_: Fleet) -> None:
    cert = str(fleet_.certificates["tls"])
    result = batch(fleet_, [entry(fleet_, "tls", ca_path=cert), {**entry(fleet_, "tls"), "id": "tls-no-ca"}])
    got = by_id(result)

    assert got["tls"]["answered"] is True and got["tls"]["status"] == 200
    assert got["tls-no-ca"]["answered"] is False and got["tls-no-ca"]["agent_unreachable"] is True
    assert "TLS certificate verification failed" in got["tls-no-ca"]["msg"]


@pytest.mark.parametrize("which", ["unknown", "user"])
def test_a_refused_key_is_that_agents_answer_and_never_shown(agents: Fleet, which: str) -> None:
    key = "llmf_not-a-key-of-this-agent-0123456789" if which == "unknown" else agents.user_key
    result = run_module(
        agent_idle_batch.main, {"agents": [entry(agents, "a", drain_if_idle_for=0)], "operator_key": key}
    )

    (a,) = result["agents"]
    assert (a["answered"], a["agent_unreachable"], a["status"]) == (
        False,
        False,
        401 if which == "unknown" else 403,
    )
    assert "refused the operator key" in a["msg"] and key not in a["msg"]
    assert result["changed"] is False and result["drained"] == []
    assert agents.idle("a")["draining"] is False


def test_concurrency_one_gives_the_same_results_in_order(agents: Fleet) -> None:
    names = ["a", "b", "slow"]
    result = batch(agents, [entry(agents, n, drain_if_idle_for=3600) for n in names], concurrency=1)
    assert [a["id"] for a in result["agents"]] == names
    assert all(a["answered"] and a["status"] == 409 for a in result["agents"])


def test_no_agents_is_nothing_to_do(agents: Fleet) -> None:
    assert batch(agents, []) == {"changed": False, "agents": [], "drained": []}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"operator_key": ""}, "operator_key is empty"),
        ({"timeout": 0}, "timeout must be more than 0 seconds; got 0.0"),
        ({"concurrency": 0}, "concurrency must be at least 1; got 0"),
        ({"ca_path": "/nonexistent/ca.pem"}, "ca_path /nonexistent/ca.pem is not a file"),
        (
            {"agents": [{"id": "x", "url": "http://127.0.0.1:1"}, {"id": "x", "url": "http://127.0.0.1:2"}]},
            "agents: the id 'x' is given twice",
        ),
        (
            {"agents": [{"id": "x", "url": "http://127.0.0.1:1", "drain_if_idle_for": -1}]},
            "agents: drain_if_idle_for of x must be a number of seconds >= 0; got -1.0",
        ),
        (
            {"agents": [{"id": "x", "url": "http://127.0.0.1:1", "drain_if_idle_for": math.nan}]},
            "agents: drain_if_idle_for of x must be a number of seconds >= 0; got nan",
        ),
        (
            {"agents": [{"id": "x", "url": "http://127.0.0.1:1", "drain_if_idle_for": 5}], "resume": True},
            "agents: x has drain_if_idle_for, which cannot be combined with resume=true",
        ),
    ],
)
def test_bad_options_fail_before_any_request(overrides: dict[str, Any], message: str) -> None:
    args = {"agents": [{"id": "x", "url": "http://127.0.0.1:1"}], "operator_key": "llmf_x", **overrides}
    result = fail_module(agent_idle_batch.main, args)
    assert result["msg"].startswith(message), result["msg"]


def test_through_the_ansible_cli(agents: Fleet) -> None:
    """AnsiballZ carries the module and both module_utils; the key comes from the environment."""
    entries = [entry(agents, "a", drain_if_idle_for=3600), entry(agents, "b")]
    rc, result, output = ansible_module(
        "llmfleet.aws.agent_idle_batch", {"agents": entries}, agents.operator_key
    )

    assert rc == 0, output
    assert [(a["id"], a["status"]) for a in result["agents"]] == [("a", 409), ("b", 200)]
    assert result["changed"] is False and result["drained"] == []
    assert agents.operator_key not in output
