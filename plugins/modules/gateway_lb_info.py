#!/usr/bin/python

# Copyright: llmfleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# Ansible modules import after their DOCUMENTATION, EXAMPLES and RETURN strings.
# ruff: noqa: E402

DOCUMENTATION = r"""
---
module: gateway_lb_info
version_added: 0.2.0
short_description: Find a deployment's gateway load balancer and target group
description:
  - Looks up the Application Load Balancer and the target group of a deployment's gateways by their name
    (the filter P(llmfleet.aws.gateway_lb_name#filter) gives it), never by listing every load balancer of
    the region.
  - Finds nothing (empty dicts) rather than failing when there is none. M(amazon.aws.elb_application_lb_info)
    given a name that does not exist fails instead (amazon.aws 10).
  - Names are cut to 32 characters, so two long deployment names may cut alike; only resources tagged
    C(llmfleet:deployment) with this deployment are returned.
author:
  - llmfleet developers (@llmfleet)
options:
  deployment:
    description: The deployment's name.
    type: str
    required: true
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
"""

EXAMPLES = r"""
- name: Find the gateways' load balancer
  llmfleet.aws.gateway_lb_info:
    deployment: acme
  register: found

- name: Show its address
  ansible.builtin.debug:
    msg: "{{ found.load_balancer.dns_name }}"
  when: found.load_balancer | length > 0
"""

RETURN = r"""
load_balancer:
  description: The load balancer (DescribeLoadBalancers' entry, snake_case, with its tags), or an empty dict.
  returned: always
  type: dict
  contains:
    load_balancer_name:
      description: Its name.
      type: str
      sample: acme-gw
    load_balancer_arn:
      description: Its ARN.
      type: str
    dns_name:
      description: Its DNS name.
      type: str
    scheme:
      description: C(internal) or C(internet-facing).
      type: str
    tags:
      description: Its tags.
      type: dict
target_group:
  description: The target group (DescribeTargetGroups' entry, snake_case, with its tags), or an empty dict.
  returned: always
  type: dict
  contains:
    target_group_name:
      description: Its name.
      type: str
      sample: acme-gw
    target_group_arn:
      description: Its ARN.
      type: str
    tags:
      description: Its tags.
      type: dict
"""

import contextlib

with contextlib.suppress(ImportError):  # AnsibleAWSModule reports a missing botocore
    from botocore.exceptions import BotoCoreError, ClientError

from ansible.module_utils.common.dict_transformations import camel_dict_to_snake_dict
from ansible_collections.amazon.aws.plugins.module_utils.botocore import is_boto3_error_code
from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry
from ansible_collections.amazon.aws.plugins.module_utils.tagging import boto3_tag_list_to_ansible_dict
from ansible_collections.llmfleet.aws.plugins.module_utils.gateway_names import gateway_lb_name


def _own(client, module, entry, arn_key, deployment):
    """The entry in snake_case with its tags, when it carries this deployment's tag; else {}."""
    arn = entry[arn_key]
    try:
        described = client.describe_tags(ResourceArns=[arn], aws_retry=True)["TagDescriptions"]
    except (ClientError, BotoCoreError) as e:
        module.fail_json_aws(e, msg=f"Could not read the tags of {arn}")
    tags = boto3_tag_list_to_ansible_dict(described[0]["Tags"] if described else [])
    if tags.get("llmfleet:deployment") != deployment:
        return {}
    result = camel_dict_to_snake_dict(entry)
    result["tags"] = tags
    return result


def _described(module, call, not_found, what):
    """The entries a Describe call answers; [] when AWS says there is no such resource."""
    try:
        return call()
    except is_boto3_error_code(not_found):
        return []
    except (ClientError, BotoCoreError) as e:  # pylint: disable=duplicate-except
        module.fail_json_aws(e, msg=f"Could not look up {what}")


def find(client, module, deployment):
    name = gateway_lb_name(deployment)
    load_balancers = _described(
        module,
        lambda: client.describe_load_balancers(Names=[name], aws_retry=True)["LoadBalancers"],
        "LoadBalancerNotFound",
        f"the load balancer {name}",
    )
    target_groups = _described(
        module,
        lambda: client.describe_target_groups(Names=[name], aws_retry=True)["TargetGroups"],
        "TargetGroupNotFound",
        f"the target group {name}",
    )
    load_balancer = (
        _own(client, module, load_balancers[0], "LoadBalancerArn", deployment) if load_balancers else {}
    )
    target_group = (
        _own(client, module, target_groups[0], "TargetGroupArn", deployment) if target_groups else {}
    )
    return load_balancer, target_group


def main():
    module = AnsibleAWSModule(
        argument_spec=dict(deployment=dict(type="str", required=True)), supports_check_mode=True
    )
    try:
        gateway_lb_name(module.params["deployment"])
    except ValueError as e:
        module.fail_json(msg=f"deployment: {e}")
    client = module.client("elbv2", retry_decorator=AWSRetry.jittered_backoff())
    load_balancer, target_group = find(client, module, module.params["deployment"])
    module.exit_json(changed=False, load_balancer=load_balancer, target_group=target_group)


if __name__ == "__main__":
    main()
