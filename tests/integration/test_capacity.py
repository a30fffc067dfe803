"""GPU capacity is scarce: the GPU hosts stage falls over to another zone and instance type, fails naming what
it tried when nothing has capacity, never starts a host that is stopped; site.yml checks the vCPU quotas
before it builds anything; wake.yml starts hosts one by one, so one without capacity does not keep the
others down.

Against the emulator, whose scripts/emulator/launch.py answers InsufficientInstanceCapacity for the instance
types and zones a test takes away (POST /llmfleet-emulator/capacity) and the vCPU quotas a test sets (POST
/llmfleet-emulator/quotas); each test gives both back. The GPU hosts tests build the deployment's network with
boto3, tagged as playbooks/network.yml tags it (the stage finds it by tags): network.yml itself is tested in
test_site.py and takes a minute of its own.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_fleet import Fleet, fleet, free_port, wait_until
from idle_support import Deployment
from playbook_runs import PlaybookRun, ansible_playbook

pytestmark = pytest.mark.slow

ZONES = ("us-east-1a", "us-east-1b")


def control(endpoint: str, name: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        f"{endpoint}/llmfleet-emulator/{name}", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def no_capacity(endpoint: str, *rules: dict[str, str]) -> None:
    control(endpoint, "capacity", {"unavailable": list(rules)})


@pytest.fixture(autouse=True)
def capacity_back(aws_endpoint: str) -> Iterator[None]:
    """Every type has capacity again, every quota its default value, after each test."""
    yield
    no_capacity(aws_endpoint)
    control(aws_endpoint, "quotas", {"ec2": {"L-DB2E81BA": None, "L-3819A6DF": None}})


def build_network(aws: Any, name: str, cidr: str) -> None:
    """A VPC with a private subnet in each zone and the agents' group, tagged as network.yml tags them."""
    ec2 = aws("ec2")

    def tags(kind: str, **extra: str) -> list[dict[str, Any]]:
        values = {"llmfleet:deployment": name, "Name": name, **extra}
        return [{"ResourceType": kind, "Tags": [{"Key": k, "Value": v} for k, v in values.items()]}]

    vpc = ec2.create_vpc(CidrBlock=f"{cidr}.0.0/16", TagSpecifications=tags("vpc"))["Vpc"]["VpcId"]
    for index, zone in enumerate(ZONES):
        ec2.create_subnet(
            VpcId=vpc,
            CidrBlock=f"{cidr}.{index}.0/24",
            AvailabilityZone=zone,
            TagSpecifications=tags("subnet", **{"llmfleet:tier": "private"}),
        )
    ec2.create_security_group(
        GroupName=f"{name}-agents", Description="agents", VpcId=vpc, TagSpecifications=tags("security-group")
    )


def play(endpoint: str, playbook: str, deployment: str, state: Path, **extra: Any) -> PlaybookRun:
    env = {"AWS_ENDPOINT_URL": endpoint, "LLMFLEET_DEPLOYMENT": deployment}
    variables = {"llmfleet_deployment": deployment, "llmfleet_state_dir": str(state), **extra}
    return ansible_playbook(playbook, "-e", json.dumps(variables), env=env)


def instances(aws: Any, deployment: str) -> dict[str, dict[str, Any]]:
    """Host name -> its instance (not terminated) of the deployment."""
    found = aws("ec2").describe_instances(
        Filters=[{"Name": "tag:llmfleet:deployment", "Values": [deployment]}]
    )
    return {
        {t["Key"]: t["Value"] for t in i["Tags"]}["llmfleet:host"]: i
        for r in found["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    }


# --- the GPU hosts stage ---------------------------------------------------------------------------------

LAUNCH = "cap-launch"
HOSTS = [
    # its own subnet is in us-east-1a, where g6.xlarge has no capacity: us-east-1b
    {"name": "gpu-a", "instance_types": ["g6.xlarge", "g5.xlarge"]},
    # g5.2xlarge has no capacity anywhere: its next type, in its own subnet (us-east-1b)
    {"name": "gpu-b", "instance_types": ["g5.2xlarge", "g5.xlarge"], "models": ["mistral:7b"]},
]
# none of its types has capacity anywhere
NOWHERE = {"name": "gpu-c", "instance_types": ["g6e.xlarge", "g4dn.xlarge"]}


@pytest.fixture(scope="module")
def launched(aws: Any, aws_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> PlaybookRun:
    """One run of the GPU hosts stage with capacity taken away: gpu-a and gpu-b fall over, gpu-c cannot."""
    build_network(aws, LAUNCH, "10.71")
    no_capacity(
        aws_endpoint,
        {"instance_type": "g6.xlarge", "availability_zone": "us-east-1a"},
        {"instance_type": "g5.2xlarge"},
        {"instance_type": "g6e.xlarge"},
        {"instance_type": "g4dn.xlarge"},
    )
    try:
        return play(
            aws_endpoint,
            "playbooks/gpu_hosts.yml",
            LAUNCH,
            tmp_path_factory.mktemp("launch"),
            llmfleet_gpu_hosts=[*HOSTS, NOWHERE],
        )
    finally:
        no_capacity(aws_endpoint)


def test_a_host_is_launched_in_another_zone_or_as_its_next_type_when_aws_has_no_capacity(
    launched: PlaybookRun, aws: Any
) -> None:
    hosts = instances(aws, LAUNCH)
    where = {
        name: (i["InstanceType"], i["Placement"]["AvailabilityZone"], i["State"]["Name"])
        for name, i in hosts.items()
    }
    assert where["gpu-a"] == ("g6.xlarge", "us-east-1b", "running"), launched.output[-4000:]
    assert where["gpu-b"] == ("g5.xlarge", "us-east-1b", "running")
    tags = {t["Key"]: t["Value"] for t in hosts["gpu-a"]["Tags"]}
    assert tags["llmfleet:instance-types"] == "g6.xlarge,g5.xlarge"  # what wake.yml tries


def test_no_capacity_of_any_type_fails_naming_every_type_and_zone_tried(
    launched: PlaybookRun, aws: Any
) -> None:
    assert launched.returncode != 0
    assert (
        "no capacity for cap-launch-gpu-c: tried g6e.xlarge in us-east-1a, us-east-1b;"
        " g4dn.xlarge in us-east-1a, us-east-1b (InsufficientInstanceCapacity for each)"
    ) in launched.output
    assert "gpu-c" not in instances(aws, LAUNCH)


def test_running_the_stage_again_leaves_a_stopped_host_stopped(
    launched: PlaybookRun, aws: Any, aws_endpoint: str, tmp_path: Path
) -> None:
    ec2 = aws("ec2")
    stopped = instances(aws, LAUNCH)["gpu-a"]["InstanceId"]
    ec2.stop_instances(InstanceIds=[stopped])  # what the idle sweep does
    wait_until(lambda: instances(aws, LAUNCH)["gpu-a"]["State"]["Name"] == "stopped", 30, "gpu-a stopped")

    # every type has capacity now: gpu-b keeps the type it got, gpu-a stays stopped
    again = play(aws_endpoint, "playbooks/gpu_hosts.yml", LAUNCH, tmp_path, llmfleet_gpu_hosts=HOSTS)

    assert again.returncode == 0, again.output[-5000:]
    assert again.recap()["changed"] == 0, again.output[-6000:]
    hosts = instances(aws, LAUNCH)
    assert hosts["gpu-a"]["State"]["Name"] == "stopped"
    assert (hosts["gpu-b"]["InstanceType"], hosts["gpu-b"]["State"]["Name"]) == ("g5.xlarge", "running")


# --- the vCPU quota preflight ----------------------------------------------------------------------------


def test_a_quota_below_the_plan_fails_site_yml_before_anything_is_created(
    aws: Any, aws_endpoint: str, tmp_path: Path
) -> None:
    control(aws_endpoint, "quotas", {"ec2": {"L-DB2E81BA": 2, "L-3819A6DF": 4}})
    hosts = [
        {"name": "gpu-a", "instance_type": "g5.xlarge"},
        {"name": "gpu-b", "instance_types": ["g5.2xlarge"], "spot": True},
    ]

    run = play(aws_endpoint, "site.yml", "cap-quota", tmp_path, llmfleet_gpu_hosts=hosts)

    assert run.returncode != 0
    output = " ".join(run.output.split())
    assert "gpu_hosts_hosts: G and VT on-demand: the GPU hosts need 4 vCPUs (gpu-a g5.xlarge 4)" in output
    assert "over the quota L-DB2E81BA (Running On-Demand G and VT instances) of 2 vCPUs" in output
    assert "G and VT spot: the GPU hosts need 8 vCPUs (gpu-b g5.2xlarge 8)" in output
    assert "over the quota L-3819A6DF (All G and VT Spot Instance Requests) of 4 vCPUs" in output
    tag = [{"Name": "tag:llmfleet:deployment", "Values": ["cap-quota"]}]
    assert aws("ec2").describe_vpcs(Filters=tag)["Vpcs"] == []
    assert instances(aws, "cap-quota") == {}


# --- wake ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with fleet(tmp_path_factory.mktemp("agents")) as made:
        made.add("a")
        made.start()
        yield made


def test_wake_starts_the_others_when_one_host_has_no_capacity(
    aws: Any, aws_endpoint: str, agents: Fleet, tmp_path: Path
) -> None:
    deployment = Deployment("cap-wake", aws, aws_endpoint, tmp_path / "state", agents.operator_key)
    # gpu-a may also run as a g5.xlarge; gpu-b only as a g6.xlarge (and has no agent: it never starts)
    deployment.launch("gpu-a", agents.agents["a"].url, "30m", instance_type="g6.xlarge")
    deployment.launch("gpu-b", f"http://127.0.0.1:{free_port()}", "30m", instance_type="g6.xlarge")
    ec2 = deployment.ec2
    ec2.create_tags(
        Resources=[deployment.ids["gpu-a"]],
        Tags=[{"Key": "llmfleet:instance-types", "Value": "g6.xlarge,g5.xlarge"}],
    )
    ec2.stop_instances(InstanceIds=list(deployment.ids.values()))
    wait_until(lambda: set(deployment.states().values()) == {"stopped"}, 30, "both stopped")
    no_capacity(aws_endpoint, {"instance_type": "g6.xlarge"})

    run, summary = deployment.wake()

    assert run.returncode != 0 and summary is not None, run.output[-5000:]
    assert deployment.states() == {"gpu-a": "running", "gpu-b": "stopped"}
    by_name = {h["name"]: h for h in summary["hosts"]}
    assert by_name["gpu-a"]["started"] is True and by_name["gpu-a"]["ready"] is True
    assert by_name["gpu-b"]["started"] is False and by_name["gpu-b"]["ready"] is False
    assert by_name["gpu-b"]["reason"] == (
        "no capacity: tried g6.xlarge in us-east-1a (InsufficientInstanceCapacity for each)"
    )
    assert summary["ready"] == 1 and summary["not_started"] == 1
    types = {
        i["InstanceId"]: i["InstanceType"]
        for r in ec2.describe_instances(InstanceIds=list(deployment.ids.values()))["Reservations"]
        for i in r["Instances"]
    }
    assert types == {deployment.ids["gpu-a"]: "g5.xlarge", deployment.ids["gpu-b"]: "g6.xlarge"}
    output = " ".join(run.output.split())
    assert "started as g5.xlarge: no capacity of g6.xlarge in us-east-1a" in output
    assert "could not start: gpu-b" in output and "NOT started gpu-b" in output
