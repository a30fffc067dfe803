# Copyright: llmfleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""AWS Managed Microsoft AD (Directory Service, the `ds` client) for llmfleet.aws's modules.

Finding a directory by name, describing it, its tags, the return values the modules share, and waiting
for a stage (with an injectable sleep and clock, so tests run instantly). Clients are expected from
module.client("ds", retry_decorator=AWSRetry.jittered_backoff()): single calls pass aws_retry=True.
"""

import contextlib
import time

with contextlib.suppress(ImportError):  # AnsibleAWSModule reports a missing botocore
    from botocore.exceptions import BotoCoreError, ClientError

from ansible.module_utils.common.dict_transformations import camel_dict_to_snake_dict
from ansible_collections.amazon.aws.plugins.module_utils.botocore import is_boto3_error_code
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry
from ansible_collections.amazon.aws.plugins.module_utils.tagging import boto3_tag_list_to_ansible_dict

# stages from which a directory will not become Active by itself
FAILED_STAGES = ("Failed", "Impaired", "Inoperable", "RestoreFailed")
GONE_STAGES = ("Deleting", "Deleted")
# seconds between two looks at a directory while waiting
POLL_DELAY = 15


class DirectoryWaitError(Exception):
    """Waiting for a directory ended without the stage waited for; `directory` is its last description."""

    def __init__(self, message, directory=None):
        super().__init__(message)
        self.directory = directory


# what a settle function returns while the directory is not there yet
_PENDING = object()


def _poll(describe, directory_id, timeout, goal, settle, delay, sleep, clock):
    """Poll describe(directory_id) until settle(description) returns something other than _PENDING, and
    return that (settle raises to stop early). DirectoryWaitError after `timeout` seconds names `goal`."""
    delay = POLL_DELAY if delay is None else delay
    sleep = time.sleep if sleep is None else sleep
    clock = time.monotonic if clock is None else clock
    deadline = clock() + timeout
    while True:
        directory = describe(directory_id)
        outcome = settle(directory)
        if outcome is not _PENDING:
            return outcome
        remaining = deadline - clock()
        if remaining <= 0:
            raise DirectoryWaitError(
                f"timed out after {timeout} seconds waiting for directory {directory_id} {goal};"
                f" its last stage was {directory.get('Stage')}",
                directory,
            )
        sleep(min(delay, remaining))


def wait_until_active(describe, directory_id, timeout, delay=None, sleep=None, clock=None):
    """Poll describe(directory_id) until the directory is Active and return its description.

    Raises DirectoryWaitError when it reaches a stage it does not leave by itself, disappears, or is
    not Active after `timeout` seconds. `delay` defaults to POLL_DELAY; `sleep` and `clock` (time.sleep and
    time.monotonic by default) are injectable, so tests run instantly.
    """

    def settle(directory):
        if directory is None:
            raise DirectoryWaitError(
                f"directory {directory_id} disappeared while waiting for it to become Active"
            )
        stage = directory.get("Stage")
        if stage == "Active":
            return directory
        if stage in FAILED_STAGES or stage in GONE_STAGES:
            reason = directory.get("StageReason") or "AWS gives no reason"
            raise DirectoryWaitError(f"directory {directory_id} is {stage}: {reason}", directory)
        return _PENDING

    return _poll(describe, directory_id, timeout, "to become Active", settle, delay, sleep, clock)


def wait_until_deleted(describe, directory_id, timeout, delay=None, sleep=None, clock=None):
    """Poll describe(directory_id) until the directory is gone or Deleted.

    Raises DirectoryWaitError when it is still there after `timeout` seconds.
    """

    def settle(directory):
        return None if directory is None or directory.get("Stage") == "Deleted" else _PENDING

    _poll(describe, directory_id, timeout, "to be deleted", settle, delay, sleep, clock)


@AWSRetry.jittered_backoff()
def describe_all_directories(client):
    """Every directory of the region (all types and stages). Raises AWS errors."""
    paginator = client.get_paginator("describe_directories")
    return paginator.paginate().build_full_result()["DirectoryDescriptions"]


@AWSRetry.jittered_backoff()
def _list_tags(client, directory_id):
    paginator = client.get_paginator("list_tags_for_resource")
    return paginator.paginate(ResourceId=directory_id).build_full_result()["Tags"]


def microsoft_ad_directories(client, module, name=None, skip_stages=("Deleted",)):
    """The MicrosoftAD directories of the region (named `name`, compared without case, when given),
    leaving out those in `skip_stages`."""
    try:
        directories = describe_all_directories(client)
    except (BotoCoreError, ClientError) as e:
        module.fail_json_aws(e, msg="Unable to list the directories")
    return [
        d
        for d in directories
        if d.get("Type") == "MicrosoftAD"
        and d.get("Stage") not in skip_stages
        and (name is None or d.get("Name", "").lower() == name.lower())
    ]


def describe_directory(client, directory_id):
    """The description of one directory, or None when AWS no longer knows it. Raises AWS errors."""
    try:
        found = client.describe_directories(DirectoryIds=[directory_id], aws_retry=True)[
            "DirectoryDescriptions"
        ]
    except is_boto3_error_code("EntityDoesNotExistException"):
        return None
    return found[0] if found else None


def get_tags(client, module, directory_id):
    try:
        return boto3_tag_list_to_ansible_dict(_list_tags(client, directory_id))
    except (BotoCoreError, ClientError) as e:
        module.fail_json_aws(e, msg=f"Unable to list the tags of directory {directory_id}")


def directory_result(directory, tags=None):
    """The modules' return values for a directory description (and its tags)."""
    vpc = directory.get("VpcSettings") or {}
    return dict(
        directory_id=directory.get("DirectoryId"),
        name=directory.get("Name"),
        short_name=directory.get("ShortName"),
        edition=directory.get("Edition"),
        stage=directory.get("Stage"),
        stage_reason=directory.get("StageReason"),
        description=directory.get("Description"),
        dns_ip_addrs=directory.get("DnsIpAddrs") or [],
        security_group_id=vpc.get("SecurityGroupId"),
        access_url=directory.get("AccessUrl"),
        vpc_settings=camel_dict_to_snake_dict(vpc),
        tags=tags if tags is not None else {},
    )
