"""Part of `make demo`: wake on request and the idle sweep, with the gateway discovering the fleet in EC2.

The emulator's fleet runs this machine's installed agent as the GPU host gpu-a, only while its instance
runs (scripts/emulator/fleet.py). The host is stopped; a streamed chat through the gateway wakes it (the
gateway starts the instance, waits for the agent, then the answer streams); then nobody asks, and the
gateway's idle sweep stops it again and says what that saves.

demo_wake.py ENDPOINT DEPLOYMENT STATE_DIR MODEL   (the installed agent and gateway under STATE_DIR)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import openai
import yaml
from llmfleet_agent import idle_rules

IDLE_AFTER = "20s"  # 30m and more on AWS; short here, so that the demo sees the sweep
HOST = "gpu-a"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def get(url: str, key: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})  # noqa: S310 - loopback
    with urllib.request.urlopen(req, timeout=5) as answer:  # noqa: S310 - loopback
        return json.loads(answer.read())


def register(endpoint: str, instances: dict[str, Any]) -> None:
    """The emulator's fleet control (scripts/emulator/fleet.py): what an instance runs, or null."""
    body = json.dumps({"instances": instances}).encode()
    url = f"{endpoint}/llmfleet-emulator/fleet"
    req = urllib.request.Request(url, data=body, method="POST")  # noqa: S310 - the emulator on loopback
    try:
        urllib.request.urlopen(req, timeout=10).close()  # noqa: S310 - the emulator on loopback
    except urllib.error.HTTPError as exc:
        why = exc.read().decode(errors="replace")
        raise SystemExit(f"demo: the emulator refused the fleet's registration: {why}") from None


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=1):  # noqa: S310 - loopback
            return True
    except OSError:
        return False


def wait(what: str, predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: {what} did not happen within {timeout:g}s")
        time.sleep(0.2)


def main() -> int:
    endpoint, deployment, state, model = sys.argv[1], sys.argv[2], Path(sys.argv[3]).resolve(), sys.argv[4]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name="us-east-1")
    filters = [
        {"Name": "tag:llmfleet:deployment", "Values": [deployment]},
        {"Name": "tag:llmfleet:host", "Values": [HOST]},
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
    ]
    (instance,) = [i for r in ec2.describe_instances(Filters=filters)["Reservations"] for i in r["Instances"]]
    instance_id = instance["InstanceId"]
    # the other GPU hosts have no agent on this machine: stopped, they are out of this demo
    running = [
        filters[0],
        {"Name": "tag:llmfleet:role", "Values": ["gpu-host"]},
        {"Name": "instance-state-name", "Values": ["running"]},
    ]
    found = ec2.describe_instances(Filters=running)["Reservations"]
    others = [i["InstanceId"] for r in found for i in r["Instances"] if i["InstanceId"] != instance_id]
    if others:
        ec2.stop_instances(InstanceIds=others)

    def state_of() -> str:
        found = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
        return str(found["State"]["Name"])

    config_path = state / "host/etc/llmfleet/agent.yaml"
    agent = str(state / "host/opt/llmfleet-agent/venv/bin/llmfleet-agent")
    agent_url = f"http://127.0.0.1:{yaml.safe_load(config_path.read_text())['listen']['port']}"
    operator = (state / "keys/demo-operator.key").read_text().strip()
    user = (state / "keys/demo-user.key").read_text().strip()

    step(f"the emulator's fleet runs this machine's agent as {HOST} ({instance_id}), only while it runs")
    tags = {"llmfleet:agent-address": agent_url.removeprefix("http://"), "llmfleet:models": model,
            "llmfleet:idle-after": IDLE_AFTER}  # fmt: skip
    ec2.create_tags(Resources=[instance_id], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
    spec = {"argv": [agent, "serve", "--config", str(config_path)], "log": str(state / "agent-fleet.log"),
            "boot_seconds": 2, "pending_seconds": 1}  # fmt: skip
    register(endpoint, {instance_id: spec})
    wait("the agent to boot", lambda: answers(agent_url), 60)
    ec2.stop_instances(InstanceIds=[instance_id])
    wait(f"{HOST} to stop", lambda: state_of() == "stopped", 60)
    print(f"   {HOST} is stopped; its agent ended with it: {agent_url} answers nothing")

    gateway_dir = state / "gateway/etc/llmfleet"
    gw = yaml.safe_load((gateway_dir / "agent.yaml").read_text())
    gw["gateway"].pop("hosts", None)
    gw["gateway"].update(
        deployment=deployment, region="us-east-1", endpoint_url=endpoint, agent_scheme="http",
        address_tag="llmfleet:agent-address", refresh_interval="1s", wake={"poll_interval": "0.3s"},
        sweep={"interval": "2s", "prices": {"g5.xlarge": {"usd_per_hour": 1.006, "gpus": 1}}},
    )  # fmt: skip
    wake_config = gateway_dir / "agent-wake.yaml"
    wake_config.write_text(yaml.safe_dump(gw))
    gateway_url = f"http://127.0.0.1:{gw['listen']['port']}"
    step("the gateway, finding the fleet in EC2 this time (wake on request and the idle sweep are on)")
    gateway_bin = str(state / "gateway/opt/llmfleet-agent/venv/bin/llmfleet-agent")
    log = (state / "gateway-wake.log").open("ab")
    gateway = subprocess.Popen([gateway_bin, "gateway", "--config", str(wake_config)], stdout=log, stderr=log)
    try:
        wait("the gateway to be ready", lambda: answers(gateway_url), 60)
        print(f"   {gateway_url}: {HOST} is stopped, its tag says it serves {model}")

        step(f"a streamed chat for {model}: the gateway starts {HOST}, holds the request, then it streams")
        seen: list[str] = []
        done = threading.Event()

        def watch() -> None:
            began = time.monotonic()
            while not done.is_set():
                for wake in get(f"{gateway_url}/gateway/status", operator)["wakes"]:
                    if wake["phase"] not in seen:
                        seen.append(wake["phase"])
                        print(f"   wake: {wake['host']} {wake['phase']} ({time.monotonic() - began:.1f}s)")
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=user, timeout=600)
        began = time.monotonic()
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Are you awake?"}], stream=True
        )
        first = True
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first:
                    done.set()
                    watcher.join()
                    print("   model: ", end="", flush=True)
                    first = False
                print(chunk.choices[0].delta.content, end="", flush=True)
        done.set()
        watcher.join()
        print(f"\n   (answered {time.monotonic() - began:.1f}s after the request, the start included)")

        step(f"nobody asks: the gateway's sweep stops {HOST} once idle {IDLE_AFTER}")
        began = time.monotonic()
        status = f"{gateway_url}/gateway/status"
        stopped = lambda: get(status, operator)["sweep"]["last_stopped"]  # noqa: E731
        wait(f"{HOST} to be stopped by the sweep", stopped, 120)
        print(f"   {HOST} {state_of()} {time.monotonic() - began:.1f}s later; the sweep's summary:")
        summary = get(status, operator)["sweep"]["last_stopped"]
        for line in idle_rules.idle_report(summary):
            print(f"   {line}")
    finally:
        gateway.terminate()
        gateway.wait(30)
        register(endpoint, {instance_id: None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
