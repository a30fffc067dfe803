"""Emulated GPU instances whose agents are real: what the idle sweep and wake tests share.

An instance is launched in the emulator with the tags the gpu_hosts role sets, and the tag
llmfleet:agent-url pointing at a real agent on loopback (tests/agent_fleet.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from playbook_runs import PlaybookRun, ansible_playbook


class Deployment:
    """One deployment's instances in the emulator, and the sweep and wake playbooks run against it."""

    def __init__(self, name: str, aws: Any, endpoint: str, state_dir: Path, operator_key: str) -> None:
        self.name = name
        self.ec2 = aws("ec2")
        self.state_dir = state_dir
        self.env = {"AWS_ENDPOINT_URL": endpoint, "LLMFLEET_OPERATOR_KEY": operator_key}
        self.ids: dict[str, str] = {}  # host name -> instance id
        self._ami = self.ec2.describe_images()["Images"][0]["ImageId"]

    def launch(
        self,
        host: str,
        agent_url: str,
        idle_after: str | None,
        instance_type: str = "g5.xlarge",
        disable_api_stop: bool = False,
    ) -> str:
        tags = {
            "Name": f"{self.name}-{host}",
            "llmfleet:deployment": self.name,
            "llmfleet:role": "gpu-host",
            "llmfleet:host": host,
            "llmfleet:agent-url": agent_url,
        }
        if idle_after is not None:
            tags["llmfleet:idle-after"] = idle_after
        answer = self.ec2.run_instances(
            ImageId=self._ami,
            InstanceType=instance_type,
            MinCount=1,
            MaxCount=1,
            DisableApiStop=disable_api_stop,
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
            ],
        )
        self.ids[host] = answer["Instances"][0]["InstanceId"]
        return self.ids[host]

    def states(self) -> dict[str, str]:
        """Host name -> instance state, for every instance of the deployment."""
        by_id = {v: k for k, v in self.ids.items()}
        reservations = self.ec2.describe_instances(InstanceIds=list(self.ids.values()))["Reservations"]
        return {by_id[i["InstanceId"]]: i["State"]["Name"] for r in reservations for i in r["Instances"]}

    def play(self, playbook: str, *args: str) -> PlaybookRun:
        extra = ["-e", f"llmfleet_deployment={self.name}", "-e", f"llmfleet_state_dir={self.state_dir}"]
        return ansible_playbook(playbook, *extra, *args, env=self.env)

    def sweep(self, *args: str, succeeds: bool = True) -> tuple[PlaybookRun, dict[str, Any]]:
        """Run idle_shutdown.yml; returns the run and the summary it wrote."""
        summary = self.state_dir / "idle-summary.json"
        summary.unlink(missing_ok=True)
        run = self.play("playbooks/idle_shutdown.yml", *args)
        assert (run.returncode == 0) is succeeds, run.output[-6000:]
        return run, json.loads(summary.read_text())

    def wake(self, *args: str) -> tuple[PlaybookRun, dict[str, Any] | None]:
        summary = self.state_dir / "wake-summary.json"
        summary.unlink(missing_ok=True)
        run = self.play("playbooks/wake.yml", *args)
        return run, json.loads(summary.read_text()) if summary.exists() else None


def outcomes(summary: dict[str, Any]) -> dict[str, str]:
    return {h["name"]: h["outcome"] for h in summary["hosts"]}
