"""The idle sweep (playbooks/idle_shutdown.yml) and wake (playbooks/wake.yml) against the emulator, with a
real agent behind every emulated GPU instance (its tag llmfleet:agent-url)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_fleet import Fleet, fleet, free_port, wait_until
from idle_support import Deployment, outcomes
from support import Stream

pytestmark = pytest.mark.slow

SLOW_SIM = {"ollama": {"env": {"LLMFLEET_SIM_TOKEN_DELAY": "0.05"}}}
PRICE_G5_XLARGE = 1.006  # roles/idle_shutdown/defaults/main.yml


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Four agents shared by this module's tests; each test resumes the ones it uses."""
    with fleet(tmp_path_factory.mktemp("agents")) as made:
        for name in ("a", "b", "e"):
            made.add(name)
        made.add("c", SLOW_SIM)
        made.start()
        yield made


def fresh(agents: Fleet, *names: str) -> None:
    """Each named agent serving, not draining."""
    for name in names:
        code, body, _headers = agents.agents[name].post("/agent/resume", key=agents.operator_key)
        assert code == 200 and body["draining"] is False, body


def idle_for(agents: Fleet, name: str, seconds: float) -> None:
    wait_until(lambda: agents.idle(name)["idle_seconds"] >= seconds, 30, f"agent {name} idle {seconds}s")


def chat(agents: Fleet, name: str) -> tuple[int, Any, Any]:
    body = {"model": "tinyllama", "messages": [{"role": "user", "content": "still there"}], "stream": False}
    return agents.agents[name].post("/api/chat", body, key=agents.user_key)


@pytest.fixture
def deployment(
    request: pytest.FixtureRequest, aws: Any, aws_endpoint: str, agents: Fleet, tmp_path: Path
) -> Deployment:
    name = "idle-" + request.node.name.removeprefix("test_").replace("_", "-")[:24].rstrip("-")
    return Deployment(name, aws, aws_endpoint, tmp_path / "state", agents.operator_key)


def test_sweep_stops_the_idle_host_and_keeps_the_others(deployment: Deployment, agents: Fleet) -> None:
    fresh(agents, "a", "b", "c")
    a, b, c = (agents.agents[n] for n in "abc")
    deployment.launch("gpu-a", a.url, "1s")
    deployment.launch("gpu-b", b.url, "1h")
    deployment.launch("gpu-c", c.url, "1s")
    deployment.launch("gpu-d", f"http://127.0.0.1:{free_port()}", "1s")  # nothing listens there
    idle_for(agents, "a", 1.5)
    idle_for(agents, "c", 1.5)  # C would be stopped too, were it not for the stream in flight
    words = " ".join(f"w{i}" for i in range(400))  # 400 tokens at 0.05 s: 20 s of streaming
    body = {"model": "tinyllama", "messages": [{"role": "user", "content": words}], "stream": True}
    stream = Stream(c.url, "/api/chat", body, key=agents.user_key)
    lines = stream.lines()
    assert stream.status == 200 and b'"done":false' in next(lines).replace(b" ", b"")

    run, summary = deployment.sweep()

    expected = {"gpu-a": "stopped", "gpu-b": "not_idle", "gpu-c": "busy", "gpu-d": "unreachable"}
    assert outcomes(summary) == expected
    assert summary["counts"] == {
        **dict.fromkeys(summary["counts"], 0),
        **{"stopped": 1, "not_idle": 1, "busy": 1, "unreachable": 1},
    }
    running = dict.fromkeys(("gpu-b", "gpu-c", "gpu-d"), "running")
    assert deployment.states() == {"gpu-a": "stopped", **running}
    by_name = {h["name"]: h for h in summary["hosts"]}
    assert by_name["gpu-a"]["idle_seconds"] >= 1 and by_name["gpu-a"]["idle_after"] == 1
    assert by_name["gpu-b"]["idle_after"] == 3600 and "less than 3600" in by_name["gpu-b"]["reason"]
    assert by_name["gpu-c"]["inflight"] == 1
    assert "gpu-d" in run.stdout and by_name["gpu-d"]["reason"]
    assert summary["savings"] == {
        "instances": 1,
        "gpus": 1,
        "gpu_hours_per_day": 24,
        "usd_per_day": round(PRICE_G5_XLARGE * 24, 2),
        "prices_unknown": [],
    }
    assert "stopped" in run.stdout and f"${PRICE_G5_XLARGE * 24:.2f} a day" in run.stdout
    # A refuses new work (its host is stopped); B and C still serve; C's stream completes
    assert chat(agents, "a")[0] == 503
    assert chat(agents, "b")[0] == 200
    rest = list(lines)
    assert b'"done":true' in rest[-1].replace(b" ", b"") and not any(b'"error"' in line for line in rest)
    stream.close()
    assert agents.idle("c")["draining"] is False


def test_a_sweep_that_reaches_no_agent_fails_loudly_and_stops_nothing(deployment: Deployment) -> None:
    """A controller outside the VPC (here: nothing listens at the hosts' agent addresses) must not report
    success having stopped nothing."""
    for name in ("gpu-x", "gpu-y"):
        deployment.launch(name, f"http://127.0.0.1:{free_port()}", "0")

    run, summary = deployment.sweep(succeeds=False)

    assert outcomes(summary) == {"gpu-x": "unreachable", "gpu-y": "unreachable"}
    assert deployment.states() == {"gpu-x": "running", "gpu-y": "running"}
    message = " ".join(run.output.split())
    expected = "this controller cannot reach the agents of 2 of the 2 running GPU hosts"
    assert expected in message, run.output[-3000:]
    assert "gpu-x, gpu-y" in message and "The gateway runs the idle sweep inside the VPC" in message


def test_a_failed_stop_resumes_the_agent(deployment: Deployment, agents: Fleet) -> None:
    fresh(agents, "e")
    deployment.launch("gpu-e", agents.agents["e"].url, "0", disable_api_stop=True)  # stop protection on

    run, summary = deployment.sweep()

    assert outcomes(summary) == {"gpu-e": "stop_failed"}, run.stdout[-3000:]
    reason = summary["hosts"][0]["reason"]
    assert "stop failed" in reason and "was resumed" in reason
    assert deployment.states() == {"gpu-e": "running"}
    assert agents.idle("e")["draining"] is False and chat(agents, "e")[0] == 200
    assert summary["savings"]["instances"] == 0


def test_check_mode_drains_nothing_and_stops_nothing(deployment: Deployment, agents: Fleet) -> None:
    fresh(agents, "a", "b")
    deployment.launch("gpu-a", agents.agents["a"].url, "1s")
    deployment.launch("gpu-b", agents.agents["b"].url, "never")
    idle_for(agents, "a", 1.5)

    run, summary = deployment.sweep("--check")

    assert summary["dry_run"] is True
    assert outcomes(summary) == {"gpu-a": "would_stop", "gpu-b": "always_on"}
    assert deployment.states() == {"gpu-a": "running", "gpu-b": "running"}
    assert agents.idle("a")["draining"] is False and agents.idle("b")["draining"] is False
    assert "would stop" in run.stdout and "dry run" in run.stdout
    assert summary["savings"]["instances"] == 1


def test_a_bad_threshold_tag_keeps_the_host_and_names_the_tag(deployment: Deployment, agents: Fleet) -> None:
    fresh(agents, "a")
    instance = deployment.launch("gpu-a", agents.agents["a"].url, "soon")

    _run, summary = deployment.sweep()

    assert outcomes(summary) == {"gpu-a": "error"}
    reason = summary["hosts"][0]["reason"]
    assert "llmfleet:idle-after" in reason and instance in reason and "soon" in reason
    assert deployment.states() == {"gpu-a": "running"} and agents.idle("a")["draining"] is False


def test_wake_starts_a_stopped_host_and_waits_until_its_agent_is_ready(
    deployment: Deployment, agents: Fleet
) -> None:
    fresh(agents, "b")
    deployment.launch("gpu-b", agents.agents["b"].url, "1s")
    deployment.launch("gpu-a", agents.agents["a"].url, "1s")
    idle_for(agents, "b", 1.5)
    # the state a sweep leaves: the agent drained, the instance stopped (gpu-a stays running, untouched)
    code = agents.agents["b"].post("/agent/drain", key=agents.operator_key)[0]
    assert code == 200
    deployment.ec2.stop_instances(InstanceIds=[deployment.ids["gpu-b"]])
    wait_until(lambda: deployment.states()["gpu-b"] == "stopped", 30, "gpu-b stopped")

    run, summary = deployment.wake("-e", "wake_hosts=gpu-b")

    assert run.returncode == 0, run.output[-5000:]
    assert summary is not None and summary["ready"] == 1 and summary["not_ready"] == 0
    (host,) = summary["hosts"]
    assert host["name"] == "gpu-b" and host["state_before"] == "stopped" and host["ready"] is True
    assert 0 < host["seconds"] < 120 and "ready after" in run.stdout
    assert deployment.states()["gpu-b"] == "running"
    assert agents.agents["b"].readyz()[0] == 200 and chat(agents, "b")[0] == 200


def test_wake_names_a_host_that_does_not_exist(deployment: Deployment, agents: Fleet) -> None:
    deployment.launch("gpu-a", agents.agents["a"].url, "1s")
    run, summary = deployment.wake("-e", "wake_hosts=gpu-a,gpu-x")
    assert run.returncode != 0 and summary is None
    assert "no GPU host gpu-x" in run.output and "gpu-a" in run.output
    assert deployment.states() == {"gpu-a": "running"}
