#!/usr/bin/python

# Copyright: llmfleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# Ansible modules import after their DOCUMENTATION, EXAMPLES and RETURN strings.
# ruff: noqa: E402

DOCUMENTATION = r"""
---
module: managed_ad
version_added: 0.1.0
short_description: Create or delete an AWS Managed Microsoft AD directory
description:
  - Creates, tags and deletes an AWS Directory Service for Microsoft Active Directory directory
    (AWS Managed Microsoft AD) with the C(ds) API.
  - The directory is found by its fully qualified domain name O(name) (compared without regard to case)
    among the directories of type C(MicrosoftAD) in the region, so running the module again with the same
    O(name) creates nothing.
  - The settings fixed when AWS creates a directory (O(short_name), O(edition), O(password), O(vpc_id),
    O(subnet_ids) and O(description)) are not changed on an existing directory; the module warns when they
    differ from what it finds. Only O(tags) are brought up to date.
  - Creating a directory takes 20 to 45 minutes on AWS. With O(wait=true) the module polls the directory
    until its stage is C(Active), and fails as soon as the stage is C(Failed), C(Impaired),
    C(Inoperable) or C(RestoreFailed), giving the reason AWS reports.
author:
  - llmfleet developers (@llmfleet)
options:
  state:
    description:
      - V(present) creates the directory when no directory of that O(name) belongs to this deployment
        (see O(match_tags)) and updates its O(tags).
      - V(absent) deletes the directory of that O(name) that belongs to this deployment, if any; a directory
        of the same name that does not is left alone.
    type: str
    choices: [present, absent]
    default: present
  name:
    description:
      - The fully qualified domain name of the directory, for example V(corp.example.com).
      - It identifies the directory together with O(vpc_id) and O(match_tags); it cannot be changed after
        creation.
    type: str
    required: true
  match_tags:
    description:
      - Keys of O(tags) whose values an existing directory of that O(name) must carry to be this one (for
        example V(llmfleet:deployment)); when O(vpc_id) is set, the directory must be in that VPC too.
      - With O(state=present), a directory of that O(name) that does not match (another VPC, another
        deployment) makes the module fail, naming it, rather than adopt it.
      - Empty (the default) matches on O(name) (and O(vpc_id), when set) alone.
    type: list
    elements: str
    default: []
  short_name:
    description:
      - The NetBIOS name of the domain, for example V(CORP).
      - When not set, AWS derives it from the first label of O(name).
      - Used only when the directory is created.
    type: str
  edition:
    description:
      - The edition of AWS Managed Microsoft AD.
      - Used only when the directory is created; V(Standard) when not set.
    type: str
    choices: [Standard, Enterprise]
  password:
    description:
      - The password of the directory's C(Admin) user.
      - Required to create a directory; ignored for an existing one.
      - AWS requires 8 to 64 characters from at least three of the four classes lower-case letters,
        upper-case letters, digits and other characters, and rejects a password that contains the word
        C(admin). The module checks this before it calls AWS.
    type: str
  vpc_id:
    description:
      - The VPC in which the domain controllers are created.
      - Required to create a directory.
    type: str
  subnet_ids:
    description:
      - The two subnets for the domain controllers, in two different availability zones of O(vpc_id).
      - Required to create a directory.
    type: list
    elements: str
  description:
    description:
      - A description of the directory.
      - Used only when the directory is created.
    type: str
  wait:
    description:
      - With V(state=present), wait until the directory is C(Active).
      - With V(state=absent), wait until the directory is gone.
      - Nothing is waited for in check mode.
    type: bool
    default: false
  wait_timeout:
    description:
      - How long to wait, in seconds, when O(wait=true).
    type: int
    default: 3600
notes:
  - Idempotency is by O(name). Directories whose stage is C(Deleted) are ignored. A directory that is being
    deleted cannot be made present again until AWS has finished deleting it.
  - Support for check mode is full; in check mode the module reads the directory and its tags only.
  - The module uses C(ds:DescribeDirectories), C(ds:CreateMicrosoftAD), C(ds:DeleteDirectory),
    C(ds:ListTagsForResource), C(ds:AddTagsToResource) and C(ds:RemoveTagsFromResource). Creating a
    directory also needs the EC2 permissions AWS Directory Service documents for creating its security
    group and network interfaces.
seealso:
  - name: AWS Managed Microsoft AD
    description: The AWS Directory Service administration guide.
    link: https://docs.aws.amazon.com/directoryservice/latest/admin-guide/directory_microsoft_ad.html
  - module: amazon.aws.ec2_vpc_dhcp_option
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.tags
  - amazon.aws.boto3
"""

EXAMPLES = r"""
# Note: These examples do not set authentication details, see the AWS Guide for details.

- name: Create a directory and wait until it is Active
  llmfleet.aws.managed_ad:
    name: corp.example.com
    short_name: CORP
    edition: Standard
    password: "{{ directory_admin_password }}"
    vpc_id: vpc-0123456789abcdef0
    subnet_ids:
      - subnet-0123456789abcdef0
      - subnet-0fedcba9876543210
    description: Directory of the llmfleet users
    tags:
      llmfleet:deployment: prod
    wait: true
    wait_timeout: 3600
  no_log: true
  register: directory

- name: Point the VPC's DHCP options at the directory's DNS servers
  amazon.aws.ec2_vpc_dhcp_option:
    vpc_id: vpc-0123456789abcdef0
    domain_name: corp.example.com
    dns_servers: "{{ directory.dns_ip_addrs }}"

- name: Delete the directory and wait until it is gone
  llmfleet.aws.managed_ad:
    name: corp.example.com
    state: absent
    wait: true
"""

RETURN = r"""
directory_id:
  description: The identifier of the directory; null when it does not exist (yet, in check mode).
  returned: always
  type: str
  sample: d-906731b2a4
name:
  description: The fully qualified domain name of the directory.
  returned: always
  type: str
  sample: corp.example.com
short_name:
  description: The NetBIOS name of the domain.
  returned: when the directory exists or would be created
  type: str
  sample: CORP
edition:
  description: The edition of the directory.
  returned: when the directory exists or would be created
  type: str
  sample: Standard
stage:
  description:
    - The directory's stage, for example C(Creating), C(Active), C(Failed) or C(Deleting).
    - Null when the directory would be created (check mode).
  returned: when the directory exists or would be created
  type: str
  sample: Active
stage_reason:
  description: Why the directory is in its stage, when AWS gives a reason.
  returned: when the directory exists
  type: str
  sample: null
description:
  description: The description of the directory.
  returned: when the directory exists or would be created
  type: str
  sample: Directory of the llmfleet users
dns_ip_addrs:
  description: The IP addresses of the directory's DNS servers (its domain controllers).
  returned: when the directory exists or would be created; empty until AWS has assigned them
  type: list
  elements: str
  sample: ["10.42.128.10", "10.42.144.10"]
security_group_id:
  description: The security group that AWS created for the domain controllers.
  returned: when the directory exists
  type: str
  sample: sg-0123456789abcdef0
access_url:
  description: The access URL of the directory.
  returned: when the directory exists
  type: str
  sample: d-906731b2a4.awsapps.com
vpc_settings:
  description: Where the domain controllers are.
  returned: when the directory exists or would be created
  type: dict
  contains:
    vpc_id:
      description: The VPC of the directory.
      type: str
      returned: always
      sample: vpc-0123456789abcdef0
    subnet_ids:
      description: The subnets of the domain controllers.
      type: list
      elements: str
      returned: always
      sample: ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"]
    security_group_id:
      description: The security group of the domain controllers.
      type: str
      returned: when the directory exists
      sample: sg-0123456789abcdef0
    availability_zones:
      description: The availability zones of the subnets.
      type: list
      elements: str
      returned: when the directory exists
      sample: ["us-east-1a", "us-east-1b"]
tags:
  description: The directory's tags (after the change, or as they would be in check mode).
  returned: when the directory exists or would be created
  type: dict
  sample: {"llmfleet:deployment": "prod"}
"""

import contextlib

with contextlib.suppress(ImportError):  # AnsibleAWSModule reports a missing botocore
    from botocore.exceptions import BotoCoreError, ClientError

from ansible_collections.amazon.aws.plugins.module_utils.botocore import is_boto3_error_code
from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry
from ansible_collections.amazon.aws.plugins.module_utils.tagging import (
    ansible_dict_to_boto3_tag_list,
    compare_aws_tags,
)
from ansible_collections.llmfleet.aws.plugins.module_utils.directory import (
    DirectoryWaitError,
    describe_directory,
    directory_result,
    get_tags,
    microsoft_ad_directories,
    wait_until_active,
    wait_until_deleted,
)

DEFAULT_EDITION = "Standard"


def ensure_tags(client, module, directory_id, current):
    """Bring the directory's tags (now `current`) to module.params['tags']; return (changed, tags after)."""
    wanted = module.params.get("tags")
    if wanted is None:
        return False, current
    to_set, to_unset = compare_aws_tags(current, wanted, module.params.get("purge_tags"))
    if not to_set and not to_unset:
        return False, current
    expected = {k: v for k, v in current.items() if k not in to_unset}
    expected.update({k: str(v) for k, v in to_set.items()})
    if module.check_mode:
        return True, expected
    try:
        if to_unset:
            client.remove_tags_from_resource(ResourceId=directory_id, TagKeys=to_unset, aws_retry=True)
        if to_set:
            client.add_tags_to_resource(
                ResourceId=directory_id, Tags=ansible_dict_to_boto3_tag_list(to_set), aws_retry=True
            )
    except (BotoCoreError, ClientError) as e:
        module.fail_json_aws(e, msg=f"Unable to update the tags of directory {directory_id}")
    return True, expected


def password_problem(password):
    """Why AWS would refuse `password` for a directory's Admin user, or None."""
    if not 8 <= len(password) <= 64:
        return "it must be 8 to 64 characters long"
    if "admin" in password.lower():
        return "it must not contain the word admin"
    classes = [
        any(c.islower() for c in password),
        any(c.isupper() for c in password),
        any(c.isdigit() for c in password),
        any(not c.isalnum() for c in password),
    ]
    if sum(classes) < 3:
        return "it must contain three of: lower-case letters, upper-case letters, digits, other characters"
    return None


def check_create_params(module):
    """Fail, naming the option, when the parameters do not allow creating a directory."""
    params = module.params
    name = params["name"]
    missing = [key for key in ("password", "vpc_id", "subnet_ids") if not params.get(key)]
    if missing:
        module.fail_json(msg=f"Directory {name} does not exist; creating it requires {', '.join(missing)}")
    problem = password_problem(params["password"])
    if problem:
        module.fail_json(msg=f"password is not acceptable to AWS Managed Microsoft AD: {problem}")
    subnets = params["subnet_ids"]
    if len(subnets) != 2 or len(set(subnets)) != 2:
        module.fail_json(
            msg=f"subnet_ids must name two different subnets, in two availability zones; got {subnets}"
        )


def warn_on_drift(module, directory):
    """Warn about settings that differ but cannot be changed on an existing directory."""
    params = module.params
    vpc = directory.get("VpcSettings") or {}
    differences = []
    if (
        params.get("short_name")
        and params["short_name"].upper() != (directory.get("ShortName") or "").upper()
    ):
        differences.append(f"short_name is {directory.get('ShortName')}")
    if params.get("edition") and directory.get("Edition") and params["edition"] != directory["Edition"]:
        differences.append(f"edition is {directory['Edition']}")
    if params.get("vpc_id") and params["vpc_id"] != vpc.get("VpcId"):
        differences.append(f"vpc_id is {vpc.get('VpcId')}")
    if params.get("subnet_ids") and sorted(params["subnet_ids"]) != sorted(vpc.get("SubnetIds") or []):
        differences.append(f"subnet_ids are {vpc.get('SubnetIds')}")
    if params.get("description") is not None and params["description"] != directory.get("Description", ""):
        differences.append(f"description is {directory.get('Description')!r}")
    if differences:
        module.warn(
            f"Directory {directory['DirectoryId']} ({directory.get('Name')}) already exists; these"
            f" settings cannot be changed on it: {'; '.join(differences)}"
        )


def wait_for_active(client, module, directory_id):
    try:
        return wait_until_active(
            lambda d: describe_directory(client, d), directory_id, module.params["wait_timeout"]
        )
    except DirectoryWaitError as e:
        result = directory_result(e.directory) if e.directory else dict(directory_id=directory_id)
        module.fail_json(msg=str(e), **result)
    except (BotoCoreError, ClientError) as e:
        module.fail_json_aws(e, msg=f"Unable to describe directory {directory_id} while waiting for it")


def create_directory(client, module):
    """Create the directory; return the module's result."""
    params = module.params
    check_create_params(module)
    tags = params.get("tags") or {}
    if module.check_mode:
        return dict(
            changed=True,
            directory_id=None,
            name=params["name"],
            short_name=params.get("short_name"),
            edition=params.get("edition") or DEFAULT_EDITION,
            stage=None,
            description=params.get("description"),
            dns_ip_addrs=[],
            vpc_settings=dict(vpc_id=params["vpc_id"], subnet_ids=params["subnet_ids"]),
            tags={k: str(v) for k, v in tags.items()},
        )
    request = dict(
        Name=params["name"],
        Password=params["password"],
        Edition=params.get("edition") or DEFAULT_EDITION,
        VpcSettings=dict(VpcId=params["vpc_id"], SubnetIds=params["subnet_ids"]),
    )
    if params.get("short_name"):
        request["ShortName"] = params["short_name"]
    if params.get("description"):
        request["Description"] = params["description"]
    if tags:
        request["Tags"] = ansible_dict_to_boto3_tag_list(tags)
    try:
        directory_id = client.create_microsoft_ad(aws_retry=True, **request)["DirectoryId"]
    except (BotoCoreError, ClientError) as e:
        module.fail_json_aws(e, msg=f"Unable to create directory {params['name']}")
    if params["wait"]:
        directory = wait_for_active(client, module, directory_id)
    else:
        try:
            directory = describe_directory(client, directory_id) or dict(DirectoryId=directory_id)
        except (BotoCoreError, ClientError) as e:
            module.fail_json_aws(e, msg=f"Unable to describe directory {directory_id}")
    return dict(changed=True, **directory_result(directory, get_tags(client, module, directory_id)))


def belongs(module, directory, tags):
    """Whether `directory` (with its `tags`) is this module's: in O(vpc_id), carrying the O(match_tags)."""
    params = module.params
    wanted = params.get("tags") or {}
    vpc = (directory.get("VpcSettings") or {}).get("VpcId")
    if params.get("vpc_id") and vpc != params["vpc_id"]:
        return False
    return all(str(tags.get(key)) == str(wanted.get(key)) for key in params["match_tags"])


def find_own_directory(client, module):
    """(This deployment's directory of O(name) and its tags, or (None, None)), and the same-named others,
    each with its tags."""
    params = module.params
    missing = [key for key in params["match_tags"] if key not in (params.get("tags") or {})]
    if missing:
        module.fail_json(msg=f"match_tags names {', '.join(missing)}, which tags does not set")
    own, others = [], []
    for directory in microsoft_ad_directories(client, module, params["name"]):
        tags = get_tags(client, module, directory["DirectoryId"])
        (own if belongs(module, directory, tags) else others).append((directory, tags))
    if len(own) > 1:
        ids = ", ".join(found[0]["DirectoryId"] for found in own)
        module.fail_json(msg=f"Found {len(own)} directories {params['name']} of this deployment ({ids})")
    return (own[0] if own else (None, None)), others


def describe_other(directory, tags):
    vpc = (directory.get("VpcSettings") or {}).get("VpcId")
    tagged = ", ".join(f"{k}={v}" for k, v in sorted(tags.items())) or "no tags"
    return f"{directory['DirectoryId']} (VPC {vpc}; {tagged})"


def ensure_present(client, module):
    """Create the directory when absent, update its tags; return the module's result."""
    (directory, tags), others = find_own_directory(client, module)
    if directory is None and others:
        params = module.params
        wanted = {key: (params.get("tags") or {}).get(key) for key in params["match_tags"]}
        module.fail_json(
            msg=f"A directory named {params['name']} exists that is not this one (VPC {params.get('vpc_id')},"
            f" {wanted}): {'; '.join(describe_other(d, t) for d, t in others)}. It is not adopted or changed;"
            " choose another domain name, or remove that directory"
        )
    if directory is None:
        return create_directory(client, module)
    directory_id, name = directory["DirectoryId"], directory.get("Name")
    if directory.get("Stage") == "Deleting":
        module.fail_json(
            msg=f"Directory {directory_id} ({name}) is being deleted; try again once it is gone",
            **directory_result(directory),
        )
    warn_on_drift(module, directory)
    changed, tags = ensure_tags(client, module, directory_id, tags)
    if module.params["wait"] and not module.check_mode and directory.get("Stage") != "Active":
        directory = wait_for_active(client, module, directory_id)
    return dict(changed=changed, **directory_result(directory, tags))


def ensure_absent(client, module):
    """Delete the directory when present; return the module's result."""
    name = module.params["name"]
    (directory, _tags), _others = find_own_directory(client, module)
    if directory is None:
        return dict(changed=False, directory_id=None, name=name)
    directory_id = directory["DirectoryId"]
    changed = directory.get("Stage") != "Deleting"
    if module.check_mode:
        result = directory_result(directory)
        del result["tags"]
        return dict(changed=changed, **result)
    if changed:
        try:
            client.delete_directory(DirectoryId=directory_id, aws_retry=True)
        except is_boto3_error_code("EntityDoesNotExistException"):
            changed = False
        except (BotoCoreError, ClientError) as e:  # pylint: disable=duplicate-except
            module.fail_json_aws(e, msg=f"Unable to delete directory {directory_id} ({name})")
    stage = "Deleting"
    if module.params["wait"]:
        try:
            wait_until_deleted(
                lambda d: describe_directory(client, d), directory_id, module.params["wait_timeout"]
            )
        except DirectoryWaitError as e:
            module.fail_json(msg=str(e), directory_id=directory_id, name=name)
        except (BotoCoreError, ClientError) as e:
            module.fail_json_aws(e, msg=f"Unable to describe directory {directory_id} while it is deleted")
        stage = "Deleted"
    result = directory_result(directory)
    result.update(stage=stage)
    del result["tags"]
    return dict(changed=changed, **result)


def argument_spec():
    return dict(
        state=dict(type="str", choices=["present", "absent"], default="present"),
        name=dict(type="str", required=True),
        match_tags=dict(type="list", elements="str", default=[]),
        short_name=dict(type="str"),
        edition=dict(type="str", choices=["Standard", "Enterprise"]),
        password=dict(type="str", no_log=True),
        vpc_id=dict(type="str"),
        subnet_ids=dict(type="list", elements="str"),
        description=dict(type="str"),
        tags=dict(type="dict", aliases=["resource_tags"]),
        purge_tags=dict(type="bool", default=True),
        wait=dict(type="bool", default=False),
        wait_timeout=dict(type="int", default=3600),
    )


def main():
    module = AnsibleAWSModule(argument_spec=argument_spec(), supports_check_mode=True)
    client = module.client("ds", retry_decorator=AWSRetry.jittered_backoff())
    if module.params["state"] == "present":
        result = ensure_present(client, module)
    else:
        result = ensure_absent(client, module)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
