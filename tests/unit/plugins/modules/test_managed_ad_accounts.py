"""llmfleet.aws.managed_ad_accounts against the emulator's Directory Service Data API (in memory here; on a
real Samba domain controller in tests/integration/test_site.py).

Run in-process with its real AnsibleModule and real boto3 clients; the emulator answers as AWS documents
(data access off until turned on, users disabled until their password is set)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import module_runs
import pytest
from ansible_collections.llmfleet.aws.plugins.modules import managed_ad_accounts
from emulators import running_emulator

REGION = "us-east-1"
GROUPS = ["llmfleet-users", "llmfleet-operators", "llmfleet-admins"]
PASSWORD = "Svc-Passw0rd-for-tests"


class Directory:
    def __init__(self, url: str) -> None:
        session = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
        )
        self.ds = session.client("ds", endpoint_url=url)
        self.data = session.client("ds-data", endpoint_url=url)
        ec2 = session.client("ec2", endpoint_url=url)
        vpc = ec2.create_vpc(CidrBlock="10.62.0.0/16")["Vpc"]["VpcId"]
        subnets = [
            ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.62.{i}.0/24", AvailabilityZone=zone)["Subnet"][
                "SubnetId"
            ]
            for i, zone in enumerate(("us-east-1a", "us-east-1b"))
        ]
        self.id = self.ds.create_microsoft_ad(
            Name="corp.example.com",
            ShortName="CORP",
            Password="Adm1n-Passw0rd-x",
            VpcSettings={"VpcId": vpc, "SubnetIds": subnets},
            Edition="Standard",
        )["DirectoryId"]
        self.connection = {
            "endpoint_url": url,
            "access_key": "testing",
            "secret_key": "testing",
            "region": REGION,
        }

    def args(self, **extra: Any) -> dict[str, Any]:
        return {
            **self.connection,
            "directory_id": self.id,
            "groups": GROUPS,
            "service_account": {"name": "llmfleet-svc", "password": PASSWORD},
            **extra,
        }


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Directory]:
    with running_emulator(tmp_path_factory) as url:
        yield Directory(url)


def run(args: dict[str, Any], check: bool = False) -> dict[str, Any]:
    return module_runs.run_module(managed_ad_accounts.main, args, check)


def test_groups_and_the_service_account_are_made_once(directory: Directory) -> None:
    # data access is off on a new directory, as on AWS: ds-data refuses until it is on
    assert (
        directory.ds.describe_directory_data_access(DirectoryId=directory.id)["DataAccessStatus"]
        == "Disabled"
    )
    with pytest.raises(directory.data.exceptions.AccessDeniedException):
        directory.data.describe_group(DirectoryId=directory.id, SAMAccountName="llmfleet-users")

    # check mode first: nothing is made, and it says it would
    planned = run(directory.args(), check=True)
    assert planned["changed"] and [g["name"] for g in planned["groups"]] == GROUPS
    assert (
        directory.ds.describe_directory_data_access(DirectoryId=directory.id)["DataAccessStatus"]
        == "Disabled"
    )

    made = run(directory.args())
    assert made["changed"] and made["data_access"] == "Enabled"
    assert [g["name"] for g in made["groups"]] == GROUPS
    assert (
        made["groups"][0]["distinguished_name"]
        == "CN=llmfleet-users,OU=Users,OU=CORP,DC=corp,DC=example,DC=com"
    )
    account = made["service_account"]
    assert account["name"] == "llmfleet-svc" and account["enabled"] is True
    assert PASSWORD not in repr(made)
    group = directory.data.describe_group(DirectoryId=directory.id, SAMAccountName="llmfleet-admins")
    assert group["GroupType"] == "Security"

    # again: nothing to do, in check mode or not
    assert run(directory.args(), check=True)["changed"] is False
    again = run(directory.args())
    assert again["changed"] is False and again["groups"] == made["groups"]
    # update_password=always sets it every time
    assert run(directory.args(update_password="always"))["changed"] is True


def test_a_user_left_disabled_by_an_earlier_run_gets_its_password(directory: Directory) -> None:
    directory.data.create_user(DirectoryId=directory.id, SAMAccountName="half-made")
    assert (
        directory.data.describe_user(DirectoryId=directory.id, SAMAccountName="half-made")["Enabled"] is False
    )
    done = run(directory.args(groups=[], service_account={"name": "half-made", "password": PASSWORD}))
    assert done["changed"] and done["service_account"]["enabled"] is True


def test_bad_names_and_access_left_off_fail_naming_them(directory: Directory, tmp_path_factory: Any) -> None:
    failed = module_runs.fail_module(managed_ad_accounts.main, directory.args(groups=["x" * 21]))
    assert "x" * 21 in failed["msg"] and "1 to 20 characters" in failed["msg"]
    with running_emulator(tmp_path_factory) as url:
        fresh = Directory(url)
        failed = module_runs.fail_module(managed_ad_accounts.main, fresh.args(enable_data_access=False))
        assert f"directory data access of {fresh.id} is Disabled" in failed["msg"]
