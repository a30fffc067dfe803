"""site.yml against the emulator, end to end: build, converge (changed=0), check mode, what AWS holds,
the summary, this machine configured as the GPU host (inventories/local), and teardown. The tests run in
file order on one deployment, in an emulator of their own that starts empty: the first site.yml run finds
its GPU host as production does, through the aws_ec2 inventory, after creating it.

The deployment runs as production does, on the shared PostgreSQL store (llmfleet_store=postgresql): its
RDS instance is a real PostgreSQL server (the emulator's LLMFLEET_EMULATOR_RDS_POSTGRES: the master role
it makes is no superuser, as on RDS), reached with TLS verified against a CA bundle given as the RDS one.
With directory logins (llmfleet_directory_logins): its AWS Managed Microsoft AD is a real Samba domain
controller (LLMFLEET_EMULATOR_DIRECTORY_SAMBA), where the directory stage makes the groups and the service
account through the emulated Directory Service Data API, and the agent signs people in against it."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent_fleet import bearer, free_port, http, https, wait_until
from conftest import client_factory, running_emulator
from iam_grants import SESSION_MANAGER, SESSION_MANAGER_ONLY, role_grants
from playbook_runs import PlaybookRun, ansible_playbook
from postgres import PostgresServer
from samba import SambaDC
from support import Proc

pytestmark = pytest.mark.slow

DEPLOYMENT = "itest"
TAG = {"Name": "tag:llmfleet:deployment", "Values": [DEPLOYMENT]}
DEPLOYMENT_TAG = {"Key": "llmfleet:deployment", "Value": DEPLOYMENT}


class Deployment:
    def __init__(self, endpoint: str, state_dir: Path, database: PostgresServer, dc: SambaDC) -> None:
        # the inventory (its group_vars and its aws_ec2 file alike) takes the deployment from the environment
        self.env = {"AWS_ENDPOINT_URL": endpoint, "LLMFLEET_DEPLOYMENT": DEPLOYMENT}
        self.state_dir = state_dir
        # the host stage configures this machine: ports nothing else uses (the demo's are 8443, 21434)
        self.agent_port = free_port()
        self.extra = [
            *("-e", f"llmfleet_state_dir={state_dir}"),
            *("-e", f"llmfleet_agent_port={self.agent_port}"),
            *("-e", f"llmfleet_agent_ollama_port={free_port()}"),
            *("-e", f"llmfleet_gateway_port={free_port()}"),
            # the agent serves HTTPS with its own certificate, as on AWS, and the gateway verifies it
            *("-e", "llmfleet_agent_tls=true"),
            # the shared store, on the server behind the emulator's RDS instance
            *("-e", "llmfleet_store=postgresql"),
            *("-e", f"llmfleet_database_port={database.port}"),
            *("-e", f"llmfleet_database_ca_bundle={database.ca}"),
            *("-e", "llmfleet_usage_retention=200d"),
            # directory logins, against the domain controller behind the emulator's directory
            *("-e", "llmfleet_directory_logins=true"),
            *("-e", f"llmfleet_directory_ldaps_ca_bundle={dc.ca}"),
        ]
        self.database = database
        self.dc = dc
        self.runs: list[PlaybookRun] = []

    def play(self, playbook: str, *args: str) -> PlaybookRun:
        run = ansible_playbook(playbook, *self.extra, *args, env=self.env)
        self.runs.append(run)
        return run


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """The PostgreSQL server the emulator's RDS instance is (an empty cluster)."""
    server = PostgresServer(tmp_path_factory.mktemp("rds")).start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="module")
def dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SambaDC]:
    """The domain controller behind the emulator's Managed AD directory (Samba: one test DC per machine)."""
    directory = SambaDC(tmp_path_factory.mktemp("ad")).start()
    try:
        yield directory
    finally:
        directory.destroy()


@pytest.fixture(scope="module")
def aws_endpoint(
    tmp_path_factory: pytest.TempPathFactory, database: PostgresServer, dc: SambaDC
) -> Iterator[str]:
    """This module's own emulator, empty at the start (as a fresh account), its RDS backed by `database`,
    its directory by `dc`."""
    samba = {
        "url": dc.ldaps_url,
        "ca": str(dc.ca),
        "server_name": dc.realm,
        "user": dc.admin_upn,
        "password": dc.admin_password,
    }
    settings = {
        "LLMFLEET_EMULATOR_RDS_POSTGRES": database.admin_dsn(),
        "LLMFLEET_EMULATOR_DIRECTORY_SAMBA": json.dumps(samba),
    }
    with running_emulator(tmp_path_factory, settings) as url:
        yield url


@pytest.fixture(scope="module")
def aws(aws_endpoint: str) -> Any:
    return client_factory(aws_endpoint)


@pytest.fixture(scope="module")
def deployment(
    aws_endpoint: str,
    aws: Any,
    tmp_path_factory: pytest.TempPathFactory,
    database: PostgresServer,
    dc: SambaDC,
) -> Iterator[Deployment]:
    assert aws("ec2").describe_instances()["Reservations"] == []  # nothing there before the run
    dep = Deployment(aws_endpoint, tmp_path_factory.mktemp("state"), database, dc)
    first = dep.play("site.yml", "-v")
    assert first.returncode == 0, first.output[-5000:]
    yield dep


def test_one_run_finds_the_gpu_host_it_made_through_the_aws_ec2_inventory(
    deployment: Deployment, aws: Any
) -> None:
    """The inventory had no GPU host when the first run started; it configured the one it created."""
    first = deployment.runs[0]
    gpu_a = [
        instance
        for reservation in aws("ec2").describe_instances(
            Filters=[TAG, {"Name": "tag:llmfleet:host", "Values": ["gpu-a"]}]
        )["Reservations"]
        for instance in reservation["Instances"]
    ]
    assert len(gpu_a) == 1
    address = gpu_a[0]["PrivateIpAddress"]
    assert f"ok: [{address}]" in first.output or f"changed: [{address}]" in first.output
    assert first.recap(address)["failed"] == 0, first.output[-5000:]
    config = yaml.safe_load((deployment.state_dir / "host/etc/llmfleet/agent.yaml").read_text())
    assert config["listen"]["port"] == deployment.agent_port


def test_second_run_changes_nothing(deployment: Deployment) -> None:
    second = deployment.play("site.yml")
    assert second.returncode == 0, second.output[-5000:]
    assert second.totals()["changed"] == 0, second.output[-8000:]


def test_check_mode_on_a_converged_deployment_changes_nothing(deployment: Deployment) -> None:
    check = deployment.play("site.yml", "--check")
    assert check.returncode == 0, check.output[-5000:]
    assert check.totals()["changed"] == 0, check.output[-8000:]


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
    gateway = groups[f"{DEPLOYMENT}-gateway"]
    (rule,) = database["IpPermissions"]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 5432, 5432)
    assert sorted(p["GroupId"] for p in rule["UserIdGroupPairs"]) == sorted(
        [agents["GroupId"], gateway["GroupId"]]
    )
    assert rule["IpRanges"] == []
    (agent_rule,) = agents["IpPermissions"]  # no SSH: no CIDR was given for it
    assert agent_rule["FromPort"] == agent_rule["ToPort"] == deployment.agent_port
    assert [r["CidrIp"] for r in agent_rule["IpRanges"]] == ["10.42.0.0/16"]
    assert [p["GroupId"] for p in agent_rule["UserIdGroupPairs"]] == [gateway["GroupId"]]
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
    # directory_vpc_dns=none (the default): the VPC keeps its own resolver, no host's DNS needs the directory
    ec2 = aws("ec2")
    options_id = ec2.describe_vpcs(VpcIds=[vpc_id(aws)])["Vpcs"][0].get("DhcpOptionsId", "default")
    if options_id != "default":
        options = ec2.describe_dhcp_options(DhcpOptionsIds=[options_id])["DhcpOptions"][0]
        servers = [
            v["Value"]
            for c in options["DhcpConfigurations"]
            if c["Key"] == "domain-name-servers"
            for v in c["Values"]
        ]
        assert not set(servers) & set(directory["DnsIpAddrs"]), servers


def test_gpu_instances_run_in_private_subnets_with_profile_and_tags(deployment: Deployment, aws: Any) -> None:
    ec2 = aws("ec2")
    reservations = ec2.describe_instances(
        Filters=[
            TAG,
            {"Name": "tag:llmfleet:role", "Values": ["gpu-host"]},
            {"Name": "instance-state-name", "Values": ["running"]},
        ]
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


CLOUDWATCH_AGENT = "arn:aws:iam::aws:policy/CloudWatchAgentServerPolicy"


def test_gpu_hosts_role_grants_session_manager_and_nothing_else(deployment: Deployment, aws: Any) -> None:
    """The hosts read no secret and no parameter, and run no CloudWatch agent: Session Manager only."""
    assert role_grants(aws, f"{DEPLOYMENT}-gpu-host") == {
        "managed": [],
        "inline": {"llmfleet-gpu-host": SESSION_MANAGER_ONLY},
    }
    (profile,) = [
        p
        for p in aws("iam").list_instance_profiles()["InstanceProfiles"]
        if p["InstanceProfileName"] == f"{DEPLOYMENT}-gpu-host"
    ]
    assert [r["RoleName"] for r in profile["Roles"]] == [f"{DEPLOYMENT}-gpu-host"]


def test_a_secret_the_hosts_read_is_granted_by_one_list_entry(deployment: Deployment, aws: Any) -> None:
    account = aws("sts").get_caller_identity()["Account"]
    role = f"{DEPLOYMENT}-gpu-host"
    # what a version before 0.2 granted: Session Manager as the managed policy, the reads in another policy
    iam = aws("iam")
    old_core = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
    iam.attach_role_policy(RoleName=role, PolicyArn=old_core)
    old_policy = json.dumps(SESSION_MANAGER_ONLY)
    iam.put_role_policy(RoleName=role, PolicyName="llmfleet-deployment-config", PolicyDocument=old_policy)
    grants = {
        "llmfleet_gpu_readable_secrets": ["database-gpu-host"],
        "llmfleet_gpu_readable_parameters": ["agent/log-level"],
        "llmfleet_gpu_cloudwatch_agent": True,
    }
    run = deployment.play("playbooks/gpu_hosts.yml", "-e", json.dumps(grants))
    assert run.returncode == 0, run.output[-5000:]
    assert role_grants(aws, role) == {
        "managed": [CLOUDWATCH_AGENT],
        "inline": {
            "llmfleet-gpu-host": {
                "Version": "2012-10-17",
                "Statement": [
                    SESSION_MANAGER,
                    {
                        "Sid": "ReadOwnSecrets",
                        "Effect": "Allow",
                        "Action": ["secretsmanager:GetSecretValue"],
                        # exactly that secret: AWS appends six random characters to a secret's ARN
                        "Resource": [
                            f"arn:aws:secretsmanager:*:{account}:secret:llmfleet/{DEPLOYMENT}/database-gpu-host-??????"
                        ],
                    },
                    {
                        "Sid": "ReadOwnParameters",
                        "Effect": "Allow",
                        "Action": ["ssm:GetParameter", "ssm:GetParameters"],
                        "Resource": [
                            f"arn:aws:ssm:*:{account}:parameter/llmfleet/{DEPLOYMENT}/agent/log-level"
                        ],
                    },
                ],
            }
        },
    }
    # back to the deployment's own description: the grants go again
    back = deployment.play("playbooks/gpu_hosts.yml")
    assert back.returncode == 0, back.output[-5000:]
    assert role_grants(aws, role) == {"managed": [], "inline": {"llmfleet-gpu-host": SESSION_MANAGER_ONLY}}


def test_passwords_are_in_secrets_manager_and_never_in_the_output(deployment: Deployment, aws: Any) -> None:
    secrets = aws("secretsmanager")
    for suffix in (
        "directory-admin",
        "directory-service",
        "database-master",
        "database-owner",
        "database-agent",
    ):
        name = f"llmfleet/{DEPLOYMENT}/{suffix}"
        value = secrets.get_secret_value(SecretId=name)["SecretString"]
        assert len(value) >= 16
        for run in deployment.runs:
            assert value not in run.output, f"{name} appears in the output of {run.args}"


def test_summary_is_printed_and_written(deployment: Deployment, aws: Any) -> None:
    outputs = json.loads((deployment.state_dir / "outputs.json").read_text())
    assert outputs["deployment"] == DEPLOYMENT and outputs["vpc_id"] == vpc_id(aws)
    assert len(outputs["private_subnet_ids"]) == 2
    assert outputs["directory"]["id"].startswith("d-") and len(outputs["directory"]["dns_ip_addrs"]) == 2
    assert outputs["directory"]["ldaps_urls"] == [
        f"ldaps://{ip}:636" for ip in outputs["directory"]["dns_ip_addrs"]
    ]
    assert outputs["database"]["endpoint"] and outputs["database"]["port"] == deployment.database.port
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
        config = yaml.safe_load(self.config.read_text())
        listen = config["listen"]
        # TLS as on AWS: the host's self-signed certificate, fetched to the controller by instance id
        self.cafile = state_dir / "agent-certs" / f"{config['host_id']}.crt" if "tls" in listen else None
        self.url = f"{'https' if self.cafile else 'http'}://{listen['host']}:{listen['port']}"

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        """(status, body) of a request to the installed agent, its certificate verified."""
        if self.cafile is None:
            return http(method, self.url + path, body, headers=headers)[:2]
        return https(method, self.url + path, self.cafile, body, headers=headers)

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
        wait_until(lambda: agent.call("GET", "/readyz")[0] == 200, 60, "the installed agent's /readyz")
        code, body = agent.call("GET", "/api/tags", headers=bearer(agent.key("demo-user")))
        assert code == 200 and [m["name"] for m in body["models"]] == ["tinyllama:latest"], body
        assert agent.call("GET", "/api/tags")[0] == 401
        # the record reaches the shared database, naming this host (its instance id)
        body = {"model": "tinyllama:latest", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
        code, _answer = agent.call("POST", "/api/generate", body, headers=bearer(agent.key("demo-user")))
        assert code == 200
        query = "SELECT count(*) FROM usage WHERE route = '/api/generate' AND host LIKE 'i-%'"
        wait_until(
            lambda: deployment.database.psql(query, "llmfleet") == "1", 30, "the usage record in PostgreSQL"
        )
    finally:
        proc.stop()


class InstalledGateway:
    """The gateway the host stage installed on the gateway instance this machine also plays."""

    def __init__(self, state_dir: Path) -> None:
        self.config_path = state_dir / "gateway" / "etc" / "llmfleet" / "agent.yaml"
        self.bin = state_dir / "gateway" / "opt" / "llmfleet-agent" / "venv" / "bin" / "llmfleet-agent"
        self.config = yaml.safe_load(self.config_path.read_text())
        self.url = f"http://{self.config['listen']['host']}:{self.config['listen']['port']}"


def test_the_gateway_stage_installs_the_gateway_and_it_serves_the_fleet(
    deployment: Deployment, aws: Any, tmp_path: Path
) -> None:
    """site.yml made a gateway instance, installed `llmfleet-agent gateway` on it (here: this machine) with
    the shared store and its own key as a root-only credential file, and told the agents to accept that key
    from the gateway only; through it a caller's request reaches the agent and leaves one record, the
    agent's, naming the GPU host."""
    (instance,) = instances(
        aws,
        {"Name": "tag:llmfleet:role", "Values": ["gateway"]},
        {"Name": "instance-state-name", "Values": ["running"]},
    )
    outputs = json.loads((deployment.state_dir / "outputs.json").read_text())
    assert outputs["gateways"][0]["instance_id"] == instance["InstanceId"]
    assert (
        "endpoint" in deployment.runs[0].stdout
        and "PLAY [Configure the gateways]" in deployment.runs[0].stdout
    )
    agent, gateway = InstalledAgent(deployment.state_dir), InstalledGateway(deployment.state_dir)
    agent_config = yaml.safe_load(agent.config.read_text())
    assert agent_config["auth"]["gateway_sources"] == ["127.0.0.1/32"]
    assert gateway.config["host_id"] == instance["InstanceId"] and "ollama" not in gateway.config
    # the fleet's shared store (the same server, database and role; each host has its own CA file's path)
    assert gateway.config["store"]["url"].split("?")[0] == agent_config["store"]["url"].split("?")[0]
    # the agents' certificates verify them (TLS on, as on AWS)
    assert Path(gateway.config["gateway"]["agent_ca_file"]).read_text() == agent.cafile.read_text()
    key_file = Path(gateway.config["gateway"]["key_file"])
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_text() == agent.key("gateway")
    for run in deployment.runs:
        assert agent.key("gateway") not in run.output
    unit = (deployment.state_dir / "gateway/etc/systemd/system/llmfleet-agent.service").read_text()
    assert f"llmfleet-agent gateway --config {gateway.config_path}" in unit
    assert f"LoadCredential=gateway-key:{key_file}" in unit

    agent_proc = Proc([str(agent.bin), "serve", "--config", str(agent.config)], tmp_path / "agent.log")
    gateway_proc = Proc(
        [str(gateway.bin), "gateway", "--config", str(gateway.config_path)], tmp_path / "gateway.log"
    )
    try:
        user = bearer(agent.key("demo-user"))

        def fleet_models() -> list[str]:
            code, body, _headers = http("GET", gateway.url + "/api/tags", headers=user)
            return [m["name"] for m in body["models"]] if code == 200 else []

        wait_until(lambda: fleet_models() == ["tinyllama:latest"], 60, "the gateway's view of the fleet")
        body = {"model": "tinyllama:latest", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
        code, answer, headers = http("POST", gateway.url + "/api/generate", body, headers=user)
        assert code == 200, answer
        request_id = headers["X-Request-Id"]
        query = f"SELECT host FROM usage WHERE request_id = '{request_id}'"
        wait_until(
            lambda: deployment.database.psql(query, "llmfleet") == agent_config["host_id"],
            30,
            "one usage record, the GPU host's",
        )
        # the gateway's key is no caller's: from the gateway it acts only for the caller it names
        assert http("GET", gateway.url + "/api/tags", headers=bearer(agent.key("gateway")))[0] == 403
    finally:
        gateway_proc.stop()
        agent_proc.stop()


def secret(aws: Any, name: str) -> str:
    return str(
        aws("secretsmanager").get_secret_value(SecretId=f"llmfleet/{DEPLOYMENT}/{name}")["SecretString"]
    )


def test_the_database_gets_an_owner_and_an_agent_role_through_the_host(deployment: Deployment) -> None:
    """db setup ran once through the GPU host with the master credential (no superuser, as on RDS): the
    owner owns the database, the agent role may only do what an agent does, PUBLIC may not connect; db
    upgrade applied the schema and the deployment's retention."""
    db = deployment.database
    roles = db.psql(
        "SELECT rolname, rolsuper, rolcreaterole FROM pg_roles WHERE rolname LIKE 'llmfleet%' ORDER BY 1"
    ).splitlines()
    assert roles == [
        "llmfleet_admin|f|t",  # the master, made by the emulator as RDS makes it
        "llmfleet_agent|f|f",
        "llmfleet_agent_access|f|f",
        "llmfleet_owner|f|f",
    ]
    assert (
        db.psql("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'llmfleet'")
        == "llmfleet_owner"
    )
    assert db.psql("SELECT pg_has_role('llmfleet_agent', 'llmfleet_agent_access', 'MEMBER')") == "t"
    assert db.psql("SELECT pg_has_role('llmfleet_agent', 'llmfleet_owner', 'MEMBER')") == "f"
    assert db.psql("SELECT has_database_privilege('public', 'llmfleet', 'CONNECT')") == "f"
    settings = db.psql(
        "SELECT name, (extract(epoch FROM value) / 86400)::int FROM llmfleet_settings ORDER BY 1", "llmfleet"
    )
    assert settings.splitlines() == ["audit_retention|90", "usage_retention|200"]
    names = db.psql("SELECT name FROM keys WHERE revoked IS NULL ORDER BY name", "llmfleet").splitlines()
    # the declared keys and the gateways' own, written once for the fleet (not again by the gateway)
    assert names == ["demo-operator", "demo-user", "gateway"]


def test_the_host_keeps_only_the_agent_password_and_verifies_the_server(
    deployment: Deployment, aws: Any
) -> None:
    host = deployment.state_dir / "host"
    config_text = (host / "etc/llmfleet/agent.yaml").read_text()
    store = yaml.safe_load(config_text)["store"]
    ca = host / "etc/llmfleet/db-ca.pem"
    assert store["url"] == (
        f"postgresql://llmfleet_agent@127.0.0.1:{deployment.database.port}/llmfleet"
        f"?sslmode=verify-full&sslrootcert={ca}"
    )
    assert ca.read_bytes() == Path(deployment.database.ca).read_bytes()
    password_file = Path(store["password_file"])
    assert password_file == host / "etc/llmfleet/credentials/db-password"
    assert password_file.stat().st_mode & 0o777 == 0o600
    assert password_file.parent.stat().st_mode & 0o777 == 0o700
    assert password_file.read_text() == secret(aws, "database-agent")
    # neither the master's nor the owner's password is anywhere on the host, nor any password in the config
    others = [secret(aws, "database-master").encode(), secret(aws, "database-owner").encode()]
    for directory in (host / "etc", host / "var"):
        for path in (p for p in directory.rglob("*") if p.is_file() and not p.is_symlink()):
            content = path.read_bytes()
            assert not any(other in content for other in others), f"a database password is in {path}"
    assert secret(aws, "database-agent") not in config_text


def test_people_sign_in_against_the_directory_the_deployment_built(
    deployment: Deployment, aws: Any, tmp_path: Path
) -> None:
    """The directory stage made the groups and the service account (ds-data, from the controller); the host
    stage wrote auth.ldap from the directory's outputs (its controllers by address, verified against the
    domain's name; the password a root-only credential file) and checked it from the host; a person put in
    a group by the company's admins then mints a personal key and uses it."""
    dc = deployment.dc
    ou = f"OU=Users,OU=CORP,{dc.base_dn}"
    for group in ("llmfleet-users", "llmfleet-operators", "llmfleet-admins"):
        assert f"CN={group},{ou}" in dc.search(f"(sAMAccountName={group})", "dn")
    host = deployment.state_dir / "host"
    config_text = (host / "etc/llmfleet/agent.yaml").read_text()
    ldap = yaml.safe_load(config_text)["auth"]["ldap"]
    assert ldap["urls"] == ["ldaps://127.0.0.1:636", "ldaps://127.0.0.1:636"]  # the controllers' addresses
    assert ldap["server_name"] == "corp.example.com" and ldap["base_dn"] == dc.base_dn
    assert ldap["bind_user"] == "llmfleet-svc@corp.example.com"
    assert ldap["groups"]["llmfleet-operators"] == {"role": "operator", "models": []}
    password_file = Path(ldap["bind_password_file"])
    assert password_file == host / "etc/llmfleet/credentials/ldap-password"
    assert password_file.stat().st_mode & 0o777 == 0o600
    assert password_file.read_text() == secret(aws, "directory-service")
    assert secret(aws, "directory-service") not in config_text
    assert Path(ldap["ca_file"]).read_bytes() == Path(dc.ca).read_bytes()
    unit = (host / "etc/systemd/system/llmfleet-agent.service").read_text()
    assert f"LoadCredential=ldap-password:{password_file}" in unit
    assert "Reach the directory (llmfleet-agent ldap check)" in deployment.runs[0].stdout

    dc.add_user("frank", "Frank-Pass-123", mail="frank@corp.example.com")
    dc.add_member("llmfleet-operators", "frank")
    agent = InstalledAgent(deployment.state_dir)
    proc = Proc([str(agent.bin), "serve", "--config", str(agent.config)], tmp_path / "agent.log")
    try:
        wait_until(lambda: agent.call("GET", "/readyz")[0] == 200, 60, "the installed agent's /readyz")
        frank = {"Authorization": "Basic " + base64.b64encode(b"frank:Frank-Pass-123").decode()}
        code, minted = agent.call("POST", "/agent/keys", {"name": "laptop"}, headers=frank)
        assert code == 201, minted
        assert minted["owner"] == "frank@corp.example.com" and minted["role"] == "operator"
        assert agent.call("GET", "/api/tags", headers=bearer(minted["key"]))[0] == 200
        wrong = {"Authorization": "Basic " + base64.b64encode(b"frank:Wrong-Pass-1").decode()}
        assert agent.call("POST", "/agent/keys", {}, headers=wrong)[0] == 401
    finally:
        proc.stop()


def test_a_key_taken_off_the_list_is_revoked_on_the_host(deployment: Deployment) -> None:
    agent = InstalledAgent(deployment.state_dir)
    before = agent.listed()
    assert before["demo-user"]["revoked"] is None and before["demo-operator"]["revoked"] is None
    only_operator = json.dumps({"llmfleet_agent_keys": [{"name": "demo-operator", "role": "operator"}]})
    run = deployment.play("playbooks/configure.yml", "-e", only_operator)
    assert run.returncode == 0, run.output[-5000:]
    assert "Revoke the keys that are not declared" in run.stdout
    after = agent.listed()
    assert after["demo-user"]["revoked"] is not None, after
    assert after["demo-operator"]["revoked"] is None, after
    again = deployment.play("playbooks/configure.yml", "-e", only_operator)
    assert again.returncode == 0 and again.totals()["changed"] == 0, again.output[-5000:]


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


def instances(aws: Any, *filters: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = aws("ec2").describe_instances(Filters=[TAG, *filters])["Reservations"]
    return [i for r in reservations for i in r["Instances"]]


def footprint(aws: Any) -> dict[str, set[str]]:
    """The ids of what the deployment holds that a tag or a name prefix does not find after a teardown:
    what lives in its VPC, its instances' volumes and spot requests, its NAT gateways' addresses."""
    ec2 = aws("ec2")
    vpcs = {v["VpcId"] for v in ec2.describe_vpcs(Filters=[TAG])["Vpcs"]}
    subnets = {s["SubnetId"] for s in ec2.describe_subnets(Filters=[TAG])["Subnets"]}
    hosts = instances(aws)
    nats = [n for n in ec2.describe_nat_gateways()["NatGateways"] if n["VpcId"] in vpcs]
    return {
        "vpcs": vpcs,
        "subnets": subnets,
        "instances": {i["InstanceId"] for i in hosts},
        "volumes": {m["Ebs"]["VolumeId"] for i in hosts for m in i.get("BlockDeviceMappings", [])},
        "spot requests": {i["SpotInstanceRequestId"] for i in hosts if i.get("SpotInstanceRequestId")},
        "nat gateways": {n["NatGatewayId"] for n in nats},
        "addresses": {a["AllocationId"] for n in nats for a in n.get("NatGatewayAddresses", [])},
    }


def leftovers(aws: Any, before: dict[str, set[str]]) -> list[str]:
    """Everything of the deployment the emulator still holds that bills or blocks, as "kind id", by every
    resource type site.yml creates: by the deployment's tag or name prefix, and by the ids in `before`."""
    ec2, prefix = aws("ec2"), f"{DEPLOYMENT}-"
    vpcs, subnets = before["vpcs"], before["subnets"]
    left = [f"vpc {v['VpcId']}" for v in ec2.describe_vpcs()["Vpcs"] if v["VpcId"] in vpcs]
    left += [f"vpc {v['VpcId']}" for v in ec2.describe_vpcs(Filters=[TAG])["Vpcs"] if v["VpcId"] not in vpcs]
    left += [f"subnet {s['SubnetId']}" for s in ec2.describe_subnets()["Subnets"] if s["SubnetId"] in subnets]
    left += [f"subnet {s['SubnetId']}" for s in ec2.describe_subnets(Filters=[TAG])["Subnets"]]
    left += [
        f"security group {g['GroupId']}"
        for g in ec2.describe_security_groups()["SecurityGroups"]
        if g.get("VpcId") in vpcs or DEPLOYMENT_TAG in g.get("Tags", [])
    ]
    left += [
        f"instance {i['InstanceId']} ({i['State']['Name']})"
        for r in ec2.describe_instances()["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
        and (
            i.get("SubnetId") in subnets
            or i["InstanceId"] in before["instances"]
            or DEPLOYMENT_TAG in i.get("Tags", [])
        )
    ]
    left += [
        f"spot request {r['SpotInstanceRequestId']} ({r['State']})"
        for r in ec2.describe_spot_instance_requests()["SpotInstanceRequests"]
        if r["State"] in ("open", "active", "disabled")
        and (
            r["SpotInstanceRequestId"] in before["spot requests"]
            or r.get("InstanceId") in before["instances"]
            or r["LaunchSpecification"].get("SubnetId") in subnets
        )
    ]
    left += [
        f"volume {v['VolumeId']}"
        for v in ec2.describe_volumes()["Volumes"]
        if v["VolumeId"] in before["volumes"] and v["State"] != "deleted"
    ]
    left += [
        f"network interface {n['NetworkInterfaceId']}"
        for n in ec2.describe_network_interfaces()["NetworkInterfaces"]
        if n.get("SubnetId") in subnets
    ]
    left += [
        f"nat gateway {n['NatGatewayId']}"
        for n in ec2.describe_nat_gateways()["NatGateways"]
        if n["State"] not in ("deleted", "deleting")
        and (n["NatGatewayId"] in before["nat gateways"] or n["VpcId"] in vpcs)
    ]
    left += [
        f"address {a['AllocationId']}"
        for a in ec2.describe_addresses()["Addresses"]
        if a["AllocationId"] in before["addresses"] or DEPLOYMENT_TAG in a.get("Tags", [])
    ]
    left += [
        f"route table {t['RouteTableId']}"
        for t in ec2.describe_route_tables()["RouteTables"]
        if t["VpcId"] in vpcs or DEPLOYMENT_TAG in t.get("Tags", [])
    ]
    left += [
        f"internet gateway {g['InternetGatewayId']}"
        for g in ec2.describe_internet_gateways()["InternetGateways"]
        if {a["VpcId"] for a in g.get("Attachments", [])} & vpcs or DEPLOYMENT_TAG in g.get("Tags", [])
    ]
    left += [
        f"vpc endpoint {e['VpcEndpointId']}"
        for e in ec2.describe_vpc_endpoints()["VpcEndpoints"]
        if e["VpcId"] in vpcs and e["State"].lower() not in ("deleted", "deleting")
    ]
    left += [
        f"dhcp options {d['DhcpOptionsId']}" for d in ec2.describe_dhcp_options(Filters=[TAG])["DhcpOptions"]
    ]
    left += [
        f"launch template {t['LaunchTemplateName']}"
        for t in ec2.describe_launch_templates()["LaunchTemplates"]
        if t["LaunchTemplateName"].startswith(prefix)
    ]
    left += [
        f"key pair {k['KeyName']}"
        for k in ec2.describe_key_pairs()["KeyPairs"]
        if k["KeyName"].startswith(prefix)
    ]
    elb = aws("elbv2")
    left += [
        f"load balancer {b['LoadBalancerName']}"
        for b in elb.describe_load_balancers()["LoadBalancers"]
        if b["VpcId"] in vpcs or b["LoadBalancerName"].startswith(prefix)
    ]
    left += [
        f"target group {g['TargetGroupName']}"
        for g in elb.describe_target_groups()["TargetGroups"]
        if g.get("VpcId") in vpcs or g["TargetGroupName"].startswith(prefix)
    ]
    iam = aws("iam")
    left += [
        f"iam role {r['RoleName']}" for r in iam.list_roles()["Roles"] if r["RoleName"].startswith(prefix)
    ]
    left += [
        f"instance profile {p['InstanceProfileName']}"
        for p in iam.list_instance_profiles()["InstanceProfiles"]
        if p["InstanceProfileName"].startswith(prefix)
    ]
    left += [
        f"directory {d['DirectoryId']}"
        for d in aws("ds").describe_directories()["DirectoryDescriptions"]
        if d["Name"] == "corp.example.com" or d.get("VpcSettings", {}).get("VpcId") in vpcs
    ]
    rds = aws("rds")
    left += [
        f"db instance {d['DBInstanceIdentifier']}"
        for d in rds.describe_db_instances()["DBInstances"]
        if d["DBInstanceIdentifier"].startswith(prefix)
    ]
    left += [
        f"db subnet group {g['DBSubnetGroupName']}"
        for g in rds.describe_db_subnet_groups()["DBSubnetGroups"]
        if g["DBSubnetGroupName"].startswith(prefix)
    ]
    left += [
        f"db parameter group {g['DBParameterGroupName']}"
        for g in rds.describe_db_parameter_groups()["DBParameterGroups"]
        if g["DBParameterGroupName"].startswith(prefix)
    ]
    # not production: no final snapshot is kept
    left += [
        f"db snapshot {s['DBSnapshotIdentifier']}"
        for s in rds.describe_db_snapshots()["DBSnapshots"]
        if s["DBSnapshotIdentifier"].startswith(prefix)
    ]
    # a secret scheduled for deletion is on its way out (and not billed): only the others count
    left += [
        f"secret {s['Name']}"
        for s in aws("secretsmanager").list_secrets(IncludePlannedDeletion=True)["SecretList"]
        if s["Name"].startswith(f"llmfleet/{DEPLOYMENT}/") and "DeletedDate" not in s
    ]
    parameters = aws("ssm").get_parameters_by_path(Path=f"/llmfleet/{DEPLOYMENT}", Recursive=True)[
        "Parameters"
    ]
    left += [f"parameter {p['Name']}" for p in parameters]
    return left


def test_teardown_needs_confirmation_then_removes_everything(deployment: Deployment, aws: Any) -> None:
    refused = deployment.play("playbooks/teardown.yml")
    assert refused.returncode != 0 and "confirm_teardown" in refused.output
    assert tagged(aws), "the refused teardown removed something"

    # what teardown must handle too. A spot host that the idle sweep stopped: its persistent request is then
    # `disabled`, and terminating the host without cancelling it launches a new one (subnets cannot go, the
    # bill goes on). A key's secret that no list names any more, and a parameter of the deployment.
    ec2 = aws("ec2")
    (spot_host,) = instances(aws, {"Name": "tag:llmfleet:host", "Values": ["gpu-b"]})
    request_id = spot_host["SpotInstanceRequestId"]
    ec2.stop_instances(InstanceIds=[spot_host["InstanceId"]])
    (request,) = ec2.describe_spot_instance_requests(SpotInstanceRequestIds=[request_id])[
        "SpotInstanceRequests"
    ]
    assert (request["State"], request["Type"]) == ("disabled", "persistent")
    secrets = aws("secretsmanager")
    secrets.create_secret(Name=f"llmfleet/{DEPLOYMENT}/agent-key/retired", SecretString="k" * 48)
    aws("ssm").put_parameter(Name=f"/llmfleet/{DEPLOYMENT}/agent/log-level", Value="info", Type="String")
    before = footprint(aws)
    assert before["spot requests"] == {request_id} and before["addresses"] and before["volumes"]
    assert leftovers(aws, before), "nothing to tear down"

    for attempt in (1, 2):  # running it twice is fine
        run = deployment.play("playbooks/teardown.yml", "-e", f"confirm_teardown={DEPLOYMENT}")
        assert run.returncode == 0, f"teardown {attempt}: {run.output[-5000:]}"
    assert leftovers(aws, before) == []
    assert tagged(aws) == []
    (request,) = ec2.describe_spot_instance_requests(SpotInstanceRequestIds=[request_id])[
        "SpotInstanceRequests"
    ]
    assert request["State"] == "cancelled"
    # the database's passwords stay recoverable (final snapshots restore with those roles); no other does
    kept = [
        s
        for s in secrets.list_secrets(IncludePlannedDeletion=True)["SecretList"]
        if s["Name"].startswith(f"llmfleet/{DEPLOYMENT}/")
    ]
    assert sorted(s["Name"] for s in kept) == [
        f"llmfleet/{DEPLOYMENT}/database-{role}" for role in ("agent", "master", "owner")
    ]
    assert all("DeletedDate" in s for s in kept)
