#!/usr/bin/python

# Copyright: llmfleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# Ansible modules import after their DOCUMENTATION, EXAMPLES and RETURN strings.
# ruff: noqa: E402

DOCUMENTATION = r"""
---
module: managed_ad_accounts
version_added: 0.1.0
short_description: Security groups and a service account in AWS Managed Microsoft AD
description:
  - Makes sure the security groups O(groups) and the user O(service_account) exist in an AWS Managed
    Microsoft AD directory, through the Directory Service Data API (C(ds-data)), from wherever the
    controller runs (no network path into the VPC is needed).
  - Directory data access is turned on first when it is off (C(ds:EnableDirectoryDataAccess)), unless
    O(enable_data_access=false).
  - Groups and users made this way live in the directory's own OU (C(OU=Users,OU=<NetBIOS name>,...)).
    Groups are Global Security groups. A user made this way is disabled until its password is set; the
    module sets it (C(ds:ResetUserPassword), which also enables the account) when it makes the user, when
    the user exists but is disabled (an earlier run stopped half-way), and on every run with
    O(update_password=always).
  - Existing groups and users are left as they are; nothing is deleted.
author:
  - llmfleet developers (@llmfleet)
options:
  directory_id:
    description: The directory's ID.
    type: str
    required: true
  groups:
    description: The names (sAMAccountName, at most 20 characters) of the security groups.
    type: list
    elements: str
    default: []
  service_account:
    description: The user to make, for an application that reads the directory.
    type: dict
    suboptions:
      name:
        description: Its sAMAccountName (at most 20 characters).
        type: str
        required: true
      password:
        description: Its password (the directory's complexity rules apply); never logged.
        type: str
        required: true
  update_password:
    description:
      - V(on_create) sets the password only when the module makes the user (or finds it disabled);
        V(always) sets it on every run (always reporting a change).
    type: str
    choices: [on_create, always]
    default: on_create
  enable_data_access:
    description: Turn on directory data access when it is off (and wait until it is on).
    type: bool
    default: true
  wait_timeout:
    description: How long to wait for directory data access to be on, in seconds.
    type: int
    default: 300
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
notes:
  - The Directory Service Data API is not offered in every region. Where it is not, the module fails
    saying so; make the groups and the account with your own tools then.
"""

EXAMPLES = r"""
- name: The groups and the service account llmfleet's agents use
  llmfleet.aws.managed_ad_accounts:
    directory_id: d-9067a1b2c3
    groups: [llmfleet-users, llmfleet-operators, llmfleet-admins]
    service_account:
      name: llmfleet-svc
      password: "{{ service_password }}"
  register: accounts
"""

RETURN = r"""
data_access:
  description: The directory's data access status at the end (C(Enabled); in check mode maybe not yet).
  returned: always
  type: str
  sample: Enabled
groups:
  description: The groups, as the directory describes them (in check mode, those that would be made
    have no C(distinguished_name)).
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Its sAMAccountName.
      type: str
    distinguished_name:
      description: Its DN.
      type: str
      sample: CN=llmfleet-users,OU=Users,OU=CORP,DC=corp,DC=example,DC=com
    sid:
      description: Its SID.
      type: str
service_account:
  description: The service account, as the directory describes it.
  returned: when O(service_account) is given
  type: dict
  contains:
    name:
      description: Its sAMAccountName.
      type: str
    user_principal_name:
      description: Its UPN.
      type: str
    distinguished_name:
      description: Its DN.
      type: str
    enabled:
      description: Whether it may sign in.
      type: bool
"""

import contextlib
import time

with contextlib.suppress(ImportError):  # AnsibleAWSModule reports a missing botocore
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from ansible_collections.amazon.aws.plugins.module_utils.botocore import is_boto3_error_code
from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry

POLL_DELAY = 5
MAX_NAME = 20


def argument_spec():
    return dict(
        directory_id=dict(type="str", required=True),
        groups=dict(type="list", elements="str", default=[]),
        service_account=dict(
            type="dict",
            options=dict(
                name=dict(type="str", required=True),
                password=dict(type="str", required=True, no_log=True),
            ),
        ),
        update_password=dict(type="str", choices=["on_create", "always"], default="on_create"),
        enable_data_access=dict(type="bool", default=True),
        wait_timeout=dict(type="int", default=300),
    )


def ensure_data_access(ds, module, directory_id, sleep=time.sleep, clock=time.monotonic):
    """The data access status once it is on (or would be, in check mode); whether it changed."""
    status = ds.describe_directory_data_access(DirectoryId=directory_id, aws_retry=True)["DataAccessStatus"]
    if status == "Enabled":
        return status, False
    if not module.params["enable_data_access"]:
        module.fail_json(
            msg=f"directory data access of {directory_id} is {status}: turn it on (enable_data_access) or"
            " make the groups and the account yourself"
        )
    if module.check_mode:
        return status, True
    if status in ("Disabled", "Failed"):
        ds.enable_directory_data_access(DirectoryId=directory_id, aws_retry=True)
    deadline = clock() + module.params["wait_timeout"]
    while True:
        status = ds.describe_directory_data_access(DirectoryId=directory_id, aws_retry=True)[
            "DataAccessStatus"
        ]
        if status == "Enabled":
            return status, True
        if status == "Failed" or clock() >= deadline:
            module.fail_json(msg=f"directory data access of {directory_id} did not turn on: it is {status}")
        sleep(POLL_DELAY)


def _describe(data, kind, directory_id, name):
    """The group or user (ds-data's description), or None when the directory has none of that name."""
    call = data.describe_group if kind == "group" else data.describe_user
    try:
        return call(DirectoryId=directory_id, SAMAccountName=name, aws_retry=True)
    except is_boto3_error_code("ResourceNotFoundException"):
        return None


def ensure_group(data, module, directory_id, name):
    found = _describe(data, "group", directory_id, name)
    if found is not None:
        return found, False
    if not module.check_mode:
        data.create_group(
            DirectoryId=directory_id,
            SAMAccountName=name,
            GroupType="Security",
            GroupScope="Global",
            aws_retry=True,
        )
        found = _describe(data, "group", directory_id, name)
    return found or {"SAMAccountName": name}, True


def ensure_service_account(data, ds, module, directory_id, account):
    name, password = account["name"], account["password"]
    found = _describe(data, "user", directory_id, name)
    changed = found is None
    if found is None and not module.check_mode:
        data.create_user(DirectoryId=directory_id, SAMAccountName=name, aws_retry=True)
    set_password = (
        found is None or not found.get("Enabled", False) or module.params["update_password"] == "always"  # noqa: S105
    )
    if set_password and not module.check_mode:
        try:
            ds.reset_user_password(
                DirectoryId=directory_id, UserName=name, NewPassword=password, aws_retry=True
            )
        except is_boto3_error_code("InvalidPasswordException") as exc:
            module.fail_json_aws(
                exc, msg=f"the directory refused the password of {name} (its complexity rules)"
            )
        found = _describe(data, "user", directory_id, name)
    return found or {"SAMAccountName": name, "Enabled": True}, changed or set_password


def _group_result(group):
    return {
        "name": group.get("SAMAccountName"),
        "distinguished_name": group.get("DistinguishedName"),
        "sid": group.get("SID"),
    }


def _user_result(user):
    return {
        "name": user.get("SAMAccountName"),
        "user_principal_name": user.get("UserPrincipalName"),
        "distinguished_name": user.get("DistinguishedName"),
        "enabled": user.get("Enabled"),
    }


def run(module, ds, data):
    params = module.params
    directory_id = params["directory_id"]
    names = list(params["groups"]) + (
        [params["service_account"]["name"]] if params["service_account"] else []
    )
    for name in names:
        if not name or len(name) > MAX_NAME:
            module.fail_json(msg=f"{name!r}: a group's or account's name must be 1 to {MAX_NAME} characters")
    status, changed = ensure_data_access(ds, module, directory_id)
    result = {"data_access": status, "groups": []}
    if status != "Enabled":  # check mode, access still off: everything would be made
        result["groups"] = [{"name": name} for name in params["groups"]]
        if params["service_account"]:
            result["service_account"] = {"name": params["service_account"]["name"]}
        return dict(result, changed=True)
    for name in params["groups"]:
        group, made = ensure_group(data, module, directory_id, name)
        result["groups"].append(_group_result(group))
        changed = changed or made
    if params["service_account"]:
        user, made = ensure_service_account(data, ds, module, directory_id, params["service_account"])
        result["service_account"] = _user_result(user)
        changed = changed or made
    return dict(result, changed=changed)


def main():
    module = AnsibleAWSModule(argument_spec=argument_spec(), supports_check_mode=True)
    retry = AWSRetry.jittered_backoff()
    ds = module.client("ds", retry_decorator=retry)
    data = module.client("ds-data", retry_decorator=retry)
    try:
        module.exit_json(**run(module, ds, data))
    except EndpointConnectionError as exc:
        module.fail_json_aws(
            exc,
            msg=f"the Directory Service Data API (ds-data) does not answer in {module.region}: it is not"
            " offered in every region; make the groups and the service account yourself there",
        )
    except (BotoCoreError, ClientError) as exc:
        module.fail_json_aws(
            exc, msg=f"could not set up the accounts of directory {module.params['directory_id']}"
        )


if __name__ == "__main__":
    main()
