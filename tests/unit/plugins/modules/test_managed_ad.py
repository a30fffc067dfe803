"""Unit tests of llmfleet.aws.managed_ad and its module_utils/directory.py.

A real boto3 `ds` client answers from botocore's Stubber.

The module's functions are called directly. FakeModule stands in for the Ansible side of AnsibleAWSModule
only (params with the module's own defaults, check mode, warn, exit and fail); every AWS call goes through
a real client, wrapped in amazon.aws's retrying wrapper as module.client() does, and the Stubber fails a
test on any call it was not told to expect (so "no create call" is checked by not stubbing one).
"""

import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry, RetryingBotoClientWrapper
from ansible_collections.llmfleet.aws.plugins.module_utils import directory as directory_utils
from ansible_collections.llmfleet.aws.plugins.modules import managed_ad
from botocore.stub import Stubber

REPO = Path(__file__).resolve().parents[4]
DIRECTORY_ID = "d-906731b2a4"
NAME = "corp.example.com"
PASSWORD = "Corr3ct-Horse-Battery"
VPC_ID = "vpc-0123456789abcdef0"
SUBNETS = ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"]
SECURITY_GROUP = "sg-0123456789abcdef0"
DNS = ["10.42.128.10", "10.42.144.10"]


class Failed(Exception):
    """module.fail_json / fail_json_aws was called."""

    def __init__(self, result):
        super().__init__(result.get("msg"))
        self.result = result


class FakeModule:
    """The Ansible plumbing of AnsibleAWSModule, nothing of AWS."""

    def __init__(self, check_mode=False, **params):
        spec = managed_ad.argument_spec()
        unknown = set(params) - set(spec)
        if unknown:
            raise TypeError(f"not options of managed_ad: {unknown}")
        self.params = {key: option.get("default") for key, option in spec.items()}
        self.params.update(params)
        self.check_mode = check_mode
        self.warnings = []

    def warn(self, message):
        self.warnings.append(message)

    def fail_json(self, msg, **kwargs):
        raise Failed(dict(msg=msg, **kwargs))

    def fail_json_aws(self, exception, msg=None, **kwargs):
        raise Failed(dict(msg=f"{msg}: {exception}", exception=exception, **kwargs))

    def exit_json(self, **kwargs):
        raise AssertionError("the functions under test return their result; main() exits")


def create_params(**overrides):
    params = dict(
        name=NAME,
        short_name="CORP",
        edition="Standard",
        password=PASSWORD,
        vpc_id=VPC_ID,
        subnet_ids=list(SUBNETS),
        description="llmfleet users",
        tags={"llmfleet:deployment": "prod", "Name": "prod-directory"},
    )
    params.update(overrides)
    return params


def description(stage="Active", **overrides):
    """A DirectoryDescription as DescribeDirectories returns it."""
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    value = {
        "DirectoryId": DIRECTORY_ID,
        "Name": NAME,
        "ShortName": "CORP",
        "Edition": "Standard",
        "Type": "MicrosoftAD",
        "Description": "llmfleet users",
        "Alias": DIRECTORY_ID,
        "AccessUrl": f"{DIRECTORY_ID}.awsapps.com",
        "DnsIpAddrs": DNS if stage == "Active" else [],
        "Stage": stage,
        "LaunchTime": now,
        "StageLastUpdatedDateTime": now,
        "VpcSettings": {
            "VpcId": VPC_ID,
            "SubnetIds": list(SUBNETS),
            "SecurityGroupId": SECURITY_GROUP,
            "AvailabilityZones": ["us-east-1a", "us-east-1b"],
        },
    }
    value.update(overrides)
    return value


def tag_list(tags):
    return [{"Key": k, "Value": v} for k, v in tags.items()]


@pytest.fixture
def aws():
    """(client as module.client('ds', retry_decorator=...) returns it, its Stubber)."""
    client = boto3.client(
        "ds", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    with Stubber(client) as stubber:
        yield RetryingBotoClientWrapper(client, AWSRetry.jittered_backoff()), stubber
        stubber.assert_no_pending_responses()


@pytest.fixture
def no_delay(monkeypatch):
    """Polls inside the module functions do not sleep (the wait functions' own tests inject a clock)."""
    monkeypatch.setattr(directory_utils, "POLL_DELAY", 0)


def expect_list(stubber, directories):
    stubber.add_response("describe_directories", {"DirectoryDescriptions": directories}, {})


def expect_describe(stubber, directory):
    stubber.add_response(
        "describe_directories", {"DirectoryDescriptions": [directory]}, {"DirectoryIds": [DIRECTORY_ID]}
    )


def expect_tags(stubber, tags):
    stubber.add_response("list_tags_for_resource", {"Tags": tag_list(tags)}, {"ResourceId": DIRECTORY_ID})


# --- create -------------------------------------------------------------------------------------------


def test_create(aws):
    client, stubber = aws
    params = create_params()
    expect_list(stubber, [])
    stubber.add_response(
        "create_microsoft_ad",
        {"DirectoryId": DIRECTORY_ID},
        {
            "Name": NAME,
            "ShortName": "CORP",
            "Password": PASSWORD,
            "Description": "llmfleet users",
            "Edition": "Standard",
            "VpcSettings": {"VpcId": VPC_ID, "SubnetIds": SUBNETS},
            "Tags": tag_list(params["tags"]),
        },
    )
    expect_describe(stubber, description("Creating"))
    expect_tags(stubber, params["tags"])

    result = managed_ad.ensure_present(client, FakeModule(**params))

    assert result["changed"] is True
    assert result["directory_id"] == DIRECTORY_ID
    assert result["stage"] == "Creating"
    assert result["security_group_id"] == SECURITY_GROUP
    assert result["vpc_settings"]["subnet_ids"] == SUBNETS
    assert result["tags"] == params["tags"]
    assert PASSWORD not in json.dumps(result)


def test_create_and_wait_until_active(aws, no_delay):
    client, stubber = aws
    expect_list(stubber, [])
    stubber.add_response("create_microsoft_ad", {"DirectoryId": DIRECTORY_ID})
    expect_describe(stubber, description("Requested"))
    expect_describe(stubber, description("Creating"))
    expect_describe(stubber, description("Active"))
    expect_tags(stubber, {})

    result = managed_ad.ensure_present(client, FakeModule(**create_params(tags=None), wait=True))

    assert result["changed"] is True
    assert result["stage"] == "Active"
    assert result["dns_ip_addrs"] == DNS


def test_create_without_optional_settings_uses_the_standard_edition(aws):
    client, stubber = aws
    expect_list(stubber, [])
    stubber.add_response(
        "create_microsoft_ad",
        {"DirectoryId": DIRECTORY_ID},
        {
            "Name": NAME,
            "Password": PASSWORD,
            "Edition": "Standard",
            "VpcSettings": {"VpcId": VPC_ID, "SubnetIds": SUBNETS},
        },
    )
    expect_describe(stubber, description("Creating"))
    expect_tags(stubber, {})

    params = create_params(short_name=None, edition=None, description=None, tags=None)
    assert managed_ad.ensure_present(client, FakeModule(**params))["changed"] is True


def test_create_failure_from_aws_is_reported(aws):
    client, stubber = aws
    expect_list(stubber, [])
    stubber.add_client_error(
        "create_microsoft_ad",
        service_error_code="InvalidParameterException",
        service_message="subnets must be in different availability zones",
        http_status_code=400,
    )

    with pytest.raises(Failed) as failed:
        managed_ad.ensure_present(client, FakeModule(**create_params()))

    assert failed.value.result["msg"].startswith(f"Unable to create directory {NAME}")
    assert "different availability zones" in failed.value.result["msg"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"password": None}, "creating it requires password"),
        ({"vpc_id": None, "subnet_ids": None}, "creating it requires vpc_id, subnet_ids"),
        ({"password": "short1A"}, "8 to 64 characters"),
        ({"password": "alllowercaseletters1"}, "three of"),
        ({"password": "MyAdmin-Passw0rd"}, "the word admin"),
        ({"subnet_ids": SUBNETS[:1]}, "two different subnets"),
        ({"subnet_ids": [SUBNETS[0], SUBNETS[0]]}, "two different subnets"),
    ],
)
def test_create_checks_its_parameters_before_calling_aws(aws, overrides, message):
    client, stubber = aws
    expect_list(stubber, [])

    with pytest.raises(Failed, match=message) as failed:
        managed_ad.ensure_present(client, FakeModule(**create_params(**overrides)))

    assert PASSWORD not in failed.value.result["msg"]


# --- already present ------------------------------------------------------------------------------------


def test_already_present_is_not_changed(aws):
    client, stubber = aws
    params = create_params(name="CORP.example.com")  # domain names compare without case
    expect_list(
        stubber,
        [
            description(Name="other.example.com", DirectoryId="d-0000000000"),
            description(Type="SimpleAD", DirectoryId="d-1111111111"),
            description(),
        ],
    )
    expect_tags(stubber, params["tags"])

    module = FakeModule(**params)
    result = managed_ad.ensure_present(client, module)

    assert result["changed"] is False
    assert result["directory_id"] == DIRECTORY_ID
    assert result["dns_ip_addrs"] == DNS
    assert result["security_group_id"] == SECURITY_GROUP
    assert module.warnings == []


def test_already_present_reconciles_tags(aws):
    client, stubber = aws
    params = create_params(tags={"llmfleet:deployment": "prod", "team": "ml"})
    expect_list(stubber, [description()])
    expect_tags(stubber, {"llmfleet:deployment": "prod", "team": "data", "old": "x", "aws:reserved": "y"})
    stubber.add_response("remove_tags_from_resource", {}, {"ResourceId": DIRECTORY_ID, "TagKeys": ["old"]})
    stubber.add_response(
        "add_tags_to_resource", {}, {"ResourceId": DIRECTORY_ID, "Tags": [{"Key": "team", "Value": "ml"}]}
    )

    result = managed_ad.ensure_present(client, FakeModule(**params))

    assert result["changed"] is True
    assert result["tags"] == {"llmfleet:deployment": "prod", "team": "ml", "aws:reserved": "y"}


def test_already_present_warns_about_settings_it_cannot_change(aws):
    client, stubber = aws
    expect_list(stubber, [description(Edition="Enterprise")])
    expect_tags(stubber, {})

    module = FakeModule(**create_params(tags=None, subnet_ids=["subnet-a", "subnet-b"]))
    result = managed_ad.ensure_present(client, module)

    assert result["changed"] is False
    assert len(module.warnings) == 1
    assert "edition is Enterprise" in module.warnings[0]
    assert "subnet_ids" in module.warnings[0]


def test_already_present_needs_no_password(aws):
    client, stubber = aws
    expect_list(stubber, [description()])
    expect_tags(stubber, {})

    result = managed_ad.ensure_present(client, FakeModule(name=NAME))

    assert result["changed"] is False


def test_present_waits_for_a_directory_still_being_created(aws, no_delay):
    client, stubber = aws
    expect_list(stubber, [description("Creating")])
    expect_tags(stubber, {})
    expect_describe(stubber, description("Creating"))
    expect_describe(stubber, description("Active"))

    result = managed_ad.ensure_present(client, FakeModule(name=NAME, wait=True))

    assert result["changed"] is False
    assert result["stage"] == "Active"


def test_present_reports_a_failed_directory_when_waiting(aws, no_delay):
    client, stubber = aws
    expect_list(stubber, [description("Creating")])
    expect_tags(stubber, {})
    expect_describe(stubber, description("Failed", StageReason="Insufficient EC2 permissions"))

    with pytest.raises(Failed) as failed:
        managed_ad.ensure_present(client, FakeModule(name=NAME, wait=True))

    assert failed.value.result["msg"] == f"directory {DIRECTORY_ID} is Failed: Insufficient EC2 permissions"
    assert failed.value.result["stage"] == "Failed"


def test_present_refuses_a_directory_being_deleted(aws):
    client, stubber = aws
    expect_list(stubber, [description("Deleting")])
    expect_tags(stubber, {})

    with pytest.raises(Failed, match="is being deleted"):
        managed_ad.ensure_present(client, FakeModule(**create_params()))


def test_two_directories_of_the_same_name_fail(aws):
    client, stubber = aws
    params = create_params()
    expect_list(stubber, [description(), description(DirectoryId="d-2222222222")])
    expect_tags(stubber, params["tags"])
    stubber.add_response(
        "list_tags_for_resource", {"Tags": tag_list(params["tags"])}, {"ResourceId": "d-2222222222"}
    )

    with pytest.raises(Failed, match=r"Found 2 directories corp\.example\.com of this deployment"):
        managed_ad.ensure_present(client, FakeModule(**params, match_tags=["llmfleet:deployment"]))


OTHER_ID = "d-3333333333"


def expect_other(stubber, tags, **overrides):
    """The tags of OTHER_ID, a directory of the same name as ours."""
    stubber.add_response("list_tags_for_resource", {"Tags": tag_list(tags)}, {"ResourceId": OTHER_ID})


@pytest.mark.parametrize(
    ("other", "other_tags"),
    [
        (
            {"VpcSettings": {"VpcId": "vpc-0ther", "SubnetIds": ["subnet-x", "subnet-y"]}},
            {"llmfleet:deployment": "prod"},
        ),
        ({}, {"llmfleet:deployment": "staging"}),
        ({}, {}),
    ],
    ids=["another VPC", "another deployment", "untagged"],
)
def test_a_directory_of_the_same_name_that_is_not_ours_is_neither_adopted_nor_changed(aws, other, other_tags):
    client, stubber = aws
    expect_list(stubber, [description(DirectoryId=OTHER_ID, **other)])
    expect_other(stubber, other_tags)

    with pytest.raises(Failed, match=f"exists that is not this one.*{OTHER_ID}.*not adopted") as failed:
        managed_ad.ensure_present(client, FakeModule(**create_params(), match_tags=["llmfleet:deployment"]))
    assert "choose another domain name" in str(failed.value)


def test_ours_is_found_beside_another_of_the_same_name(aws):
    client, stubber = aws
    params = create_params()
    expect_list(
        stubber,
        [
            description(DirectoryId=OTHER_ID, VpcSettings={"VpcId": "vpc-0ther", "SubnetIds": []}),
            description(),
        ],
    )
    expect_other(stubber, {"llmfleet:deployment": "staging"})
    expect_tags(stubber, params["tags"])

    result = managed_ad.ensure_present(client, FakeModule(**params, match_tags=["llmfleet:deployment"]))

    assert result["changed"] is False and result["directory_id"] == DIRECTORY_ID


def test_absent_deletes_only_ours(aws):
    client, stubber = aws
    expect_list(stubber, [description(DirectoryId=OTHER_ID)])
    expect_other(stubber, {"llmfleet:deployment": "staging"})

    module = FakeModule(
        name=NAME, state="absent", tags={"llmfleet:deployment": "prod"}, match_tags=["llmfleet:deployment"]
    )
    assert managed_ad.ensure_absent(client, module) == {"changed": False, "directory_id": None, "name": NAME}


def test_match_tags_must_be_given_values(aws):
    client = aws[0]
    with pytest.raises(Failed, match="match_tags names llmfleet:deployment, which tags does not set"):
        managed_ad.ensure_present(
            client, FakeModule(**create_params(tags={}), match_tags=["llmfleet:deployment"])
        )


def test_a_deleted_directory_of_the_same_name_is_ignored(aws):
    client, stubber = aws
    expect_list(stubber, [description("Deleted")])
    stubber.add_response("create_microsoft_ad", {"DirectoryId": DIRECTORY_ID})
    expect_describe(stubber, description("Creating"))
    expect_tags(stubber, {})

    assert managed_ad.ensure_present(client, FakeModule(**create_params(tags=None)))["changed"] is True


# --- absent ---------------------------------------------------------------------------------------------


def test_absent_deletes(aws):
    client, stubber = aws
    expect_list(stubber, [description()])
    expect_tags(stubber, {})
    stubber.add_response("delete_directory", {"DirectoryId": DIRECTORY_ID}, {"DirectoryId": DIRECTORY_ID})

    result = managed_ad.ensure_absent(client, FakeModule(name=NAME, state="absent"))

    assert result["changed"] is True
    assert result["directory_id"] == DIRECTORY_ID
    assert result["stage"] == "Deleting"


def test_absent_waits_until_gone(aws, no_delay):
    client, stubber = aws
    expect_list(stubber, [description()])
    expect_tags(stubber, {})
    stubber.add_response("delete_directory", {"DirectoryId": DIRECTORY_ID}, {"DirectoryId": DIRECTORY_ID})
    expect_describe(stubber, description("Deleting"))
    stubber.add_client_error(
        "describe_directories",
        service_error_code="EntityDoesNotExistException",
        service_message=f"Directory {DIRECTORY_ID} does not exist",
        expected_params={"DirectoryIds": [DIRECTORY_ID]},
    )

    result = managed_ad.ensure_absent(client, FakeModule(name=NAME, state="absent", wait=True))

    assert result["changed"] is True
    assert result["stage"] == "Deleted"


def test_absent_when_there_is_no_directory(aws):
    client, stubber = aws
    expect_list(stubber, [description(Name="other.example.com")])

    result = managed_ad.ensure_absent(client, FakeModule(name=NAME, state="absent"))

    assert result == {"changed": False, "directory_id": None, "name": NAME}


def test_absent_when_already_being_deleted(aws):
    client, stubber = aws
    expect_list(stubber, [description("Deleting")])
    expect_tags(stubber, {})

    result = managed_ad.ensure_absent(client, FakeModule(name=NAME, state="absent"))

    assert result["changed"] is False


def test_absent_failure_from_aws_is_reported(aws):
    client, stubber = aws
    expect_list(stubber, [description()])
    expect_tags(stubber, {})
    stubber.add_client_error(
        "delete_directory", service_error_code="ClientException", service_message="in use by WorkSpaces"
    )

    with pytest.raises(Failed, match=f"Unable to delete directory {DIRECTORY_ID}.*in use by WorkSpaces"):
        managed_ad.ensure_absent(client, FakeModule(name=NAME, state="absent"))


# --- check mode: only reads -----------------------------------------------------------------------------


def test_check_mode_create_calls_nothing_that_changes(aws):
    client, stubber = aws
    expect_list(stubber, [])

    result = managed_ad.ensure_present(client, FakeModule(check_mode=True, wait=True, **create_params()))

    assert result["changed"] is True
    assert result["directory_id"] is None
    assert result["dns_ip_addrs"] == []
    assert result["vpc_settings"] == {"vpc_id": VPC_ID, "subnet_ids": SUBNETS}


def test_check_mode_still_checks_the_create_parameters(aws):
    client, stubber = aws
    expect_list(stubber, [])

    with pytest.raises(Failed, match="requires password"):
        managed_ad.ensure_present(client, FakeModule(check_mode=True, **create_params(password=None)))


def test_check_mode_tags_report_the_change_without_making_it(aws):
    client, stubber = aws
    expect_list(stubber, [description("Creating")])
    expect_tags(stubber, {"llmfleet:deployment": "old"})

    module = FakeModule(check_mode=True, wait=True, **create_params(tags={"llmfleet:deployment": "prod"}))
    result = managed_ad.ensure_present(client, module)

    assert result["changed"] is True
    assert result["tags"] == {"llmfleet:deployment": "prod"}
    assert result["stage"] == "Creating"  # no waiting in check mode either


def test_check_mode_converged_is_not_changed(aws):
    client, stubber = aws
    params = create_params()
    expect_list(stubber, [description()])
    expect_tags(stubber, params["tags"])

    assert managed_ad.ensure_present(client, FakeModule(check_mode=True, **params))["changed"] is False


def test_check_mode_absent_does_not_delete(aws):
    client, stubber = aws
    expect_list(stubber, [description()])
    expect_tags(stubber, {})

    result = managed_ad.ensure_absent(
        client, FakeModule(check_mode=True, name=NAME, state="absent", wait=True)
    )

    assert result["changed"] is True
    assert result["directory_id"] == DIRECTORY_ID


# --- the waiting logic ----------------------------------------------------------------------------------


class Clock:
    """A clock that moves only when slept on."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def describe_with(client):
    return lambda directory_id: directory_utils.describe_directory(client, directory_id)


def test_wait_creating_creating_active(aws):
    client, stubber = aws
    for stage in ("Creating", "Creating", "Active"):
        expect_describe(stubber, description(stage))
    clock = Clock()

    directory = directory_utils.wait_until_active(
        describe_with(client), DIRECTORY_ID, timeout=600, delay=15, sleep=clock.sleep, clock=clock
    )

    assert directory["Stage"] == "Active"
    assert directory["DnsIpAddrs"] == DNS
    assert clock.sleeps == [15, 15]


@pytest.mark.parametrize("stage", ["Failed", "Impaired"])
def test_wait_stops_at_a_failed_stage_with_its_reason(aws, stage):
    client, stubber = aws
    expect_describe(stubber, description("Creating"))
    expect_describe(stubber, description(stage, StageReason="The subnets have no free addresses"))
    clock = Clock()

    with pytest.raises(directory_utils.DirectoryWaitError) as error:
        directory_utils.wait_until_active(
            describe_with(client), DIRECTORY_ID, timeout=600, sleep=clock.sleep, clock=clock
        )

    assert str(error.value) == f"directory {DIRECTORY_ID} is {stage}: The subnets have no free addresses"
    assert error.value.directory["Stage"] == stage
    assert len(clock.sleeps) == 1


def test_wait_times_out_naming_the_directory_and_its_last_stage(aws):
    client, stubber = aws
    for _poll in range(5):
        expect_describe(stubber, description("Creating"))
    clock = Clock()

    with pytest.raises(directory_utils.DirectoryWaitError) as error:
        directory_utils.wait_until_active(
            describe_with(client), DIRECTORY_ID, timeout=60, delay=15, sleep=clock.sleep, clock=clock
        )

    assert str(error.value) == (
        f"timed out after 60 seconds waiting for directory {DIRECTORY_ID} to become Active;"
        " its last stage was Creating"
    )
    assert clock.sleeps == [15, 15, 15, 15]
    assert clock.now == 1060.0


def test_wait_never_sleeps_past_the_deadline():
    clock = Clock()
    with pytest.raises(directory_utils.DirectoryWaitError, match="timed out after 20 seconds"):
        directory_utils.wait_until_active(
            lambda _directory_id: description("Creating"),
            DIRECTORY_ID,
            timeout=20,
            delay=15,
            sleep=clock.sleep,
            clock=clock,
        )
    assert clock.sleeps == [15, 5]


def test_wait_fails_when_the_directory_disappears(aws):
    client, stubber = aws
    stubber.add_client_error(
        "describe_directories",
        service_error_code="EntityDoesNotExistException",
        expected_params={"DirectoryIds": [DIRECTORY_ID]},
    )
    clock = Clock()

    with pytest.raises(directory_utils.DirectoryWaitError, match="disappeared"):
        directory_utils.wait_until_active(
            describe_with(client), DIRECTORY_ID, timeout=60, sleep=clock.sleep, clock=clock
        )


def test_wait_until_deleted_times_out(aws):
    client, stubber = aws
    for _poll in range(3):
        expect_describe(stubber, description("Deleting"))
    clock = Clock()

    with pytest.raises(
        directory_utils.DirectoryWaitError, match="to be deleted; its last stage was Deleting"
    ):
        directory_utils.wait_until_deleted(
            describe_with(client), DIRECTORY_ID, timeout=30, delay=15, sleep=clock.sleep, clock=clock
        )


def test_module_reports_a_wait_timeout(aws, monkeypatch):
    client, stubber = aws
    expect_list(stubber, [description("Creating")])
    expect_tags(stubber, {})
    expect_describe(stubber, description("Creating"))
    monkeypatch.setattr(directory_utils, "POLL_DELAY", 0)

    with pytest.raises(Failed) as failed:
        managed_ad.ensure_present(client, FakeModule(name=NAME, wait=True, wait_timeout=0))

    assert failed.value.result["msg"] == (
        f"timed out after 0 seconds waiting for directory {DIRECTORY_ID} to become Active;"
        " its last stage was Creating"
    )
    assert failed.value.result["directory_id"] == DIRECTORY_ID


# --- the module for real, against the emulator ----------------------------------------------------------


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import emulator as emulator_script  # scripts/emulator.py
    finally:
        sys.path.remove(str(REPO / "scripts"))
    port = _free_port()
    state = tmp_path_factory.mktemp("emulator")
    emulator_script.start(port, state_dir=state)
    yield emulator_script.url_for(port)
    emulator_script.stop(port, state_dir=state)


def run_module(endpoint, args, check=False):
    """Run llmfleet.aws.managed_ad through ansible, as a playbook task would; (result, output)."""
    connection = dict(endpoint_url=endpoint, region="us-east-1", access_key="testing", secret_key="testing")
    command = [
        str(Path(sys.executable).parent / "ansible"),
        "localhost",
        "-i",
        "localhost,",
        "-c",
        "local",
        "-e",
        f"ansible_python_interpreter={sys.executable}",
        "-m",
        "llmfleet.aws.managed_ad",
        "-a",
        json.dumps({**connection, **args}),
        "-v",
    ] + (["--check"] if check else [])
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json",
    }
    proc = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    report = json.loads(proc.stdout[proc.stdout.index("{") :])  # after -v's "Using ... as config file"
    return report["plays"][0]["tasks"][0]["hosts"]["localhost"], output


@pytest.mark.slow
def test_module_against_the_emulator(emulator):
    kw = dict(
        endpoint_url=emulator, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
    )
    ec2 = boto3.client("ec2", **kw)
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.9.{i}.0/24", AvailabilityZone=az)["Subnet"]["SubnetId"]
        for i, az in enumerate(["us-east-1a", "us-east-1b"])
    ]
    args = dict(
        name="emulated.example.com",
        short_name="EMULATED",
        password=PASSWORD,
        vpc_id=vpc,
        subnet_ids=subnets,
        tags={"llmfleet:deployment": "unit"},
        wait=True,
    )

    would, _output = run_module(emulator, args, check=True)
    assert would["changed"] is True
    assert boto3.client("ds", **kw).describe_directories()["DirectoryDescriptions"] == []

    created, output = run_module(emulator, args)
    assert created["changed"] is True
    assert created["stage"] == "Active"
    assert len(created["dns_ip_addrs"]) == 2
    assert created["security_group_id"].startswith("sg-")
    assert PASSWORD not in output

    again, _output = run_module(emulator, args)
    assert again["changed"] is False
    assert again["directory_id"] == created["directory_id"]

    gone, _output = run_module(emulator, dict(name=args["name"], state="absent", wait=True))
    assert gone["changed"] is True
    assert boto3.client("ds", **kw).describe_directories()["DirectoryDescriptions"] == []
