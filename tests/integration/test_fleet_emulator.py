"""The fleet emulator (issue 15): an emulated GPU instance's state drives its real agent, as a host's boot
and shutdown do, and its time in `running` is kept as AWS bills it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_fleet import http, wait_until
from botocore.exceptions import ClientError
from emulated_fleet import EmulatedFleet, running_fleet

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Iterator[EmulatedFleet]:
    with running_fleet(tmp_path_factory, tmp_path, "fleettest") as made:
        yield made


def answers(url: str) -> bool:
    try:
        return http("GET", url + "/healthz", timeout=2)[0] == 200
    except OSError:
        return False


def test_the_agent_runs_while_the_instance_runs_and_only_then(fleet: EmulatedFleet) -> None:
    fleet.launch("gpu-a", ["tinyllama:latest"], boot_seconds=0.5, pending_seconds=1.0)
    agent = fleet.agents.agents["gpu-a"]
    # launched running: the agent boots, and serves
    wait_until(lambda: http("GET", agent.url + "/readyz")[0] == 200, 60, "the agent to boot and be ready")
    assert fleet.machine("gpu-a")["process"] == "running"
    assert fleet.machine("gpu-a")["boots"] == 1

    # stopped: `stopping` until the agent has shut down, and a start meanwhile is refused as on AWS
    instance_id = fleet.instances["gpu-a"]
    stopping = fleet.ec2.stop_instances(InstanceIds=[instance_id])["StoppingInstances"][0]
    assert stopping["CurrentState"]["Name"] == "stopping"
    with pytest.raises(ClientError) as refused:
        fleet.ec2.start_instances(InstanceIds=[instance_id])
    assert refused.value.response["Error"]["Code"] == "IncorrectInstanceState"
    wait_until(lambda: fleet.state("gpu-a") == "stopped", 30, "the instance to be stopped")
    assert not answers(agent.url)
    billed = fleet.machine("gpu-a")["billed_seconds"]
    assert fleet.machine("gpu-a")["exits"] == [0]  # SIGTERM: the agent stopped its simulator and exited

    # started: `pending` first (not billed), then running, and the agent boots again
    starting = fleet.ec2.start_instances(InstanceIds=[instance_id])["StartingInstances"][0]
    assert starting["CurrentState"]["Name"] == "pending"
    assert fleet.machine("gpu-a")["billed_seconds"] == billed
    wait_until(lambda: fleet.state("gpu-a") == "running", 30, "the instance to be running")
    wait_until(lambda: http("GET", agent.url + "/readyz")[0] == 200, 60, "the agent to boot again")
    machine = fleet.machine("gpu-a")
    assert machine["boots"] == 2
    assert machine["billed_seconds"] > billed
    assert [end is None for _start, end in machine["intervals"]] == [False, True]

    # terminated: the agent ends
    fleet.ec2.terminate_instances(InstanceIds=[instance_id])
    wait_until(lambda: not answers(agent.url), 30, "the agent to end with its instance")


def test_a_stop_before_the_boot_is_done_starts_nothing(fleet: EmulatedFleet) -> None:
    fleet.launch("gpu-a", ["tinyllama:latest"], boot_seconds=3.0)
    fleet.ec2.stop_instances(InstanceIds=[fleet.instances["gpu-a"]])
    assert fleet.state("gpu-a") == "stopped"  # nothing ran: stopped at once
    machine = fleet.machine("gpu-a")
    assert machine["process"] == "none"
    assert machine["boots"] == 0


def test_a_bad_registration_is_refused_naming_the_instance(fleet: EmulatedFleet) -> None:
    fleet.launch("gpu-a", ["tinyllama:latest"])
    instance_id = fleet.instances["gpu-a"]
    for body, expected in (
        ({"instances": {instance_id: {"argv": []}}}, f"{instance_id}: argv is a non-empty list"),
        ({"instances": {instance_id: {"argv": ["x"], "boot_seconds": -1}}}, "boot_seconds=-1"),
        ({"instances": {"i-0000000000000000": None}}, "i-0000000000000000: no such instance"),
        ({"hosts": {}}, 'expected {"instances"'),
    ):
        with pytest.raises(urllib.error.HTTPError) as refused:
            fleet.control("POST", body)
        assert refused.value.code == 400
        assert expected in json.loads(refused.value.read())["error"]
    # a reset of the emulator forgets the hosts and ends their agents
    agent = fleet.agents.agents["gpu-a"]
    wait_until(lambda: answers(agent.url), 60, "the agent to boot")
    urllib.request.urlopen(
        urllib.request.Request(f"{fleet.endpoint}/moto-api/reset", method="POST"), timeout=10
    ).close()
    assert fleet.control()["instances"] == {}
    wait_until(lambda: not answers(agent.url), 30, "the agent to end at the reset")
    fleet.instances.clear()
