"""Wake on request (issue 15): a request for a model whose host is stopped starts it through EC2 and is
answered once the host's agent is ready; the fleet emulator runs each host's real agent only while its
instance runs, after a boot delay, as on AWS."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ollama
import pytest
from agent_fleet import AGENT, bearer, wait_until
from emulated_fleet import EmulatedFleet, Gateway, running_fleet

pytestmark = pytest.mark.slow

MODEL = "tinyllama:latest"


@pytest.fixture
def fleet(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Iterator[EmulatedFleet]:
    with running_fleet(tmp_path_factory, tmp_path / "fleet", "waketest") as made:
        yield made


@pytest.fixture
def gateways(fleet: EmulatedFleet, tmp_path: Path) -> Iterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    for gateway in started:
        gateway.stop()


def stopped(fleet: EmulatedFleet, name: str) -> None:
    fleet.ec2.stop_instances(InstanceIds=[fleet.instances[name]])
    wait_until(lambda: fleet.state(name) == "stopped", 30, f"{name} to be stopped")


def wakes(gateway: Gateway) -> list[dict[str, Any]]:
    return gateway.status()["wakes"]  # type: ignore[no-any-return]


def test_twenty_concurrent_requests_for_a_stopped_hosts_model_are_all_answered_after_it_wakes(
    fleet: EmulatedFleet, gateways: list[Gateway], tmp_path: Path
) -> None:
    fleet.launch("gpu-a", [MODEL], boot_seconds=2.0, pending_seconds=1.0)
    fleet.launch("gpu-b", ["qwen2:0.5b"])
    stopped(fleet, "gpu-a")
    gateway = Gateway.of(fleet, tmp_path / "gateway", {"wake": {"poll_interval": 0.2}})
    gateways.append(gateway)
    instance = fleet.instances["gpu-a"]
    wait_until(lambda: gateway.status()["hosts"], 10, "the gateway to find the hosts")

    def streamed() -> list[dict[str, Any]]:
        """One of the twenty streamed, with the official ollama client: held, then the whole stream."""
        client = ollama.Client(host=gateway.url, headers=bearer(fleet.agents.user_key), timeout=120)
        messages = [{"role": "user", "content": "one two three"}]
        return [dict(part) for part in client.chat(model=MODEL, messages=messages, stream=True)]

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = [pool.submit(gateway.chat, MODEL, 120.0) for _request in range(19)]
        stream = pool.submit(streamed)
        # held while the host starts: the status shows the wake and its phase
        wake = wait_until(
            lambda: next((w for w in wakes(gateway) if w["phase"] != "ready" and w["waiting"]), None),
            30,
            "a wake under way with requests waiting",
        )
        assert wake["host"] == instance and wake["model"] == MODEL
        assert wake["phase"] in ("starting", "booting", "loading model")
        results = [a.result(timeout=120) for a in answers]
        parts = stream.result(timeout=120)
    assert [code for code, _body, _headers in results] == [200] * 19, results
    assert parts[-1]["done"] is True and all(not p["done"] for p in parts[:-1]) and len(parts) > 1
    assert all(MODEL in body["model"] for _code, body, _headers in results)
    (done,) = [w for w in wakes(gateway) if w["host"] == instance]
    assert done["phase"] == "ready" and done["error"] is None
    assert done["served"] >= 1 and done["tried"] == []
    machine = fleet.machine("gpu-a")
    # stopped before its first boot was done: the wake's is its one boot, its second time running
    assert fleet.state("gpu-a") == "running" and machine["boots"] == 1 and len(machine["intervals"]) == 2


def test_a_full_queue_and_the_timeout_give_503_with_retry_after(
    fleet: EmulatedFleet, gateways: list[Gateway], tmp_path: Path
) -> None:
    fleet.launch("gpu-a", [MODEL], boot_seconds=600.0)  # never ready within the test
    stopped(fleet, "gpu-a")
    settings = {"wake": {"queue": 2, "timeout": "4s", "poll_interval": 0.2}}
    gateway = Gateway.of(fleet, tmp_path / "gateway", settings)
    gateways.append(gateway)
    wait_until(lambda: gateway.status()["hosts"], 10, "the gateway to find the hosts")
    with ThreadPoolExecutor(max_workers=3) as pool:
        held = [pool.submit(gateway.chat, MODEL, 30.0) for _request in range(2)]
        wait_until(lambda: any(w["waiting"] == 2 for w in wakes(gateway)), 10, "two requests held")
        began = time.monotonic()
        code, body, headers = gateway.chat(MODEL)  # the third: the queue is full, answered at once
        assert time.monotonic() - began < 3
        assert code == 503 and headers["Retry-After"] == "30", body
        assert "is starting" in body["error"] and "2 requests already wait" in body["error"], body
        for answer in held:
            code, body, headers = answer.result(timeout=30)
            assert code == 503 and headers["Retry-After"] == "30", body
            assert "is starting" in body["error"] and "not ready within 4s" in body["error"], body
    assert fleet.state("gpu-a") in ("pending", "running")  # it was started all the same


def test_a_capacity_error_on_the_first_host_wakes_the_second(
    fleet: EmulatedFleet, gateways: list[Gateway], tmp_path: Path
) -> None:
    for name, zone in (("gpu-a", "us-east-1a"), ("gpu-b", "us-east-1b")):
        fleet.launch(name, [MODEL], zone=zone)
        stopped(fleet, name)
    # the gateway tries the stopped hosts in the order of their ids: no capacity for the first one's type
    # in its zone
    first, second = sorted(fleet.instances, key=lambda name: fleet.instances[name])
    zone = {"gpu-a": "us-east-1a", "gpu-b": "us-east-1b"}[first]
    fleet.capacity([{"instance_type": "g5.xlarge", "availability_zone": zone}])
    gateway = Gateway.of(fleet, tmp_path / "gateway", {"wake": {"poll_interval": 0.2}})
    gateways.append(gateway)
    wait_until(lambda: len(gateway.status()["hosts"]) == 2, 10, "the gateway to find the hosts")
    code, body, _headers = gateway.chat(MODEL, 120.0)
    assert code == 200, body
    assert fleet.state(first) == "stopped" and fleet.state(second) == "running"
    (wake,) = wakes(gateway)
    assert wake["host"] == fleet.instances[second] and wake["phase"] == "ready"
    (tried,) = wake["tried"]
    assert tried.startswith(fleet.instances[first]) and "InsufficientInstanceCapacity" in tried

    # no capacity anywhere: the request is refused naming what was tried
    stopped(fleet, second)
    fleet.capacity([{"instance_type": "g5.xlarge"}])
    code, body, headers = gateway.chat(MODEL, 60.0)
    assert code == 503 and headers["Retry-After"] == "30", body
    assert fleet.instances["gpu-a"] in body["error"] and fleet.instances["gpu-b"] in body["error"], body
    assert "InsufficientInstanceCapacity" in body["error"], body


def test_two_gateways_waking_the_same_host_start_it_once_and_both_are_answered(
    fleet: EmulatedFleet, gateways: list[Gateway], tmp_path: Path
) -> None:
    fleet.launch("gpu-a", [MODEL], boot_seconds=1.0, pending_seconds=1.0)
    stopped(fleet, "gpu-a")
    for name in ("one", "two"):
        gateways.append(Gateway.of(fleet, tmp_path / name, {"wake": {"poll_interval": 0.2}}))
    for gateway in gateways:
        wait_until(lambda gateway=gateway: gateway.status()["hosts"], 10, "the gateways to find the host")
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = [pool.submit(g.chat, MODEL, 120.0) for g in gateways for _request in range(2)]
        results = [a.result(timeout=120) for a in answers]
    assert [code for code, _body, _headers in results] == [200] * 4, results
    # AWS answers the second start with the instance's state: one start, one boot
    assert fleet.machine("gpu-a")["boots"] == 1 and len(fleet.machine("gpu-a")["intervals"]) == 2
    for gateway in gateways:
        (wake,) = wakes(gateway)
        assert wake["host"] == fleet.instances["gpu-a"] and wake["phase"] == "ready"


def test_a_request_for_a_host_being_stopped_wakes_it_once_it_has_stopped(
    fleet: EmulatedFleet, gateways: list[Gateway], tmp_path: Path
) -> None:
    fleet.launch("gpu-a", [MODEL])
    instance = fleet.instances["gpu-a"]
    agent = fleet.agents.agents["gpu-a"]
    # the host shuts down slowly: its agent ends at SIGTERM, the machine 3 s later (`stopping` meanwhile)
    serve = f"{AGENT} serve --config {agent.config_path}"
    script = f'{serve} & pid=$!; trap "kill -TERM $pid; wait $pid; sleep 3" TERM; wait $pid'
    spec = {"argv": ["sh", "-c", script], "log": str(agent.dir / "agent.log")}
    fleet.control("POST", {"instances": {instance: spec}})
    wait_until(lambda: agent.readyz()[0] == 200, 60, "the agent to boot")
    gateway = Gateway.of(fleet, tmp_path / "gateway", {"wake": {"poll_interval": 0.2}})
    gateways.append(gateway)
    wait_until(lambda: gateway.hosts()[instance]["ready"], 10, "the gateway to see it ready")

    fleet.ec2.stop_instances(InstanceIds=[instance])
    assert fleet.state("gpu-a") == "stopping"
    code, body, _headers = gateway.chat(MODEL, 120.0)  # a start now would be refused: it waits, then starts

    assert code == 200, body
    assert fleet.state("gpu-a") == "running" and len(fleet.machine("gpu-a")["intervals"]) == 2
    (wake,) = wakes(gateway)
    assert wake["host"] == instance and wake["phase"] == "ready" and wake["tried"] == []


def test_a_host_that_drained_unseen_sends_the_request_elsewhere_and_records_nothing(
    fleet: EmulatedFleet, gateways: list[Gateway], tmp_path: Path
) -> None:
    """Another gateway's sweep drained a host this gateway still sees ready: the host refuses before any work,
    the request goes to the next host with the model, and only that host records it."""
    fleet.launch("gpu-a", [MODEL])
    fleet.launch("gpu-b", [MODEL])
    for name in ("gpu-a", "gpu-b"):
        agent = fleet.agents.agents[name]
        wait_until(lambda agent=agent: agent.readyz()[0] == 200, 60, f"{name}'s agent to boot")
    # a look at the fleet a minute apart: this gateway does not see the drain
    gateway = Gateway.of(
        fleet, tmp_path / "gateway", {"refresh_interval": "60s", "sweep": {"enabled": False}}
    )
    gateways.append(gateway)
    drained = fleet.agents.agents["gpu-a"]
    code, body, _headers = drained.post("/agent/drain", {}, key=fleet.agents.operator_key)
    assert code == 200 and body["draining"] is True, body

    for _request in range(4):
        code, answer, _headers = gateway.chat(MODEL, 60.0)
        assert code == 200, answer

    def refused(name: str) -> float:
        code, text, _headers = fleet.agents.agents[name].get("/metrics", key=fleet.agents.operator_key)
        assert code == 200
        lines = [
            line for line in str(text).splitlines() if line.startswith("llmfleet_refused_requests_total")
        ]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if 'reason="draining"' in line)

    wait_until(
        lambda: fleet.agents.inference_records("gpu-b") == 4, 10, "gpu-b's records of the four requests"
    )
    assert (
        fleet.agents.inference_records("gpu-a") == 0
    )  # its refusals are not records: the request's one record is gpu-b's
    assert refused("gpu-a") >= 1  # the gateway did try it (it comes first), and it refused
