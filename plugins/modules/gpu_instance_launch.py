#!/usr/bin/python

# Copyright: llmfleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# Ansible modules import after their DOCUMENTATION, EXAMPLES and RETURN strings.
# ruff: noqa: E402

DOCUMENTATION = r"""
---
module: gpu_instance_launch
version_added: 0.1.0
short_description: Launch one EC2 instance, trying other instance types and subnets when AWS has no capacity
description:
  - Makes sure one instance matching O(filters) exists; when none does (in any state but terminated), launches
    one, trying each of the O(instance_types) in order, each in every one of the O(subnet_ids) in order. A
    type and subnet that AWS answers with C(InsufficientInstanceCapacity) (no capacity of that type in that
    Availability Zone now) is passed over for the next; when all are, the module fails naming every type and
    zone it tried. Any other error fails the module at once.
  - Each type and subnet is tried once. M(amazon.aws.ec2_instance) retries C(InsufficientInstanceCapacity)
    with backoff for minutes, and botocore retries it (an HTTP 500) four more times, on the same type and
    zone; this module asks AWS once per type and subnet and moves on.
  - An instance that exists is left as it is, whatever its state, type or subnet (use
    M(amazon.aws.ec2_instance) to converge its attributes and tags). A new instance starts running, in a
    private subnet without a public address, with the given security groups, instance profile, root volume,
    metadata options and tags (on the instance and its volumes).
author:
  - llmfleet developers (@llmfleet)
options:
  filters:
    description:
      - The DescribeInstances filters that find the instance if it exists, for example its C(tag:Name) and a
        deployment tag. Instances that are terminated or shutting down are not counted.
    type: dict
    required: true
  instance_types:
    description: The instance types, in order of preference.
    type: list
    elements: str
    required: true
  subnet_ids:
    description:
      - The subnets (their Availability Zones) to launch in, in order of preference; every one is tried for a
        type before the next type is.
    type: list
    elements: str
    required: true
  image_id:
    description: The AMI.
    type: str
    required: true
  security_group_ids:
    description: The security groups of the instance's network interface.
    type: list
    elements: str
    default: []
  iam_instance_profile:
    description: The ARN of the instance profile; empty for none.
    type: str
    default: ""
  launch_template:
    description:
      - The name of a launch template to launch from (its default version), for what this module has no option
        for, such as spot market options. The options given here take precedence over the template's.
    type: str
    default: ""
  root_volume:
    description: The root volume (an EBS volume deleted with the instance).
    type: dict
    required: true
    suboptions:
      device_name:
        description: The image's root device name, for example C(/dev/sda1).
        type: str
        required: true
      volume_size:
        description: Size in GiB.
        type: int
        required: true
      volume_type:
        description: The EBS volume type.
        type: str
        default: gp3
      encrypted:
        description: Encrypt the volume.
        type: bool
        default: true
      kms_key_id:
        description: The KMS key of an encrypted volume; empty for the account's default EBS key.
        type: str
        default: ""
  metadata_options:
    description: The instance metadata service's options (C(MetadataOptions) of RunInstances, in snake case).
    type: dict
    default: {http_endpoint: enabled, http_tokens: required, http_put_response_hop_limit: 1}
  tags:
    description:
      - Tags of the new instance and its volumes. Include those O(filters) matches on (such as C(Name)), or
        the next run will not find the instance and will launch another.
    type: dict
    default: {}
  wait_timeout:
    description:
      - Seconds to wait for a new instance to run. One that stops or terminates for want of capacity meanwhile
        counts as a type and subnet without capacity.
    type: int
    default: 600
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
"""

EXAMPLES = r"""
- name: A GPU host, a g6.xlarge in either zone, else a g5.xlarge
  llmfleet.aws.gpu_instance_launch:
    filters:
      "tag:Name": acme-llm-chat
      "tag:llmfleet:deployment": acme-llm
    instance_types: [g6.xlarge, g5.xlarge]
    subnet_ids: [subnet-0aaa, subnet-0bbb]
    image_id: ami-0123456789abcdef0
    security_group_ids: [sg-0123456789abcdef0]
    root_volume: {device_name: /dev/sda1, volume_size: 200}
    tags: {Name: acme-llm-chat, "llmfleet:deployment": acme-llm}
  register: launched
"""

RETURN = r"""
instance:
  description:
    - The instance, as M(amazon.aws.ec2_instance_info) describes one; empty in check mode when it would be
      launched.
  returned: always
  type: dict
launched:
  description: Where the new instance was launched; empty when none was.
  returned: always
  type: dict
  contains:
    instance_type:
      description: Its type.
      type: str
      sample: g6.xlarge
    subnet_id:
      description: Its subnet.
      type: str
    availability_zone:
      description: Its Availability Zone.
      type: str
      sample: us-east-1b
tried:
  description: The types and subnets that had no capacity, in the order tried, each with AWS's message.
  returned: always
  type: list
  elements: dict
  sample: [{instance_type: g6.xlarge, subnet_id: subnet-0aaa, availability_zone: us-east-1a,
            error: InsufficientInstanceCapacity, message: "We currently do not have sufficient ..."}]
"""

import contextlib
import time
import uuid

with contextlib.suppress(ImportError):  # AnsibleAWSModule reports a missing botocore
    from botocore.exceptions import ClientError

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.tagging import ansible_dict_to_boto3_tag_list
from ansible_collections.amazon.aws.plugins.module_utils.transformation import (
    ansible_dict_to_boto3_filter_list,
)
from ansible_collections.llmfleet.aws.plugins.module_utils.capacity import (
    capacity_clients,
    describe_instances,
    error_code,
    error_message,
    is_capacity_error,
    pretty_instance,
    settled_capacity_reason,
    tried_text,
    wait_for_state,
)

# a new instance profile takes a few seconds to be usable by EC2 (IAM is eventually consistent)
PROFILE_NOT_YET = "Invalid IAM Instance Profile"
PROFILE_WAIT = 30


def argument_spec():
    return dict(
        filters=dict(type="dict", required=True),
        instance_types=dict(type="list", elements="str", required=True),
        subnet_ids=dict(type="list", elements="str", required=True),
        image_id=dict(type="str", required=True),
        security_group_ids=dict(type="list", elements="str", default=[]),
        iam_instance_profile=dict(type="str", default=""),
        launch_template=dict(type="str", default=""),
        root_volume=dict(
            type="dict",
            required=True,
            options=dict(
                device_name=dict(type="str", required=True),
                volume_size=dict(type="int", required=True),
                volume_type=dict(type="str", default="gp3"),
                encrypted=dict(type="bool", default=True),
                kms_key_id=dict(type="str", default="", no_log=False),
            ),
        ),
        metadata_options=dict(
            type="dict",
            default=dict(http_endpoint="enabled", http_tokens="required", http_put_response_hop_limit=1),
        ),
        tags=dict(type="dict", default={}),
        wait_timeout=dict(type="int", default=600),
    )


def find_existing(client, filters):
    states = {"instance-state-name": ["pending", "running", "stopping", "stopped"]}
    return describe_instances(client, Filters=ansible_dict_to_boto3_filter_list({**filters, **states}))


def subnet_zones(client, module, subnet_ids):
    try:
        subnets = client.describe_subnets(SubnetIds=sorted(set(subnet_ids)), aws_retry=True)["Subnets"]
    except ClientError as e:
        module.fail_json_aws(e, msg=f"Unable to describe the subnets {', '.join(subnet_ids)}")
    return {s["SubnetId"]: s["AvailabilityZone"] for s in subnets}


def run_spec(params, candidate):
    volume = params["root_volume"]
    ebs = {
        "VolumeSize": volume["volume_size"],
        "VolumeType": volume["volume_type"],
        "Encrypted": volume["encrypted"],
        "DeleteOnTermination": True,
    }
    if volume["kms_key_id"]:
        ebs["KmsKeyId"] = volume["kms_key_id"]
    metadata = {
        "".join(part.capitalize() for part in key.split("_")): value
        for key, value in params["metadata_options"].items()
    }
    spec = {
        "ImageId": params["image_id"],
        "InstanceType": candidate["instance_type"],
        "MinCount": 1,
        "MaxCount": 1,
        # the same token for a retry of this one request (a throttled call sent again launches nothing twice)
        "ClientToken": uuid.uuid4().hex,
        "NetworkInterfaces": [
            {
                "DeviceIndex": 0,
                "SubnetId": candidate["subnet_id"],
                "Groups": params["security_group_ids"],
                "AssociatePublicIpAddress": False,
                "DeleteOnTermination": True,
            }
        ],
        "BlockDeviceMappings": [{"DeviceName": volume["device_name"], "Ebs": ebs}],
        "MetadataOptions": metadata,
    }
    if params["iam_instance_profile"]:
        spec["IamInstanceProfile"] = {"Arn": params["iam_instance_profile"]}
    if params["launch_template"]:
        spec["LaunchTemplate"] = {"LaunchTemplateName": params["launch_template"]}
    if params["tags"]:
        tags = ansible_dict_to_boto3_tag_list(params["tags"])
        spec["TagSpecifications"] = [
            {"ResourceType": "instance", "Tags": tags},
            {"ResourceType": "volume", "Tags": tags},
        ]
    return spec


def run_instance(launch_client, spec):
    """RunInstances once; a profile EC2 does not see yet is asked again for up to PROFILE_WAIT seconds."""
    deadline = time.monotonic() + PROFILE_WAIT
    delay = 2
    while True:
        try:
            return launch_client.run_instances(aws_retry=True, **spec)["Instances"][0]
        except ClientError as e:
            if PROFILE_NOT_YET not in error_message(e) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay *= 2


def launch(module, client, launch_client, zones):
    """Try the types and subnets in order: (instance, where) of the first with capacity, what was tried."""
    tried = []
    candidates = [
        {"instance_type": instance_type, "subnet_id": subnet_id}
        for instance_type in module.params["instance_types"]
        for subnet_id in module.params["subnet_ids"]
    ]
    for candidate in candidates:
        where = dict(candidate, availability_zone=zones.get(candidate["subnet_id"], ""))
        try:
            instance = run_instance(launch_client, run_spec(module.params, candidate))
        except ClientError as e:
            if not is_capacity_error(e):
                module.fail_json_aws(
                    e,
                    msg=f"Unable to launch {candidate['instance_type']} in {where['availability_zone']}"
                    f" ({candidate['subnet_id']})",
                    tried=tried,
                )
            tried.append(dict(where, error=error_code(e), message=error_message(e)))
            continue
        try:
            settled = wait_for_state(client, instance["InstanceId"], module.params["wait_timeout"])
        except TimeoutError as e:
            module.fail_json(msg=f"launched {instance['InstanceId']}, which is not running: {e}", tried=tried)
        if settled["State"]["Name"] == "running":
            return settled, where, tried
        reason = settled_capacity_reason(settled)
        if not reason:
            module.fail_json(
                msg=f"launched {instance['InstanceId']}, which is {settled['State']['Name']}:"
                f" {settled.get('StateReason', {}).get('Message', 'no reason given')}",
                tried=tried,
                instance=pretty_instance(settled),
            )
        tried.append(dict(where, error="InsufficientInstanceCapacity", message=reason))
    return None, None, tried


def main():
    module = AnsibleAWSModule(argument_spec=argument_spec(), supports_check_mode=True)
    for option in ("instance_types", "subnet_ids"):
        if not module.params[option]:
            module.fail_json(msg=f"{option}: at least one is needed")
    client, launch_client = capacity_clients(module)
    try:
        existing = find_existing(client, module.params["filters"])
    except ClientError as e:
        module.fail_json_aws(e, msg="Unable to look for the instance")
    if existing:
        module.exit_json(changed=False, instance=pretty_instance(existing[0]), launched={}, tried=[])
    if module.check_mode:
        module.exit_json(changed=True, instance={}, launched={}, tried=[], msg="would launch an instance")

    zones = subnet_zones(client, module, module.params["subnet_ids"])
    instance, where, tried = launch(module, client, launch_client, zones)
    if instance is None:
        name = module.params["tags"].get("Name") or module.params["filters"].get("tag:Name") or "the instance"
        module.fail_json(
            msg=f"no capacity for {name}: tried {tried_text(tried)} (InsufficientInstanceCapacity for each)",
            tried=tried,
        )
    module.exit_json(changed=True, instance=pretty_instance(instance), launched=where, tried=tried)


if __name__ == "__main__":
    main()
