"""Persistent spot requests in the emulator, as AWS documents them, and llmfleet.aws.spot_requests.

A GPU host with `spot: true` is launched from a launch template with persistent market options that stop
on interruption (roles/gpu_hosts). When the idle sweep stops it, its request is `disabled`; terminating it
while the request is not cancelled makes AWS launch a new instance. The emulator (scripts/emulator/
server.py) behaves so; these tests check it, then that the collection's module cancels what the upstream
module leaves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from module_runs import ansible_json

TAG = {"Key": "llmfleet:test", "Value": "spot-requests"}


class Spot:
    """A VPC with one subnet and a launch template with persistent, stop-on-interruption spot options."""

    def __init__(self, aws: Any, endpoint: str) -> None:
        self.ec2 = aws("ec2")
        self.endpoint = endpoint
        self.vpc = self.ec2.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
        self.subnet = self.ec2.create_subnet(
            VpcId=self.vpc, CidrBlock="10.77.1.0/24", AvailabilityZone="us-east-1a"
        )["Subnet"]["SubnetId"]
        self.image = self.ec2.describe_images()["Images"][0]["ImageId"]
        self.template = self.ec2.create_launch_template(
            LaunchTemplateName=f"spot-test-{self.vpc}",
            LaunchTemplateData={
                "InstanceMarketOptions": {
                    "MarketType": "spot",
                    "SpotOptions": {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"},
                }
            },
        )["LaunchTemplate"]["LaunchTemplateId"]

    def launch(self) -> dict[str, Any]:
        """One instance as the gpu_hosts role launches a spot host: the template, an explicit interface."""
        reservation = self.ec2.run_instances(
            ImageId=self.image,
            InstanceType="g5.xlarge",
            MinCount=1,
            MaxCount=1,
            LaunchTemplate={"LaunchTemplateId": self.template},
            NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": self.subnet, "DeleteOnTermination": True}],
            TagSpecifications=[{"ResourceType": "instance", "Tags": [TAG]}],
        )
        return dict(reservation["Instances"][0])

    def request(self, request_id: str) -> dict[str, Any]:
        (request,) = self.ec2.describe_spot_instance_requests(SpotInstanceRequestIds=[request_id])[
            "SpotInstanceRequests"
        ]
        return dict(request)

    def live_instances(self) -> list[str]:
        reservations = self.ec2.describe_instances(Filters=[{"Name": "subnet-id", "Values": [self.subnet]}])
        return [
            i["InstanceId"]
            for r in reservations["Reservations"]
            for i in r["Instances"]
            if i["State"]["Name"] != "terminated"
        ]

    def module(self, name: str, args: dict[str, Any], *extra: str) -> dict[str, Any]:
        connection = {"endpoint_url": self.endpoint, "region": "us-east-1"}
        connection |= {"access_key": "testing", "secret_key": "testing"}
        rc, report, output = ansible_json(
            ["ansible", "localhost", "-m", name, "-a", json.dumps(args | connection), *extra]
        )
        result = dict(report["plays"][0]["tasks"][0]["hosts"]["localhost"])
        assert rc == 0, output[-3000:]
        return result

    def cleanup(self) -> None:
        requests = self.ec2.describe_spot_instance_requests(
            Filters=[{"Name": "state", "Values": ["open", "active", "disabled"]}]
        )
        ours = [
            r["SpotInstanceRequestId"]
            for r in requests["SpotInstanceRequests"]
            if r["LaunchSpecification"].get("SubnetId") == self.subnet
        ]
        if ours:
            self.ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=ours)
        if live := self.live_instances():
            self.ec2.terminate_instances(InstanceIds=live)
        self.ec2.delete_subnet(SubnetId=self.subnet)
        self.ec2.delete_launch_template(LaunchTemplateId=self.template)
        self.ec2.delete_vpc(VpcId=self.vpc)


@pytest.fixture
def spot(aws: Any, aws_endpoint: str) -> Iterator[Spot]:
    setup = Spot(aws, aws_endpoint)
    yield setup
    setup.cleanup()


def test_a_persistent_request_is_disabled_while_stopped_and_relaunches_after_terminate(spot: Spot) -> None:
    instance = spot.launch()
    assert instance.get("InstanceLifecycle") == "spot"
    request_id = instance["SpotInstanceRequestId"]
    first = spot.request(request_id)
    assert (first["State"], first["Type"], first["InstanceId"]) == (
        "active",
        "persistent",
        instance["InstanceId"],
    )
    assert first["InstanceInterruptionBehavior"] == "stop"

    spot.ec2.stop_instances(InstanceIds=[instance["InstanceId"]])
    stopped = spot.request(request_id)
    assert (stopped["State"], stopped["Status"]["Code"]) == ("disabled", "instance-stopped-by-user")
    spot.ec2.start_instances(InstanceIds=[instance["InstanceId"]])
    assert spot.request(request_id)["State"] == "active"
    spot.ec2.stop_instances(InstanceIds=[instance["InstanceId"]])

    # terminated while the request is not cancelled: the request launches a new instance, same launch
    spot.ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])
    relaunched = spot.request(request_id)
    assert relaunched["State"] == "active" and relaunched["InstanceId"] != instance["InstanceId"]
    assert spot.live_instances() == [relaunched["InstanceId"]]
    (replacement,) = spot.ec2.describe_instances(InstanceIds=[relaunched["InstanceId"]])["Reservations"][0][
        "Instances"
    ]
    assert (replacement["InstanceType"], replacement["SubnetId"]) == ("g5.xlarge", spot.subnet)
    assert TAG in replacement["Tags"] and replacement["SpotInstanceRequestId"] == request_id

    # the subnet cannot go while it holds an instance (AWS: DependencyViolation)
    with pytest.raises(spot.ec2.exceptions.ClientError, match="DependencyViolation"):
        spot.ec2.delete_subnet(SubnetId=spot.subnet)

    # cancelled first, the request stays listed as cancelled and launches nothing more
    spot.ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[request_id])
    cancelled = spot.request(request_id)
    assert (cancelled["State"], cancelled["Status"]["Code"]) == (
        "cancelled",
        "request-canceled-and-instance-running",
    )
    spot.ec2.terminate_instances(InstanceIds=[relaunched["InstanceId"]])
    assert spot.request(request_id)["State"] == "cancelled"
    assert spot.live_instances() == []


def test_a_one_time_request_closes_when_its_instance_is_terminated(spot: Spot) -> None:
    reservation = spot.ec2.run_instances(
        ImageId=spot.image,
        MinCount=1,
        MaxCount=1,
        SubnetId=spot.subnet,
        InstanceMarketOptions={"MarketType": "spot"},
    )
    instance = reservation["Instances"][0]
    request = spot.request(instance["SpotInstanceRequestId"])
    assert (request["Type"], request["State"]) == ("one-time", "active")
    spot.ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])
    assert spot.request(instance["SpotInstanceRequestId"])["State"] == "closed"
    assert spot.live_instances() == []


def test_the_module_cancels_disabled_requests_that_the_upstream_module_leaves(spot: Spot) -> None:
    stopped, running = spot.launch(), spot.launch()
    spot.ec2.stop_instances(InstanceIds=[stopped["InstanceId"]])
    disabled_id, active_id = stopped["SpotInstanceRequestId"], running["SpotInstanceRequestId"]
    assert spot.request(disabled_id)["State"] == "disabled"

    # amazon.aws.ec2_spot_instance cancels only open and active requests: it leaves the disabled one
    upstream = spot.module(
        "amazon.aws.ec2_spot_instance", {"spot_instance_request_ids": [disabled_id], "state": "absent"}
    )
    assert upstream["changed"] is False and spot.request(disabled_id)["State"] == "disabled"

    ids = [stopped["InstanceId"], running["InstanceId"]]
    check = spot.module("llmfleet.aws.spot_requests", {"instance_ids": ids}, "--check")
    assert check["changed"] is True and sorted(check["cancelled"]) == sorted([disabled_id, active_id])
    assert spot.request(disabled_id)["State"] == "disabled", "check mode cancelled a request"

    done = spot.module("llmfleet.aws.spot_requests", {"instance_ids": ids})
    assert done["changed"] is True and sorted(done["cancelled"]) == sorted([disabled_id, active_id])
    assert {r["spot_instance_request_id"]: r["state"] for r in done["spot_requests"]} == {
        disabled_id: "cancelled",
        active_id: "cancelled",
    }
    # terminating now launches nothing
    spot.ec2.terminate_instances(InstanceIds=ids)
    assert spot.live_instances() == []

    again = spot.module(
        "llmfleet.aws.spot_requests", {"instance_ids": ids, "spot_instance_request_ids": [active_id]}
    )
    assert again["changed"] is False and again["cancelled"] == []
