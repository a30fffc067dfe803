"""Tests of llmfleet.aws.gpu_instance_launch, gpu_instance_start and gpu_quota_info, and of
module_utils/capacity.py.

The modules run in-process (tests/module_runs.py) against the AWS emulator (moto's server with
scripts/emulator/launch.py), started once for this file; those tests are marked slow. The emulator's control
(/llmfleet-emulator/capacity and /quotas) takes capacity of an instance type away in a zone, or sets a vCPU
quota. The quota arithmetic and the messages are also tested on their own, without AWS.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import module_runs
import pytest
from ansible_collections.llmfleet.aws.plugins.module_utils import capacity
from ansible_collections.llmfleet.aws.plugins.modules import (
    gpu_instance_launch,
    gpu_instance_start,
    gpu_quota_info,
)
from emulators import running_emulator

REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO / "scripts"))

REGION = "us-east-1"


class Emulator:
    def __init__(self, url: str) -> None:
        self.url = url
        session = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
        )
        self.ec2 = session.client("ec2", endpoint_url=url)
        self.connection = {
            "endpoint_url": url,
            "access_key": "testing",
            "secret_key": "testing",
            "region": REGION,
        }

    def control(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.url}/llmfleet-emulator/{name}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.load(answer)  # type: ignore[no-any-return]

    def without(self, *rules: dict[str, str]) -> None:
        self.control("capacity", {"unavailable": list(rules)})

    def instances(self, name: str) -> list[dict[str, Any]]:
        pages = self.ec2.describe_instances(Filters=[{"Name": "tag:Name", "Values": [name]}])
        return [
            i for r in pages["Reservations"] for i in r["Instances"] if i["State"]["Name"] != "terminated"
        ]


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    with running_emulator(tmp_path_factory) as url:
        yield Emulator(url)


@pytest.fixture
def capacity_control(aws: Emulator) -> Iterator[Emulator]:
    """Every type has capacity again, and every quota its default, after the test."""
    yield aws
    aws.without()
    aws.control("quotas", {"ec2": dict.fromkeys(["L-DB2E81BA", "L-3819A6DF", "L-417A185B"])})


@pytest.fixture(scope="module")
def subnets(aws: Emulator) -> list[str]:
    """A VPC with a subnet in each of two zones (us-east-1a, us-east-1b)."""
    vpc = aws.ec2.create_vpc(CidrBlock="10.61.0.0/16")["Vpc"]["VpcId"]
    return [
        aws.ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.61.{i}.0/24", AvailabilityZone=zone)["Subnet"][
            "SubnetId"
        ]
        for i, zone in enumerate(("us-east-1a", "us-east-1b"))
    ]


@pytest.fixture(scope="module")
def image(aws: Emulator) -> str:
    return str(aws.ec2.describe_images()["Images"][0]["ImageId"])


def launch_args(aws: Emulator, name: str, subnets: list[str], image: str, **extra: Any) -> dict[str, Any]:
    return {
        **aws.connection,
        "filters": {"tag:Name": name},
        "instance_types": ["g6.xlarge", "g5.xlarge"],
        "subnet_ids": subnets,
        "image_id": image,
        "root_volume": {"device_name": "/dev/sda1", "volume_size": 40},
        "tags": {"Name": name, "llmfleet:instance-types": "g6.xlarge,g5.xlarge"},
        **extra,
    }


def launch(args: dict[str, Any], check: bool = False) -> dict[str, Any]:
    return module_runs.run_module(gpu_instance_launch.main, args, check)


# --- gpu_instance_launch ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_launch_takes_the_first_type_and_zone_with_capacity(
    capacity_control: Emulator, subnets: list[str], image: str
) -> None:
    aws = capacity_control
    aws.without({"instance_type": "g6.xlarge", "availability_zone": "us-east-1a"})
    result = launch(launch_args(aws, "launch-zone", subnets, image))
    assert result["changed"] is True
    assert result["launched"] == {
        "instance_type": "g6.xlarge",
        "subnet_id": subnets[1],
        "availability_zone": "us-east-1b",
    }
    assert [(t["instance_type"], t["availability_zone"], t["error"]) for t in result["tried"]] == [
        ("g6.xlarge", "us-east-1a", "InsufficientInstanceCapacity")
    ]
    (instance,) = aws.instances("launch-zone")
    assert (instance["InstanceType"], instance["Placement"]["AvailabilityZone"]) == (
        "g6.xlarge",
        "us-east-1b",
    )
    assert (
        instance["State"]["Name"] == "running" and result["instance"]["instance_id"] == instance["InstanceId"]
    )
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["llmfleet:instance-types"] == "g6.xlarge,g5.xlarge"
    assert instance["MetadataOptions"]["HttpTokens"] == "required"


@pytest.mark.slow
def test_launch_takes_the_next_zone_when_the_instance_ends_terminated_for_want_of_capacity(
    capacity_control: Emulator, subnets: list[str], image: str
) -> None:
    aws = capacity_control
    # AWS took the request, then the instance was terminated (Server.InsufficientInstanceCapacity)
    aws.without({"instance_type": "g6.xlarge", "availability_zone": "us-east-1a", "accepted": True})
    result = launch(launch_args(aws, "launch-accepted", subnets, image))
    assert result["launched"]["availability_zone"] == "us-east-1b"
    (tried,) = result["tried"]
    assert (
        tried["availability_zone"] == "us-east-1a"
        and "Server.InsufficientInstanceCapacity" in tried["message"]
    )
    assert [i["Placement"]["AvailabilityZone"] for i in aws.instances("launch-accepted")] == ["us-east-1b"]


@pytest.mark.slow
def test_launch_falls_to_the_next_type_when_no_zone_has_the_first(
    capacity_control: Emulator, subnets: list[str], image: str
) -> None:
    aws = capacity_control
    aws.without({"instance_type": "g6.xlarge"})
    result = launch(launch_args(aws, "launch-type", subnets, image))
    assert result["launched"]["instance_type"] == "g5.xlarge"
    assert result["launched"]["availability_zone"] == "us-east-1a"
    assert capacity.tried_text(result["tried"]) == "g6.xlarge in us-east-1a, us-east-1b"
    assert [i["InstanceType"] for i in aws.instances("launch-type")] == ["g5.xlarge"]


@pytest.mark.slow
def test_launch_fails_naming_every_type_and_zone_tried_and_creates_nothing(
    capacity_control: Emulator, subnets: list[str], image: str
) -> None:
    aws = capacity_control
    aws.without(
        {"instance_type": "g6.xlarge"},
        {"instance_type": "g5.xlarge", "availability_zone": "us-east-1a"},
        {"instance_type": "g5.xlarge", "availability_zone": "us-east-1b"},
    )
    failed = module_runs.fail_module(
        gpu_instance_launch.main, launch_args(aws, "launch-none", subnets, image)
    )
    assert failed["msg"] == (
        "no capacity for launch-none: tried g6.xlarge in us-east-1a, us-east-1b; g5.xlarge in us-east-1a,"
        " us-east-1b (InsufficientInstanceCapacity for each)"
    )
    assert len(failed["tried"]) == 4
    assert aws.instances("launch-none") == []


@pytest.mark.slow
def test_launch_fails_at_once_on_another_error(
    capacity_control: Emulator, subnets: list[str], image: str
) -> None:
    aws = capacity_control
    missing = "arn:aws:iam::123456789012:instance-profile/no-such-profile"
    args = launch_args(aws, "launch-error", subnets, image, iam_instance_profile=missing)
    failed = module_runs.fail_module(gpu_instance_launch.main, args)
    # the first type and zone only: the error is not a capacity error, so nothing else is tried
    assert failed["msg"].startswith("Unable to launch g6.xlarge in us-east-1a")
    assert failed["tried"] == [] and aws.instances("launch-error") == []


@pytest.mark.slow
def test_launch_leaves_an_existing_instance_as_it_is(aws: Emulator, subnets: list[str], image: str) -> None:
    first = launch(launch_args(aws, "launch-once", subnets, image))
    aws.ec2.stop_instances(InstanceIds=[first["instance"]["instance_id"]])
    again = launch(launch_args(aws, "launch-once", subnets, image, instance_types=["g5.2xlarge"]))
    assert again["changed"] is False and again["launched"] == {}
    assert again["instance"]["instance_id"] == first["instance"]["instance_id"]
    (instance,) = aws.instances("launch-once")
    assert instance["State"]["Name"] == "stopped" and instance["InstanceType"] == "g6.xlarge"


@pytest.mark.slow
def test_launch_in_check_mode_launches_nothing(aws: Emulator, subnets: list[str], image: str) -> None:
    result = launch(launch_args(aws, "launch-check", subnets, image), check=True)
    assert result["changed"] is True and result["instance"] == {}
    assert aws.instances("launch-check") == []


# --- gpu_instance_start ----------------------------------------------------------------------------------


def stopped(aws: Emulator, name: str, instance_type: str, types: str | None, subnet: str, image: str) -> str:
    tags = [{"Key": "Name", "Value": name}]
    if types is not None:
        tags.append({"Key": "llmfleet:instance-types", "Value": types})
    instance_id = aws.ec2.run_instances(
        ImageId=image,
        InstanceType=instance_type,
        MinCount=1,
        MaxCount=1,
        SubnetId=subnet,
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )["Instances"][0]["InstanceId"]
    aws.ec2.stop_instances(InstanceIds=[instance_id])
    return str(instance_id)


def described(aws: Emulator, instance_id: str) -> tuple[str, str]:
    instance = aws.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    return instance["State"]["Name"], instance["InstanceType"]


def start(aws: Emulator, ids: list[str], check: bool = False) -> dict[str, Any]:
    return module_runs.run_module(gpu_instance_start.main, {**aws.connection, "instance_ids": ids}, check)


@pytest.mark.slow
def test_start_goes_one_by_one_and_uses_another_type_without_capacity(
    capacity_control: Emulator, subnets: list[str], image: str
) -> None:
    aws = capacity_control
    other = stopped(aws, "start-other", "g6.xlarge", "g6.xlarge,g5.xlarge", subnets[0], image)
    alone = stopped(aws, "start-alone", "g6.xlarge", None, subnets[0], image)
    fine = stopped(aws, "start-fine", "g5.2xlarge", None, subnets[0], image)
    aws.without({"instance_type": "g6.xlarge", "availability_zone": "us-east-1a"})

    result = start(aws, [other, alone, fine])

    by_id = {r["instance_id"]: r for r in result["results"]}
    assert by_id[other]["outcome"] == "started" and by_id[other]["instance_type"] == "g5.xlarge"
    assert by_id[other]["instance_type_before"] == "g6.xlarge"
    assert by_id[alone]["outcome"] == "no_capacity"
    assert (
        by_id[alone]["reason"]
        == "no capacity: tried g6.xlarge in us-east-1a (InsufficientInstanceCapacity for each)"
    )
    assert by_id[fine]["outcome"] == "started"  # after the one that could not start
    assert result["started"] == [other, fine] and result["not_started"] == [alone]
    assert described(aws, other) == ("running", "g5.xlarge")
    assert described(aws, alone) == ("stopped", "g6.xlarge")


@pytest.mark.slow
def test_start_takes_the_next_type_when_the_instance_stops_again_for_want_of_capacity(
    capacity_control: Emulator, subnets: list[str], image: str
) -> None:
    aws = capacity_control
    instance = stopped(aws, "start-accepted", "g6.xlarge", "g6.xlarge,g5.xlarge", subnets[0], image)
    # AWS took the start, then the instance stopped again (state reason Server.InsufficientInstanceCapacity)
    aws.without({"instance_type": "g6.xlarge", "accepted": True})

    (result,) = start(aws, [instance])["results"]

    assert result["outcome"] == "started" and result["instance_type"] == "g5.xlarge"
    (tried,) = result["tried"]
    assert tried["instance_type"] == "g6.xlarge" and "Server.InsufficientInstanceCapacity" in tried["message"]
    assert described(aws, instance) == ("running", "g5.xlarge")


@pytest.mark.slow
def test_start_without_capacity_of_any_type_gives_the_instance_its_type_back(
    capacity_control: Emulator, subnets: list[str], image: str
) -> None:
    aws = capacity_control
    instance = stopped(aws, "start-none", "g6.xlarge", "g6.xlarge,g5.xlarge", subnets[1], image)
    aws.without(
        {"instance_type": "g6.xlarge"}, {"instance_type": "g5.xlarge", "availability_zone": "us-east-1b"}
    )

    (result,) = start(aws, [instance])["results"]

    assert result["outcome"] == "no_capacity"
    assert capacity.tried_text(result["tried"]) == "g6.xlarge in us-east-1b; g5.xlarge in us-east-1b"
    assert described(aws, instance) == ("stopped", "g6.xlarge")


@pytest.mark.slow
def test_start_leaves_running_ones_and_changes_nothing_in_check_mode(
    aws: Emulator, subnets: list[str], image: str
) -> None:
    instance = stopped(aws, "start-check", "g5.xlarge", None, subnets[0], image)
    result = start(aws, [instance], check=True)
    assert result["changed"] is True and result["results"][0]["outcome"] == "would_start"
    assert described(aws, instance) == ("stopped", "g5.xlarge")
    start(aws, [instance])
    again = start(aws, [instance])
    assert again["changed"] is False and again["results"][0]["outcome"] == "running"


# --- gpu_quota_info --------------------------------------------------------------------------------------


def quota(aws: Emulator, deployment: str, hosts: list[dict[str, Any]]) -> dict[str, Any]:
    args = {**aws.connection, "deployment": deployment, "hosts": hosts}
    return module_runs.run_module(gpu_quota_info.main, args)


@pytest.mark.slow
def test_quota_info_names_the_numbers_of_an_exceeded_quota(capacity_control: Emulator) -> None:
    aws = capacity_control
    aws.control("quotas", {"ec2": {"L-DB2E81BA": 8, "L-3819A6DF": 64}})
    hosts = [
        {"name": "chat", "instance_types": ["g5.xlarge"]},
        {"name": "batch", "instance_types": ["g5.2xlarge", "g5.xlarge"]},
        {"name": "cheap", "instance_types": ["g5.xlarge"], "spot": True},
    ]
    result = quota(aws, "quota-none-yet", hosts)
    by_code = {q["quota_code"]: q for q in result["quotas"]}
    assert set(by_code) == {"L-DB2E81BA", "L-3819A6DF"}
    on_demand = by_code["L-DB2E81BA"]
    assert on_demand["planned_vcpus"] == 12 and on_demand["value"] == 8 and on_demand["exceeded"] is True
    assert by_code["L-3819A6DF"]["planned_vcpus"] == 4 and by_code["L-3819A6DF"]["exceeded"] is False
    (message,) = result["exceeded"]
    assert message.startswith(
        "G and VT on-demand: the GPU hosts need 12 vCPUs (chat g5.xlarge 4, batch g5.2xlarge 8)"
    )
    assert message.endswith("over the quota L-DB2E81BA (Running On-Demand G and VT instances) of 8 vCPUs")
    assert result["to_create"] == ["chat", "batch", "cheap"]


@pytest.mark.slow
def test_quota_info_counts_an_existing_host_with_its_type_and_names_an_unknown_type(
    aws: Emulator, subnets: list[str], image: str
) -> None:
    aws.ec2.run_instances(
        ImageId=image,
        InstanceType="p4d.24xlarge",
        MinCount=1,
        MaxCount=1,
        SubnetId=subnets[0],
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "Name", "Value": "quota-dep-train"},
                    {"Key": "llmfleet:deployment", "Value": "quota-dep"},
                    {"Key": "llmfleet:role", "Value": "gpu-host"},
                ],
            }
        ],
    )
    result = quota(aws, "quota-dep", [{"name": "train", "instance_types": ["g5.xlarge"]}])
    (p_quota,) = result["quotas"]
    assert p_quota["quota_code"] == "L-417A185B" and p_quota["planned_vcpus"] == 96
    assert p_quota["hosts"] == [
        {"name": "train", "instance_type": "p4d.24xlarge", "vcpus": 96, "exists": True}
    ]
    assert result["to_create"] == []

    failed = module_runs.fail_module(
        gpu_quota_info.main,
        {
            **aws.connection,
            "deployment": "quota-dep",
            "hosts": [{"name": "x", "instance_types": ["g5.xlarge", "g9.huge"]}],
        },
    )
    assert "g9.huge" in failed["msg"] and "hosts x" in failed["msg"]


@pytest.mark.parametrize(
    ("instance_type", "family"),
    [
        ("g5.xlarge", "G and VT"),
        ("g4dn.12xlarge", "G and VT"),
        ("gr6.4xlarge", "G and VT"),
        ("vt1.3xlarge", "G and VT"),
        ("p4d.24xlarge", "P"),
        ("p5.48xlarge", "P"),
        ("m7i.large", "Standard"),
        ("im4gn.large", "Standard"),
        ("inf2.xlarge", None),
        ("trn1.2xlarge", None),
        ("dl1.24xlarge", None),
    ],
)
def test_quota_class_of_an_instance_type(instance_type: str, family: str | None) -> None:
    assert capacity.quota_class(instance_type) == family


def test_quota_report_counts_other_instances_of_the_same_class_and_market() -> None:
    planned = [
        {"name": "a", "instance_type": "g5.xlarge", "spot": False, "exists": False},
        {"name": "b", "instance_type": "g5.xlarge", "spot": True, "exists": True},
        {"name": "c", "instance_type": "inf2.xlarge", "spot": False, "exists": False},
    ]
    others = [
        {"instance_type": "g5.2xlarge", "spot": False},
        {"instance_type": "g5.2xlarge", "spot": True},
        {"instance_type": "p3.2xlarge", "spot": False},
    ]
    vcpus = {"g5.xlarge": 4, "g5.2xlarge": 8, "p3.2xlarge": 8, "inf2.xlarge": 4}
    usage, unchecked = capacity.plan_quotas(planned, others, vcpus)
    assert unchecked == [{"name": "c", "instance_type": "inf2.xlarge"}]
    values = {("G and VT", "on-demand"): 12.0, ("G and VT", "spot"): 8.0}
    quotas, exceeded = capacity.quota_report(usage, values)
    assert [(q["quota_code"], q["planned_vcpus"], q["other_vcpus"], q["exceeded"]) for q in quotas] == [
        ("L-DB2E81BA", 4, 8, False),
        ("L-3819A6DF", 4, 8, True),
    ]
    assert exceeded == [
        "G and VT spot: the GPU hosts need 4 vCPUs (b g5.xlarge 4) and other instances run 8, over the quota"
        " L-3819A6DF (All G and VT Spot Instance Requests) of 8 vCPUs"
    ]


def test_tried_text_groups_zones_by_type_in_order() -> None:
    tried: list[dict[str, Any]] = [
        {"instance_type": "g6.xlarge", "availability_zone": "us-east-1b"},
        {"instance_type": "g6.xlarge", "availability_zone": "us-east-1a"},
        {"instance_type": "g5.xlarge", "availability_zone": "us-east-1b"},
    ]
    assert capacity.tried_text(tried) == "g6.xlarge in us-east-1b, us-east-1a; g5.xlarge in us-east-1b"
