"""The idle sweep on the gateway (issue 15): inside the VPC, where the agents answer, the gateway stops an
idle host, never a busy one (a stream in flight during the sweep finishes), leaves a young one, and the
stopped host wakes again on the next request for its model. The fleet emulator runs each host's real
agent only while its instance runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_fleet import wait_until
from emulated_fleet import EmulatedFleet, Gateway, running_fleet
from support import Stream

pytestmark = pytest.mark.slow

# the busy host streams slowly: 200 pieces at 0.05 s, 10 s of answer
SLOW_SIM = {"ollama": {"env": {"LLMFLEET_SIM_TOKEN_DELAY": "0.05"}}}


@pytest.fixture
def fleet(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Iterator[EmulatedFleet]:
    with running_fleet(tmp_path_factory, tmp_path / "fleet", "sweeptest") as made:
        yield made


def test_the_gateway_stops_the_idle_host_never_the_busy_one_and_wakes_it_again(
    fleet: EmulatedFleet, tmp_path: Path
) -> None:
    fleet.launch("idle", ["tinyllama:latest"], idle_after="2s")
    fleet.launch("busy", ["qwen2:0.5b"], idle_after="2s", overrides=SLOW_SIM)
    fleet.launch("young", ["llama3.2:1b"], idle_after="1h")
    for name in ("idle", "busy", "young"):
        agent = fleet.agents.agents[name]
        wait_until(lambda agent=agent: agent.readyz()[0] == 200, 60, f"{name}'s agent to boot")
    summary_file = tmp_path / "idle-summary.json"
    settings = {"sweep": {"interval": "0.5s", "summary_file": str(summary_file)}}
    gateway = Gateway.of(fleet, tmp_path / "gateway", settings)
    try:
        # a stream through the gateway, in flight across several sweeps
        words = " ".join(f"w{i}" for i in range(200))
        body = {"model": "qwen2:0.5b", "messages": [{"role": "user", "content": words}], "stream": True}
        stream = Stream(gateway.url, "/api/chat", body, key=fleet.agents.user_key)
        lines = stream.lines()
        assert stream.status == 200 and b'"done":false' in next(lines).replace(b" ", b"")

        wait_until(lambda: fleet.state("idle") == "stopped", 30, "the idle host to be stopped")
        assert fleet.state("busy") == "running"  # idle long enough, but a stream is in flight
        assert fleet.state("young") == "running"
        rest = list(lines)  # the stream finishes, whole
        assert b'"done":true' in rest[-1].replace(b" ", b"") and not any(b'"error"' in line for line in rest)
        stream.close()

        last = json.loads(summary_file.read_text())
        outcomes = {h["instance_id"]: h["outcome"] for h in last["hosts"]}
        assert outcomes[fleet.instances["young"]] == "not_idle"
        status = gateway.status()["sweep"]
        assert status["last_error"] is None and status["last"]["deployment"] == "sweeptest"

        # the next request for the stopped host's model wakes it, and is answered
        code, answer, _headers = gateway.chat("tinyllama", timeout=120)
        assert code == 200, answer
        assert fleet.state("idle") == "running" and fleet.machine("idle")["boots"] == 2
        # the busy host, idle since its stream ended, is stopped after it
        wait_until(lambda: fleet.state("busy") == "stopped", 30, "the busy host to be stopped once idle")
    finally:
        gateway.stop()


def test_the_summary_goes_beside_the_store_and_prices_what_was_stopped(
    fleet: EmulatedFleet, tmp_path: Path
) -> None:
    fleet.launch("idle", ["tinyllama:latest"], idle_after="1s")
    agent = fleet.agents.agents["idle"]
    wait_until(lambda: agent.readyz()[0] == 200, 60, "the agent to boot")
    prices = {"g5.xlarge": {"usd_per_hour": 1.006, "gpus": 1}}
    gateway = Gateway.of(fleet, tmp_path / "gateway", {"sweep": {"interval": "0.5s", "prices": prices}})
    try:
        wait_until(lambda: fleet.state("idle") == "stopped", 30, "the idle host to be stopped")
        summary_file = tmp_path / "gateway" / "idle-summary.json"  # the state directory: the store's
        summary = wait_until(
            lambda: (
                summary_file.exists()
                and json.loads(summary_file.read_text())["counts"]["stopped"] == 1
                and json.loads(summary_file.read_text())
            ),
            10,
            "the summary of the sweep that stopped it",
        )
    finally:
        gateway.stop()
    (host,) = summary["hosts"]
    assert host["instance_id"] == fleet.instances["idle"] and host["outcome"] == "stopped"
    assert host["idle_after"] == 1 and host["idle_seconds"] >= 1
    assert summary["savings"] == {
        "instances": 1,
        "gpus": 1,
        "gpu_hours_per_day": 24,
        "usd_per_day": round(1.006 * 24, 2),
        "prices_unknown": [],
    }


def test_a_host_whose_stop_fails_is_resumed_and_serves(fleet: EmulatedFleet, tmp_path: Path) -> None:
    fleet.launch("guarded", ["tinyllama:latest"], idle_after="1s", disable_api_stop=True)
    agent = fleet.agents.agents["guarded"]
    wait_until(lambda: agent.readyz()[0] == 200, 60, "the agent to boot")
    gateway = Gateway.of(fleet, tmp_path / "gateway", {"sweep": {"interval": "0.5s"}})
    try:
        last = wait_until(lambda: gateway.status()["sweep"]["last_stopped"], 30, "a sweep that tried a stop")
        (host,) = last["hosts"]
        assert host["outcome"] == "stop_failed", host
        assert "stop failed" in host["reason"] and "was resumed" in host["reason"], host
        assert fleet.state("guarded") == "running"
        # resumed: not draining, and it serves through the gateway
        assert agent.status()["idle"]["draining"] is False
        code, answer, _headers = gateway.chat("tinyllama", timeout=60)
        assert code == 200, answer
    finally:
        gateway.stop()
