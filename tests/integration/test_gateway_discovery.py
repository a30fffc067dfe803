"""The gateway finds the fleet in EC2 (issue 14): the deployment's GPU instances in the emulator, each
pointing at a real agent on loopback (the address tag stands in for the private IP, which the tests cannot
reach), are discovered and routed to by model; an instance that is stopped gets no traffic even though
its agent still answers."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_fleet import Fleet, wait_until
from conftest import client_factory
from emulated_fleet import ADDRESS_TAG, Gateway
from emulators import running_emulator

pytestmark = pytest.mark.slow

DEPLOYMENT = "gwtest"
MODELS = {"gpu-a": ["tinyllama:latest"], "gpu-b": ["qwen2:0.5b"]}


class Setup:
    def __init__(self, tmp: Path, endpoint: str) -> None:
        self.gateway_key = "llmf_" + secrets.token_urlsafe(32)
        self.fleet = Fleet(tmp / "agents")
        for name, models in MODELS.items():
            agent = self.fleet.add(
                name, {"ollama": {"models": models}, "auth": {"gateway_sources": ["127.0.0.1/32"]}}
            )
            made = agent.cli(
                "keys", "create", "--name", "gateway", "--role", "operator", "--gateway", "--from-stdin",
                stdin=self.gateway_key,
            )  # fmt: skip
            assert made.returncode == 0, made.stderr
        self.fleet.start()
        try:
            self._launch(tmp, endpoint)
        except BaseException:
            self.fleet.stop()  # nothing left running when the setup fails on the way
            raise

    def _launch(self, tmp: Path, endpoint: str) -> None:
        ec2 = client_factory(endpoint)("ec2")
        image = ec2.describe_images()["Images"][0]["ImageId"]
        self.instances: dict[str, str] = {}
        for name, agent in self.fleet.agents.items():
            tags = {
                "llmfleet:deployment": DEPLOYMENT,
                "llmfleet:role": "gpu-host",
                "llmfleet:host": name,
                ADDRESS_TAG: agent.url.removeprefix("http://"),
            }
            made = ec2.run_instances(
                ImageId=image,
                InstanceType="g5.xlarge",
                MinCount=1,
                MaxCount=1,
                TagSpecifications=[
                    {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
                ],
            )
            self.instances[name] = made["Instances"][0]["InstanceId"]
        self.ec2 = ec2
        # the gateway: its own store with the callers' key, EC2 discovery on the emulator; the stopped host
        # must stay stopped here: routing alone is tested (test_gateway_wake.py wakes them)
        self.gateway = Gateway(
            endpoint, DEPLOYMENT, self.gateway_key, self.fleet, tmp / "gateway", {"wake": {"enabled": False}}
        )
        self.url = self.gateway.url

    def hosts(self) -> dict[str, dict[str, Any]]:
        return self.gateway.hosts()

    def chat(self, model: str) -> tuple[int, Any]:
        code, answer, _headers = self.gateway.chat(model)
        return code, answer

    def stop(self) -> None:
        self.gateway.stop()
        self.fleet.stop()


@pytest.fixture
def setup(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Iterator[Setup]:
    with running_emulator(tmp_path_factory) as endpoint:
        made = Setup(tmp_path, endpoint)
        try:
            yield made
        finally:
            made.stop()


def test_the_gateway_finds_the_fleet_in_ec2_and_never_routes_to_a_stopped_host(setup: Setup) -> None:
    a, b = setup.instances["gpu-a"], setup.instances["gpu-b"]
    wait_until(
        lambda: all(h["ready"] for h in setup.hosts().values()) and len(setup.hosts()) == 2,
        30,
        "both hosts ready",
    )
    assert setup.hosts()[a]["models"] == ["tinyllama:latest"] and setup.hosts()[b]["models"] == ["qwen2:0.5b"]
    assert setup.chat("tinyllama")[0] == 200 and setup.chat("qwen2:0.5b")[0] == 200

    wait_until(lambda: setup.fleet.inference_records("gpu-b") == 1, 10, "gpu-b's record of its request")
    setup.ec2.stop_instances(InstanceIds=[b])
    wait_until(lambda: setup.hosts()[b]["state"] == "stopped", 15, "the gateway to see gpu-b stopped")
    code, body = setup.chat("qwen2:0.5b")
    assert code == 503 and "qwen2:0.5b" in body["error"], body
    assert setup.hosts()[b]["ready"] is False and "stopped" in setup.hosts()[b]["reasons"][0]
    assert setup.fleet.inference_records("gpu-b") == 1  # its agent still answers, but got nothing
    assert setup.chat("tinyllama")[0] == 200
