"""`site.yml --check` on a fresh account (docs/deploying.md: every playbook is safe in check mode): it
passes, says what would be created, and creates nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import client_factory
from emulators import running_emulator
from playbook_runs import ansible_playbook

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def aws_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """This module's own emulator, empty (a fresh account)."""
    with running_emulator(tmp_path_factory) as url:
        yield url


def test_check_mode_on_a_fresh_account_passes_and_creates_nothing(aws_endpoint: str, tmp_path: Path) -> None:
    env = {"AWS_ENDPOINT_URL": aws_endpoint, "LLMFLEET_DEPLOYMENT": "fresh"}
    run = ansible_playbook("site.yml", "--check", "-e", f"llmfleet_state_dir={tmp_path}", env=env)
    assert run.returncode == 0, run.output[-5000:]
    assert "the VPC of fresh does not exist yet" in run.stdout
    aws: Any = client_factory(aws_endpoint)
    ec2 = aws("ec2")
    deployment = [{"Name": "tag:llmfleet:deployment", "Values": ["fresh"]}]
    assert ec2.describe_vpcs(Filters=deployment)["Vpcs"] == []
    assert ec2.describe_instances(Filters=deployment)["Reservations"] == []
    assert aws("elbv2").describe_load_balancers()["LoadBalancers"] == []
    assert [r for r in aws("iam").list_roles()["Roles"] if r["RoleName"].startswith("fresh-")] == []
    assert not [s for s in aws("secretsmanager").list_secrets()["SecretList"] if "/fresh/" in s["Name"]]
