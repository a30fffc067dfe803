"""The gateway's EC2 calls: the deployment's GPU instances (DescribeInstances), starting one
(StartInstances, for wake on request) and stopping one (StopInstances, the idle sweep). boto3 is the
gateway's extra; the calls block, so the fleet, the waker and the sweep run them in the loop's executor.
The gateway's IAM role allows these three and nothing more (starting and stopping only this deployment's
GPU hosts, by tag condition)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..config import GatewayConfig

MODELS_TAG = "llmfleet:models"
# what an address tag may say: an IP address and a port, nothing else (no scheme, name or path)
_ADDRESS = re.compile(r"^([0-9]{1,3}(\.[0-9]{1,3}){3}|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$")
STATES = ["pending", "running", "stopping", "stopped"]
# AWS has none of the instance's type in its zone now: another host may have
NO_CAPACITY = {"InsufficientInstanceCapacity", "InsufficientHostCapacity", "InsufficientCapacity"}


@dataclass
class Instance:
    id: str
    url: str
    state: str
    declared: list[str] = field(default_factory=list)  # the models its llmfleet:models tag names
    reason: str = ""  # the state reason's code (Server.InsufficientInstanceCapacity: started, then stopped)
    instance_type: str = ""
    tags: dict[str, str] = field(default_factory=dict)


class StartRefused(Exception):
    """StartInstances answered an error: its code and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def no_capacity(self) -> bool:
        return self.code in NO_CAPACITY


class StopRefused(StartRefused):
    """StopInstances answered an error: its code and message."""


class Ec2:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self._client: Any = None

    def _ec2(self) -> Any:
        if self._client is None:
            import boto3  # the gateway's extra: hosts run without it

            cfg = self.cfg
            self._client = boto3.client("ec2", region_name=cfg.region, endpoint_url=cfg.endpoint_url)
        return self._client

    def describe(self) -> list[Instance]:
        """The deployment's GPU instances that are not terminated."""
        filters = [
            {"Name": "tag:llmfleet:deployment", "Values": [self.cfg.deployment or ""]},
            {"Name": "tag:llmfleet:role", "Values": ["gpu-host"]},
            {"Name": "instance-state-name", "Values": STATES},
        ]
        found = []
        for page in self._ec2().get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    found.append(self._instance(instance))
        return found

    def _instance(self, instance: dict[str, Any]) -> Instance:
        tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
        address = tags.get(self.cfg.address_tag or "") if self.cfg.address_tag else None
        if address is not None and not _ADDRESS.match(address):
            address = None  # only an address and a port: never a URL of the tagger's choosing
        if address is None:
            ip = instance.get("PrivateIpAddress")
            address = f"{ip}:{self.cfg.agent_port}" if ip else None
        return Instance(
            id=instance["InstanceId"],
            url=f"{self.cfg.agent_scheme}://{address}" if address else "",
            state=instance["State"]["Name"],
            declared=[m.strip() for m in tags.get(MODELS_TAG, "").split(",") if m.strip()],
            reason=(instance.get("StateReason") or {}).get("Code", ""),
            instance_type=instance.get("InstanceType", ""),
            tags=tags,
        )

    def stop(self, instance_id: str) -> None:
        """Stop the instance (the idle sweep, once its agent drained). StartRefused's kin on an error."""
        from botocore.exceptions import ClientError

        try:
            self._ec2().stop_instances(InstanceIds=[instance_id])
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise StopRefused(str(error.get("Code", "Error")), str(error.get("Message", exc))) from None

    def start(self, instance_id: str) -> str:
        """Start the instance; its state now (pending, or running when it was). StartRefused on an error."""
        from botocore.exceptions import ClientError

        try:
            answer = self._ec2().start_instances(InstanceIds=[instance_id])
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise StartRefused(str(error.get("Code", "Error")), str(error.get("Message", exc))) from None
        return str(answer["StartingInstances"][0]["CurrentState"]["Name"])
