#!/usr/bin/python

# Copyright: llmfleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# Ansible modules import after their DOCUMENTATION, EXAMPLES and RETURN strings.
# ruff: noqa: E402

DOCUMENTATION = r"""
---
module: managed_ad_info
version_added: 0.1.0
short_description: Describe AWS Managed Microsoft AD directories
description:
  - Lists the AWS Managed Microsoft AD directories of the region (type C(MicrosoftAD)), or the one named
    O(name), with the same return values as M(llmfleet.aws.managed_ad).
  - Finds nothing (an empty list) rather than failing when no directory has the name.
author:
  - llmfleet developers (@llmfleet)
options:
  name:
    description:
      - The directory's fully qualified domain name, compared without regard to case.
      - Without it, every MicrosoftAD directory of the region is described.
    type: str
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
"""

EXAMPLES = r"""
- name: Find the deployment's directory
  llmfleet.aws.managed_ad_info:
    name: corp.example.com
  register: found

- name: Point clients at its DNS servers
  ansible.builtin.debug:
    msg: "{{ found.directories[0].dns_ip_addrs }}"
  when: found.directories | length > 0
"""

RETURN = r"""
directories:
  description:
    - The directories found (not those being deleted), each as M(llmfleet.aws.managed_ad) returns one.
  returned: always
  type: list
  elements: dict
  contains:
    directory_id:
      description: The directory's ID.
      type: str
      sample: d-9067a1b2c3
    name:
      description: Its fully qualified domain name.
      type: str
      sample: corp.example.com
    short_name:
      description: Its NetBIOS name.
      type: str
      sample: CORP
    edition:
      description: Standard or Enterprise.
      type: str
    stage:
      description: Its stage, for example C(Creating) or C(Active).
      type: str
      sample: Active
    stage_reason:
      description: Why it is in that stage, when AWS says.
      type: str
    description:
      description: Its description.
      type: str
    dns_ip_addrs:
      description: The addresses of its DNS servers (its domain controllers).
      type: list
      elements: str
      sample: ["10.42.128.10", "10.42.144.10"]
    security_group_id:
      description: The security group AWS made for its domain controllers.
      type: str
    access_url:
      description: Its access URL.
      type: str
    vpc_settings:
      description: Its VPC, subnets and availability zones.
      type: dict
    tags:
      description: Its tags.
      type: dict
"""

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry
from ansible_collections.llmfleet.aws.plugins.module_utils.directory import (
    GONE_STAGES,
    directory_result,
    get_tags,
    microsoft_ad_directories,
)


def list_directories(client, module, name):
    found = microsoft_ad_directories(client, module, name, skip_stages=GONE_STAGES)
    return [directory_result(d, get_tags(client, module, d["DirectoryId"])) for d in found]


def main():
    module = AnsibleAWSModule(argument_spec=dict(name=dict(type="str")), supports_check_mode=True)
    client = module.client("ds", retry_decorator=AWSRetry.jittered_backoff())
    module.exit_json(changed=False, directories=list_directories(client, module, module.params["name"]))


if __name__ == "__main__":
    main()
