"""site.yml against the emulator, end to end: build, converge (changed=0), check mode, what AWS holds,
the summary, this machine configured as the GPU host (inventories/local), and teardown. The tests run in
file order on one deployment."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent_fleet import bearer, free_port, http, wait_until
from playbook_runs import PlaybookRun, ansible_playbook
from support import Proc

pytestmark = pytest.mark.slow

DEPLOYMENT = "itest"
TAG = {"Name": "tag:llmfleet:deployment", "Values": [DEPLOYMENT]}


class Deployment:
    def __init__(self, endpoint: str, state_dir: Path) -> None:
        self.env = {"AWS_ENDPOINT_URL": endpoint}
        self.state_dir = state_dir
        # the host stage configures this machine: ports nothing else uses (the demo's are 8443, 21434)
        self.agent_port = free_port()
        self.extra = [
            *("-e", f"llmfleet_deployment={DEPLOYMENT}", "-e", f"llmfleet_state_dir={state_dir}"),
            *("-e", f"llmfleet_agent_port={self.agent_port}"),
            *("-e", f"llmfleet_agent_ollama_port={free_port()}"),
        ]
        self.runs: list[PlaybookRun] = []

    def play(self, playbook: str, *args: str) -> PlaybookRun:
        run = ansible_playbook(playbook, *self.extra, *args, env=self.env)
        self.runs.append(run)
        return run


@pytest.fixture(scope="module")
def deployment(aws_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    dep = Deployment(aws_endpoint, tmp_path_factory.mktemp("state"))
    first = dep.play("site.yml", "-v")
    assert first.returncode == 0, first.output[-5000:]
    yield dep


def test_second_run_changes_nothing(deployment: Deployment) -> None:
    second = deployment.play("site.yml")
    assert second.returncode == 0, second.output[-5000:]
    assert second.recap()["changed"] == 0, second.output[-8000:]


def test_check_mode_on_a_converged_deployment_changes_nothing(deployment: Deployment) -> None:
    check = deployment.play("site.yml", "--check")
    assert check.returncode == 0, check.output[-5000:]
    assert check.recap()["changed"] == 0, check.output[-8000:]


def vpc_id(aws: Any) -> str:
    vpcs = aws("ec2").describe_vpcs(Filters=[TAG])["Vpcs"]
    assert len(vpcs) == 1
    return str(vpcs[0]["VpcId"])


def test_subnets_span_two_zones_and_private_routes_go_through_the_nat(
    deployment: Deployment, aws: Any
) -> None:
    ec2 = aws("ec2")
    subnets = ec2.describe_subnets(Filters=[TAG])["Subnets"]
    tiers: dict[str, set[str]] = {}
    for subnet in subnets:
        tier = {t["Key"]: t["Value"] for t in subnet["Tags"]}["llmfleet:tier"]
        tiers.setdefault(tier, set()).add(subnet["AvailabilityZone"])
    assert tiers == {"public": {"us-east-1a", "us-east-1b"}, "private": {"us-east-1a", "us-east-1b"}}
    private = ec2.describe_route_tables(Filters=[TAG, {"Name": "tag:llmfleet:tier", "Values": ["private"]}])
    (table,) = private["RouteTables"]
    default = [r for r in table["Routes"] if r.get("DestinationCidrBlock") == "0.0.0.0/0"]
    assert len(default) == 1 and default[0].get("NatGatewayId", "").startswith("nat-")
    assert "GatewayId" not in default[0] or not default[0]["GatewayId"].startswith("igw-")
    private_ids = {
        s["SubnetId"] for s in subnets if {"Key": "llmfleet:tier", "Value": "private"} in s["Tags"]
    }
    assert {a["SubnetId"] for a in table["Associations"] if "SubnetId" in a} == private_ids
    endpoints = ec2.describe_vpc_endpoints(Filters=[{"Name": "vpc-id", "Values": [vpc_id(aws)]}])[
        "VpcEndpoints"
    ]
    assert [e["ServiceName"] for e in endpoints] == ["com.amazonaws.us-east-1.s3"]


def test_security_groups_are_least_privilege(deployment: Deployment, aws: Any) -> None:
    groups = {g["GroupName"]: g for g in aws("ec2").describe_security_groups(Filters=[TAG])["SecurityGroups"]}
    agents, database = groups[f"{DEPLOYMENT}-agents"], groups[f"{DEPLOYMENT}-database"]
    (rule,) = database["IpPermissions"]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 5432, 5432)
    assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [agents["GroupId"]]
    assert rule["IpRanges"] == []
    (agent_rule,) = agents["IpPermissions"]  # no SSH: no CIDR was given for it
    assert agent_rule["FromPort"] == agent_rule["ToPort"] == deployment.agent_port
    assert [r["CidrIp"] for r in agent_rule["IpRanges"]] == ["10.42.0.0/16"]
    for group in groups.values():
        for permission in group["IpPermissions"]:
            assert all(r["CidrIp"] != "0.0.0.0/0" for r in permission["IpRanges"]), group["GroupName"]


def test_database_is_encrypted_private_and_backed_up(deployment: Deployment, aws: Any) -> None:
    (db,) = aws("rds").describe_db_instances(DBInstanceIdentifier=f"{DEPLOYMENT}-db")["DBInstances"]
    assert db["StorageEncrypted"] is True
    assert db["PubliclyAccessible"] is False
    assert db["BackupRetentionPeriod"] >= 7
    assert db["Engine"] == "postgres"
    groups = {g["VpcSecurityGroupId"] for g in db["VpcSecurityGroups"]}
    database_group = aws("ec2").describe_security_groups(
        Filters=[TAG, {"Name": "group-name", "Values": [f"{DEPLOYMENT}-database"]}]
    )["SecurityGroups"][0]
    assert groups == {database_group["GroupId"]}


def test_directory_is_active_with_two_dns_addresses(deployment: Deployment, aws: Any) -> None:
    directories = [
        d
        for d in aws("ds").describe_directories()["DirectoryDescriptions"]
        if d["Name"] == "corp.example.com"
    ]
    (directory,) = directories
    assert directory["Stage"] == "Active"
    assert len(directory["DnsIpAddrs"]) == 2
    assert directory["VpcSettings"]["VpcId"] == vpc_id(aws)


def test_gpu_instances_run_in_private_subnets_with_profile_and_tags(deployment: Deployment, aws: Any) -> None:
    ec2 = aws("ec2")
    reservations = ec2.describe_instances(
        Filters=[TAG, {"Name": "instance-state-name", "Values": ["running"]}]
    )
    instances = [i for r in reservations["Reservations"] for i in r["Instances"]]
    assert len(instances) == 2
    private = {
        s["SubnetId"]
        for s in ec2.describe_subnets(Filters=[TAG, {"Name": "tag:llmfleet:tier", "Values": ["private"]}])[
            "Subnets"
        ]
    }
    for instance in instances:
        tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
        assert {"llmfleet:deployment", "llmfleet:role", "llmfleet:models", "llmfleet:idle-after"} <= set(tags)
        assert tags["llmfleet:role"] == "gpu-host"
        assert instance["SubnetId"] in private
        assert "PublicIpAddress" not in instance or not instance["PublicIpAddress"]
        assert f"{DEPLOYMENT}-gpu-host" in instance["IamInstanceProfile"]["Arn"]
    models = sorted({t["Value"] for i in instances for t in i["Tags"] if t["Key"] == "llmfleet:models"})
    assert models == ["llama3.1:8b", "mistral:7b,nomic-embed-text"]


def test_passwords_are_in_secrets_manager_and_never_in_the_output(deployment: Deployment, aws: Any) -> None:
    secrets = aws("secretsmanager")
    for name in (f"llmfleet/{DEPLOYMENT}/directory-admin", f"llmfleet/{DEPLOYMENT}/database-master"):
        value = secrets.get_secret_value(SecretId=name)["SecretString"]
        assert len(value) >= 16
        for run in deployment.runs:
            assert value not in run.output, f"{name} appears in the output of {run.args}"


def test_summary_is_printed_and_written(deployment: Deployment, aws: Any) -> None:
    outputs = json.loads((deployment.state_dir / "outputs.json").read_text())
    assert outputs["deployment"] == DEPLOYMENT and outputs["vpc_id"] == vpc_id(aws)
    assert len(outputs["private_subnet_ids"]) == 2
    assert outputs["directory"]["id"].startswith("d-") and len(outputs["directory"]["dns_ip_addrs"]) == 2
    assert outputs["database"]["endpoint"] and outputs["database"]["port"] == 5432
    assert sorted(h["name"] for h in outputs["gpu_hosts"]) == ["gpu-a", "gpu-b"]
    assert all(h["private_ip"] for h in outputs["gpu_hosts"])
    assert "written to" in deployment.runs[0].stdout and outputs["vpc_id"] in deployment.runs[0].stdout


class InstalledAgent:
    """The agent the host stage installed under the deployment's prefix (inventories/local: no systemd,
    so the test starts it the way the demo does)."""

    def __init__(self, state_dir: Path) -> None:
        host = state_dir / "host"
        self.config = host / "etc" / "llmfleet" / "agent.yaml"
        self.bin = host / "opt" / "llmfleet-agent" / "venv" / "bin" / "llmfleet-agent"
        self.keys = state_dir / "keys"
        listen = yaml.safe_load(self.config.read_text())["listen"]
        self.url = f"http://{listen['host']}:{listen['port']}"

    def key(self, name: str) -> str:
        return (self.keys / f"{name}.key").read_text().strip()

    def listed(self) -> dict[str, Any]:
        res = subprocess.run(
            [str(self.bin), "keys", "list", "--config", str(self.config), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return {k["name"]: k for k in json.loads(res.stdout)}


def test_host_stage_leaves_this_machine_ready_to_serve(deployment: Deployment, tmp_path: Path) -> None:
    agent = InstalledAgent(deployment.state_dir)
    assert "PLAY [Configure the GPU hosts]" in deployment.runs[0].stdout
    for name in ("demo-operator", "demo-user"):
        assert (agent.keys / f"{name}.key").stat().st_mode & 0o777 == 0o600
        for run in deployment.runs:
            assert agent.key(name) not in run.output, f"the key {name} appears in the output of {run.args}"
    proc = Proc([str(agent.bin), "serve", "--config", str(agent.config)], tmp_path / "agent.log")
    try:
        wait_until(lambda: http("GET", agent.url + "/readyz")[0] == 200, 60, "the installed agent's /readyz")
        code, body, _headers = http("GET", agent.url + "/api/tags", headers=bearer(agent.key("demo-user")))
        assert code == 200 and [m["name"] for m in body["models"]] == ["tinyllama:latest"], body
        assert http("GET", agent.url + "/api/tags")[0] == 401
    finally:
        proc.stop()


def test_a_key_taken_off_the_list_is_revoked_on_the_host(deployment: Deployment) -> None:
    agent = InstalledAgent(deployment.state_dir)
    before = agent.listed()
    assert before["demo-user"]["revoked"] is None and before["demo-operator"]["revoked"] is None
    only_operator = json.dumps({"llmfleet_agent_keys": [{"name": "demo-operator", "role": "operator"}]})
    run = deployment.play("playbooks/configure.yml", "-e", only_operator)
    assert run.returncode == 0, run.output[-5000:]
    assert "Revoke the keys that are not declared" in run.stdout and "demo-user" in run.stdout
    after = agent.listed()
    assert after["demo-user"]["revoked"] is not None, after
    assert after["demo-operator"]["revoked"] is None, after
    again = deployment.play("playbooks/configure.yml", "-e", only_operator)
    assert again.returncode == 0 and again.recap()["changed"] == 0, again.output[-5000:]


def tagged(aws: Any) -> list[str]:
    """Everything the emulator still holds for the deployment, by kind."""
    ec2 = aws("ec2")
    left = [v["VpcId"] for v in ec2.describe_vpcs(Filters=[TAG])["Vpcs"]]
    left += [s["SubnetId"] for s in ec2.describe_subnets(Filters=[TAG])["Subnets"]]
    left += [g["GroupId"] for g in ec2.describe_security_groups(Filters=[TAG])["SecurityGroups"]]
    left += [
        i["InstanceId"]
        for r in ec2.describe_instances(Filters=[TAG])["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    ]
    left += [
        n["NatGatewayId"]
        for n in ec2.describe_nat_gateways()["NatGateways"]
        if n["State"] not in ("deleted", "deleting")
        and {"Key": "llmfleet:deployment", "Value": DEPLOYMENT} in n.get("Tags", [])
    ]
    left += [
        d["DBInstanceIdentifier"]
        for d in aws("rds").describe_db_instances()["DBInstances"]
        if d["DBInstanceIdentifier"].startswith(f"{DEPLOYMENT}-")
    ]
    left += [d["DirectoryId"] for d in aws("ds").describe_directories()["DirectoryDescriptions"]]
    left += [
        s["Name"]
        for s in aws("secretsmanager").list_secrets()["SecretList"]
        if s["Name"].startswith(f"llmfleet/{DEPLOYMENT}/")
    ]
    left += [
        r["RoleName"] for r in aws("iam").list_roles()["Roles"] if r["RoleName"].startswith(f"{DEPLOYMENT}-")
    ]
    left += [
        p["InstanceProfileName"]
        for p in aws("iam").list_instance_profiles()["InstanceProfiles"]
        if p["InstanceProfileName"].startswith(f"{DEPLOYMENT}-")
    ]
    return left


def test_teardown_needs_confirmation_then_removes_everything(deployment: Deployment, aws: Any) -> None:
    refused = deployment.play("playbooks/teardown.yml")
    assert refused.returncode != 0 and "confirm_teardown" in refused.output
    assert tagged(aws), "the refused teardown removed something"
    for attempt in (1, 2):  # running it twice is fine
        run = deployment.play("playbooks/teardown.yml", "-e", f"confirm_teardown={DEPLOYMENT}")
        assert run.returncode == 0, f"teardown {attempt}: {run.output[-5000:]}"
    assert tagged(aws) == []
