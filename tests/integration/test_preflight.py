"""Preflight: a bad deployment description fails early, before any AWS call, naming the variable."""

from __future__ import annotations

import json

import pytest
from playbook_runs import ansible_playbook

# nothing listens here: a preflight that let the play reach AWS would fail with a connection error instead
NO_AWS = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
# the local inventory without its aws_ec2 source (which would ask the absent AWS for the GPU hosts)
NO_AWS_INVENTORY = "inventories/local/hosts.yml"


def fails(playbook: str, **overrides: object) -> str:
    run = ansible_playbook(
        playbook, "-e", json.dumps(overrides), env=NO_AWS, timeout=120, inventory=NO_AWS_INVENTORY
    )
    assert run.returncode != 0, run.output[-3000:]
    assert "Could not connect" not in run.output and "EndpointConnectionError" not in run.output
    return run.output


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"llmfleet_vpc_cidr": "10.42.0.1/33"}, "network_vpc_cidr=10.42.0.1/33"),
        ({"llmfleet_vpc_cidr": "10.42.7.0/16"}, "network_vpc_cidr=10.42.7.0/16"),
        ({"llmfleet_availability_zones": ["us-east-1a"]}, "network_availability_zones=['us-east-1a']"),
        (
            {"llmfleet_agent_allowed_cidrs": ["10.0.0.0/8", "everyone"]},
            "network_agent_allowed_cidrs: everyone",
        ),
        ({"llmfleet_ssh_allowed_cidrs": ["300.1.2.3/32"]}, "network_ssh_allowed_cidrs: 300.1.2.3/32"),
        (
            {"llmfleet_gateway_allowed_cidrs": ["0.0.0.0/0", "office"]},
            "network_gateway_allowed_cidrs: office",
        ),
    ],
)
def test_network_preflight(overrides: dict[str, object], named: str) -> None:
    assert named in fails("playbooks/network.yml", **overrides)


HOST = {"name": "gpu-a", "instance_type": "g5.xlarge"}


@pytest.mark.parametrize(
    ("hosts", "named"),
    [
        ([{"instance_type": "g5.xlarge"}], "gpu_hosts_hosts[0]"),
        ([{"name": "gpu-a"}], "instance_type is required"),
        ([HOST, {**HOST, "instance_type": "g5.2xlarge"}], "duplicate host names gpu-a"),
        ([], "gpu_hosts_hosts"),
    ],
)
def test_gpu_hosts_preflight(hosts: list[dict[str, object]], named: str) -> None:
    output = fails("playbooks/gpu_hosts.yml", llmfleet_gpu_hosts=hosts)
    assert named in output and "gpu_hosts_hosts" in output


def test_database_preflight_names_the_deployment_setting() -> None:
    output = fails("playbooks/database.yml", llmfleet_database_backup_retention_days=3)
    assert "llmfleet_database_backup_retention_days" in output


def test_gpu_hosts_preflight_checks_each_hosts_instance_types() -> None:
    hosts = [
        {"name": "gpu-a", "instance_types": []},
        {"name": "gpu-b", "instance_types": ["g6.xlarge", "g6.xlarge"]},
        {"name": "gpu-c", "instance_type": "g5.xlarge", "instance_types": ["g6.xlarge"]},
        {"name": "gpu-d", "instance_types": ["g6.xlarge", "a big one"]},
    ]
    output = " ".join(fails("playbooks/gpu_hosts.yml", llmfleet_gpu_hosts=hosts).split())
    for index in (0, 1, 3):
        assert f"gpu_hosts_hosts[{index}]" in output
    assert "instance_type is required (g5.xlarge), or instance_types: EC2 types by preference" in output
    assert "gpu_hosts_hosts[2]" in output and "give instance_types or instance_type, not both" in output


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"llmfleet_gateway_count": 21}, "gateway_count=21: between 0"),
        (
            {"llmfleet_certificate_arn": "my-cert"},
            "gateway_certificate_arn=my-cert: an ACM certificate's ARN",
        ),
        ({"llmfleet_gateway_count": 3}, "more than one gateway stand behind a load balancer"),
        ({"llmfleet_gateway_port": 443}, "gateway_port=443: a port from 1024"),
    ],
)
def test_gateway_preflight(overrides: dict[str, object], named: str) -> None:
    assert named in " ".join(fails("playbooks/gateway.yml", **overrides).split())
