"""GPU hosts as the emulator's fleet runs them (scripts/emulator/fleet.py): an EC2 instance per host, tagged
as the gpu_hosts role tags them, whose real agent (and simulator) runs only while the instance is running.

The instances' private addresses cannot be reached here, so each carries its agent's loopback address in
the tag ADDRESS_TAG (the gateway's `address_tag` setting, the idle sweep's `llmfleet:agent-url`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from agent_fleet import AGENT, Fleet, bearer, free_port, http, wait_until
from agents import deep_merge
from support import Proc

ADDRESS_TAG = "llmfleet:agent-address"


class EmulatedFleet:
    """Hosts in the emulator at `endpoint`, their agents sharing the fleet's operator and user keys (and the
    gateway key, when given: made with `keys create --gateway`, taken from `gateway_sources`)."""

    def __init__(
        self,
        endpoint: str,
        ec2: Any,
        directory: Path,
        deployment: str,
        gateway_key: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.ec2 = ec2
        self.deployment = deployment
        self.gateway_key = gateway_key
        self.agents = Fleet(directory)
        self.instances: dict[str, str] = {}  # host name -> instance id
        self._image = ec2.describe_images()["Images"][0]["ImageId"]

    def launch(
        self,
        name: str,
        models: list[str],
        *,
        boot_seconds: float = 0.0,
        pending_seconds: float = 0.0,
        idle_after: str = "30m",
        instance_type: str = "g5.xlarge",
        zone: str | None = None,
        overrides: dict[str, Any] | None = None,
        disable_api_stop: bool = False,
    ) -> str:
        """A running instance whose agent boots `boot_seconds` later; its instance id."""
        config = {"ollama": {"models": models}, "auth": {"gateway_sources": ["127.0.0.1/32"]}}
        agent = self.agents.add(name, deep_merge(config, overrides or {}))
        if self.gateway_key:
            made = agent.cli(
                "keys", "create", "--name", "gateway", "--role", "operator", "--gateway", "--from-stdin",
                stdin=self.gateway_key,
            )  # fmt: skip
            assert made.returncode == 0, made.stderr
        tags = {
            "Name": f"{self.deployment}-{name}",
            "llmfleet:deployment": self.deployment,
            "llmfleet:role": "gpu-host",
            "llmfleet:host": name,
            "llmfleet:models": ",".join(models),
            "llmfleet:idle-after": idle_after,
            ADDRESS_TAG: agent.url.removeprefix("http://"),
            "llmfleet:agent-url": agent.url,
        }
        launch: dict[str, Any] = {
            "ImageId": self._image,
            "InstanceType": instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "DisableApiStop": disable_api_stop,  # stop protection: StopInstances fails
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
            ],
        }
        if zone:
            launch["Placement"] = {"AvailabilityZone": zone}
        instance_id = self.ec2.run_instances(**launch)["Instances"][0]["InstanceId"]
        self.instances[name] = instance_id
        argv = [AGENT, "serve", "--config", str(agent.config_path)]
        spec = {
            "argv": argv,
            "log": str(agent.dir / "agent.log"),
            "boot_seconds": boot_seconds,
            "pending_seconds": pending_seconds,
        }
        self.control("POST", {"instances": {instance_id: spec}})
        return instance_id

    def control(self, method: str = "GET", body: Any = None, name: str = "fleet") -> dict[str, Any]:
        """The emulator's control `name` (fleet: its GPU hosts, capacity: what AWS has none of)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.endpoint}/llmfleet-emulator/{name}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=10) as answer:
            return json.loads(answer.read())  # type: ignore[no-any-return]

    def capacity(self, unavailable: list[dict[str, str]]) -> None:
        """No capacity of these instance types in these zones (all of them: the whole list)."""
        self.control("POST", {"unavailable": unavailable}, name="capacity")

    def machine(self, name: str) -> dict[str, Any]:
        """What the emulator says of the host: state, process, boots, billed_seconds, intervals."""
        return self.control()["instances"][self.instances[name]]  # type: ignore[no-any-return]

    def state(self, name: str) -> str:
        (reservation,) = self.ec2.describe_instances(InstanceIds=[self.instances[name]])["Reservations"]
        return str(reservation["Instances"][0]["State"]["Name"])

    def stop(self) -> None:
        """Forget every host (the emulator ends their agents) and stop what still runs."""
        if self.instances:
            # the emulator may be gone already: its process group took the agents with it
            with contextlib.suppress(OSError):
                self.control("POST", {"instances": dict.fromkeys(self.instances.values())})
        self.agents.stop()


class Gateway:
    """`llmfleet-agent gateway` discovering the deployment's GPU instances in the emulator at `endpoint`, with
    its own store holding the fleet's user and operator keys; its agents take `gateway_key`."""

    def __init__(
        self,
        endpoint: str,
        deployment: str,
        gateway_key: str,
        agents: Fleet,
        home: Path,
        gateway: dict[str, Any] | None = None,
    ) -> None:
        self.agents = agents
        home.mkdir(parents=True)
        (home / "gateway-key").write_text(gateway_key)
        (home / "gateway-key").chmod(0o600)
        self.url = f"http://127.0.0.1:{free_port()}"
        settings = {
            "key_file": str(home / "gateway-key"),
            "deployment": deployment,
            "region": "us-east-1",
            "endpoint_url": endpoint,
            "agent_scheme": "http",
            "address_tag": ADDRESS_TAG,
            "refresh_interval": 0.5,
            **(gateway or {}),
        }
        config = {
            "listen": {"host": "127.0.0.1", "port": int(self.url.rsplit(":", 1)[1])},
            "store": {"url": f"sqlite:///{home}/gateway.db"},
            "host_id": "gateway-1",
            "gateway": settings,
        }
        self.config = home / "gateway.yaml"
        self.config.write_text(yaml.safe_dump(config))
        for role in ("user", "operator"):
            argv = [AGENT, "keys", "create", "--config", str(self.config), "--name", role, "--role", role]
            secret = getattr(agents, f"{role}_key")
            made = subprocess.run(
                [*argv, "--from-stdin"], input=secret, capture_output=True, text=True, timeout=60, check=False
            )
            assert made.returncode == 0, made.stderr
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        self.proc = Proc([AGENT, "gateway", "--config", str(self.config)], home / "gateway.log", env=env)
        wait_until(lambda: http("GET", self.url + "/readyz")[0] == 200, 60, "the gateway's /readyz")

    @classmethod
    def of(cls, fleet: EmulatedFleet, home: Path, gateway: dict[str, Any] | None = None) -> Gateway:
        """The gateway of an EmulatedFleet."""
        assert fleet.gateway_key, "the fleet's agents need the gateway's key"
        return cls(fleet.endpoint, fleet.deployment, fleet.gateway_key, fleet.agents, home, gateway)

    def hosts(self) -> dict[str, dict[str, Any]]:
        return {h["id"]: h for h in self.status()["hosts"]}

    def status(self) -> dict[str, Any]:
        code, body, _headers = http(
            "GET", self.url + "/gateway/status", headers=bearer(self.agents.operator_key)
        )
        assert code == 200, body
        return body  # type: ignore[no-any-return]

    def chat(self, model: str, timeout: float = 60.0) -> tuple[int, Any, Any]:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
        headers = bearer(self.agents.user_key)
        return http("POST", self.url + "/api/chat", body, headers, timeout=timeout)

    def stop(self) -> None:
        self.proc.stop()


@contextlib.contextmanager
def running_fleet(tmp_path_factory: Any, directory: Path, deployment: str) -> Iterator[EmulatedFleet]:
    """A fleet in a new, empty emulator of its own, with a gateway key on every host, while the block runs."""
    import boto3
    from emulators import running_emulator

    with running_emulator(tmp_path_factory) as endpoint:
        ec2 = boto3.client(
            "ec2",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        made = EmulatedFleet(endpoint, ec2, directory, deployment, "llmf_" + secrets.token_urlsafe(32))
        try:
            yield made
        finally:
            made.stop()
