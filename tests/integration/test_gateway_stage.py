"""The gateway stage (issue 14, part 2) against the emulator: the gateways' instances, IAM role, security
groups and, for two gateways with an ACM certificate, their Application Load Balancer (HTTPS listener with
the certificate, a target group of the gateways checked on /readyz); idempotent; scaled back to one
gateway without a certificate, the load balancer and the second gateway go, and the endpoint is the
gateway's own address. The gateway software on the instances is configure.yml's (test_site.py)."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import client_factory
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from emulators import running_emulator
from iam_grants import SESSION_MANAGER, role_grants
from playbook_runs import PlaybookRun, ansible_playbook

pytestmark = pytest.mark.slow

DEPLOYMENT = "gwstage"
USERS = "10.99.0.0/16"
PORT = 9443  # the gateways' port


def self_signed(name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


class Stage:
    def __init__(self, endpoint: str, state_dir: Path) -> None:
        self.env = {"AWS_ENDPOINT_URL": endpoint, "LLMFLEET_DEPLOYMENT": DEPLOYMENT}
        self.base = [
            *("-e", f"llmfleet_state_dir={state_dir}"),
            *("-e", json.dumps({"llmfleet_gateway_allowed_cidrs": [USERS]})),
            # the gateways serve HTTPS, as on AWS (inventories/local's demo gateway does not)
            *("-e", "llmfleet_gateway_tls=true"),
            *("-e", f"llmfleet_gateway_port={PORT}"),
        ]

    def play(self, playbook: str, *args: str) -> PlaybookRun:
        return ansible_playbook(playbook, *self.base, *args, env=self.env)

    def build(self, *args: str) -> list[PlaybookRun]:
        """The network (whose gateway rules follow the gateways' settings) then the gateways, as site.yml."""
        runs = [self.play("playbooks/network.yml", *args), self.play("playbooks/gateway.yml", *args)]
        for run in runs:
            assert run.returncode == 0, run.output[-5000:]
        return runs


@pytest.fixture(scope="module")
def aws_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """This module's own emulator, empty at the start (a fresh account)."""
    with running_emulator(tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="module")
def aws(aws_endpoint: str) -> Any:
    return client_factory(aws_endpoint)


@pytest.fixture(scope="module")
def certificate_arn(aws: Any) -> str:
    cert, key = self_signed("llm.corp.example.com")
    return aws("acm").import_certificate(Certificate=cert, PrivateKey=key)["CertificateArn"]


@pytest.fixture(scope="module")
def stage(aws_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Stage:
    stage = Stage(aws_endpoint, tmp_path_factory.mktemp("state"))
    network = stage.play("playbooks/network.yml")
    assert network.returncode == 0, network.output[-3000:]
    return stage


def two(certificate_arn: str) -> tuple[str, ...]:
    return ("-e", "llmfleet_gateway_count=2", "-e", f"llmfleet_certificate_arn={certificate_arn}")


@pytest.fixture(scope="module")
def two_gateways(stage: Stage, certificate_arn: str) -> PlaybookRun:
    return stage.build(*two(certificate_arn))[-1]


def gateways(aws: Any) -> list[dict[str, Any]]:
    filters = [
        {"Name": "tag:llmfleet:deployment", "Values": [DEPLOYMENT]},
        {"Name": "tag:llmfleet:role", "Values": ["gateway"]},
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
    ]
    found = aws("ec2").describe_instances(Filters=filters)["Reservations"]
    return sorted((i for r in found for i in r["Instances"]), key=lambda i: i["PrivateIpAddress"])


def groups(aws: Any) -> dict[str, dict[str, Any]]:
    filters = [{"Name": "tag:llmfleet:deployment", "Values": [DEPLOYMENT]}]
    return {g["GroupName"]: g for g in aws("ec2").describe_security_groups(Filters=filters)["SecurityGroups"]}


def test_more_than_one_gateway_without_a_certificate_fails_before_anything_is_made(
    stage: Stage, aws: Any
) -> None:
    run = stage.play("playbooks/gateway.yml", "-e", "llmfleet_gateway_count=2")
    assert run.returncode != 0
    assert "gateway_certificate_arn" in run.output and "more than one gateway" in run.output
    assert gateways(aws) == []


def test_two_gateways_run_in_private_subnets_of_two_zones_with_their_own_role(
    two_gateways: PlaybookRun, aws: Any
) -> None:
    found = gateways(aws)
    assert len(found) == 2
    sg = groups(aws)[f"{DEPLOYMENT}-gateway"]["GroupId"]
    zones = set()
    for instance in found:
        tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
        assert tags["llmfleet:role"] == "gateway"
        assert instance["InstanceType"] == "t3.small"
        assert instance["State"]["Name"] == "running"
        assert "PublicIpAddress" not in instance
        (interface,) = instance["NetworkInterfaces"]
        assert [g["GroupId"] for g in interface["Groups"]] == [sg]
        assert instance["MetadataOptions"]["HttpTokens"] == "required"
        assert instance["IamInstanceProfile"]["Arn"].endswith(f"/{DEPLOYMENT}-gateway")
        zones.add(instance["Placement"]["AvailabilityZone"])
    assert len(zones) == 2
    # Session Manager, finding the GPU hosts, starting and stopping this deployment's (wake on request, the
    # idle sweep), nothing else: no managed policy (SSM's core one reads every parameter of the account), no
    # other instance
    account = aws("sts").get_caller_identity()["Account"]
    find = {"Sid": "FindGpuHosts", "Effect": "Allow", "Action": ["ec2:DescribeInstances"], "Resource": "*"}
    start = {
        "Sid": "StartAndStopGpuHosts",
        "Effect": "Allow",
        "Action": ["ec2:StartInstances", "ec2:StopInstances"],
        "Resource": f"arn:aws:ec2:*:{account}:instance/*",
        "Condition": {
            "StringEquals": {
                "aws:ResourceTag/llmfleet:deployment": DEPLOYMENT,
                "aws:ResourceTag/llmfleet:role": "gpu-host",
            }
        },
    }
    assert role_grants(aws, f"{DEPLOYMENT}-gateway") == {
        "managed": [],
        "inline": {
            "llmfleet-gateway": {"Version": "2012-10-17", "Statement": [SESSION_MANAGER, find, start]}
        },
    }


def test_the_load_balancer_listens_on_https_with_the_certificate_and_checks_readyz(
    two_gateways: PlaybookRun, aws: Any, certificate_arn: str
) -> None:
    elb = aws("elbv2")
    (lb,) = elb.describe_load_balancers(Names=[f"{DEPLOYMENT}-gw"])["LoadBalancers"]
    assert lb["Scheme"] == "internal"
    assert lb["SecurityGroups"] == [groups(aws)[f"{DEPLOYMENT}-gateway-lb"]["GroupId"]]
    (listener,) = elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]
    assert (listener["Protocol"], listener["Port"]) == ("HTTPS", 443)
    assert [c["CertificateArn"] for c in listener["Certificates"]] == [certificate_arn]
    assert listener["SslPolicy"].startswith("ELBSecurityPolicy-TLS13")
    (action,) = listener["DefaultActions"]
    (group,) = elb.describe_target_groups(Names=[f"{DEPLOYMENT}-gw"])["TargetGroups"]
    assert (action["Type"], action["TargetGroupArn"]) == ("forward", group["TargetGroupArn"])
    assert (group["Protocol"], group["Port"]) == ("HTTPS", PORT)
    assert (group["HealthCheckProtocol"], group["HealthCheckPath"]) == ("HTTPS", "/readyz")
    assert group["Matcher"]["HttpCode"] == "200"
    targets = elb.describe_target_health(TargetGroupArn=group["TargetGroupArn"])["TargetHealthDescriptions"]
    assert sorted(t["Target"]["Id"] for t in targets) == sorted(i["InstanceId"] for i in gateways(aws))
    outputs = two_gateways.output
    assert f"https://{lb['DNSName']}" in outputs


def test_users_reach_the_load_balancer_and_gateways_and_only_gateways_reach_the_agents(
    two_gateways: PlaybookRun, aws: Any
) -> None:
    found = groups(aws)
    lb, gateway = found[f"{DEPLOYMENT}-gateway-lb"], found[f"{DEPLOYMENT}-gateway"]
    agents, database = found[f"{DEPLOYMENT}-agents"], found[f"{DEPLOYMENT}-database"]
    (https,) = lb["IpPermissions"]
    assert (https["FromPort"], [r["CidrIp"] for r in https["IpRanges"]]) == (443, [USERS])
    (out,) = lb["IpPermissionsEgress"]  # not the default allow-all: the gateways' port, to their group
    assert (out["IpProtocol"], out["FromPort"], out["IpRanges"]) == ("tcp", PORT, [])
    assert [p["GroupId"] for p in out["UserIdGroupPairs"]] == [gateway["GroupId"]]
    (gateway_port,) = gateway["IpPermissions"]
    assert gateway_port["FromPort"] == PORT
    assert [p["GroupId"] for p in gateway_port["UserIdGroupPairs"]] == [lb["GroupId"]]
    assert gateway_port["IpRanges"] == []  # with a load balancer the users reach it only
    (agent_port,) = agents["IpPermissions"]
    assert [p["GroupId"] for p in agent_port["UserIdGroupPairs"]] == [gateway["GroupId"]]
    (postgres,) = database["IpPermissions"]
    assert sorted(p["GroupId"] for p in postgres["UserIdGroupPairs"]) == sorted(
        [agents["GroupId"], gateway["GroupId"]]
    )


def test_a_second_run_changes_nothing(two_gateways: PlaybookRun, stage: Stage, certificate_arn: str) -> None:
    for again in stage.build(*two(certificate_arn)):
        assert again.recap()["changed"] == 0, again.output[-5000:]


def test_one_gateway_without_a_certificate_needs_no_load_balancer(
    two_gateways: PlaybookRun, stage: Stage, aws: Any
) -> None:
    run = stage.build()[-1]
    running = [i for i in gateways(aws) if i["State"]["Name"] != "terminated"]
    assert len(running) == 1
    assert aws("elbv2").describe_load_balancers()["LoadBalancers"] == []
    assert aws("elbv2").describe_target_groups()["TargetGroups"] == []
    assert f"https://{running[0]['PrivateIpAddress']}:{PORT}" in run.output
    (gateway_port,) = groups(aws)[f"{DEPLOYMENT}-gateway"]["IpPermissions"]
    assert [r["CidrIp"] for r in gateway_port["IpRanges"]] == [USERS]  # no load balancer: the users directly


def test_teardown_removes_the_load_balancer_the_gateways_and_their_role(
    two_gateways: PlaybookRun, stage: Stage, aws: Any, certificate_arn: str
) -> None:
    stage.build(*two(certificate_arn))
    assert len(aws("elbv2").describe_load_balancers()["LoadBalancers"]) == 1
    down = stage.play("playbooks/teardown.yml", "-e", f"confirm_teardown={DEPLOYMENT}")
    assert down.returncode == 0, down.output[-5000:]
    elb = aws("elbv2")
    assert elb.describe_load_balancers()["LoadBalancers"] == []
    assert elb.describe_target_groups()["TargetGroups"] == []
    assert [i for i in gateways(aws) if i["State"]["Name"] != "terminated"] == []
    assert groups(aws) == {}
    roles = [r["RoleName"] for r in aws("iam").list_roles()["Roles"]]
    assert f"{DEPLOYMENT}-gateway" not in roles
