#!/usr/bin/python

# Copyright: llmfleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# Ansible modules import after their DOCUMENTATION, EXAMPLES and RETURN strings.
# ruff: noqa: E402

DOCUMENTATION = r"""
---
module: gpu_quota_info
version_added: 0.1.0
short_description: Compare a deployment's GPU hosts with the account's EC2 vCPU quotas
description:
  - EC2 limits the vCPUs that run at once per instance family class and region (Service Quotas, service
    C(ec2)), on-demand and spot apart; a launch over the quota fails with C(VcpuLimitExceeded). A new
    account's quota for G and VT instances is often 0.
  - Adds up the vCPUs of the O(hosts) as if they all ran (a host that exists counts with its instance's
    type, one that does not with its first type), adds the vCPUs of the other running instances of the region
    in the same class and market, and reads each quota's value - C(L-DB2E81BA) Running On-Demand G and VT
    instances, C(L-3819A6DF) All G and VT Spot Instance Requests, C(L-417A185B) Running On-Demand P
    instances, C(L-7212CCBC) All P Spot Instance Requests, and the Standard ones (C(L-1216C47A),
    C(L-34B43A08)). Families of other classes (Inf, Trn, DL, F, X, ...) are listed in C(unchecked).
  - vCPUs per type come from DescribeInstanceTypes; a type of O(hosts) that does not exist in the region fails
    the module, naming the host.
  - Reads only; needs C(ec2:DescribeInstances), C(ec2:DescribeInstanceTypes) and
    C(servicequotas:GetServiceQuota).
author:
  - llmfleet developers (@llmfleet)
options:
  deployment:
    description:
      - The deployment. A host's instance is the one tagged C(Name=<deployment>-<name>) and
        C(llmfleet:deployment=<deployment>) (not terminated); running instances tagged
        C(llmfleet:deployment=<deployment>) and C(llmfleet:role=gpu-host) are the hosts', not others'.
    type: str
    required: true
  hosts:
    description: The hosts.
    type: list
    elements: dict
    required: true
    suboptions:
      name:
        description: The host's name.
        type: str
        required: true
      instance_types:
        description: Its instance types, in order of preference.
        type: list
        elements: str
        required: true
      spot:
        description: A spot host (counts against the spot quota).
        type: bool
        default: false
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
"""

EXAMPLES = r"""
- name: The GPU hosts against the vCPU quotas
  llmfleet.aws.gpu_quota_info:
    deployment: acme-llm
    hosts:
      - {name: chat, instance_types: [g6.xlarge, g5.xlarge]}
      - {name: batch, instance_types: [g5.12xlarge], spot: true}
  register: quota

- name: Fail before anything is created
  ansible.builtin.assert:
    that: quota.exceeded | length == 0 or quota.to_create | length == 0
    fail_msg: "{{ quota.exceeded | join('; ') }}"
"""

RETURN = r"""
quotas:
  description: Each quota the hosts count against, with its numbers.
  returned: always
  type: list
  elements: dict
  contains:
    family:
      description: The family class, C(G and VT), C(P) or C(Standard).
      type: str
    market:
      description: C(on-demand) or C(spot).
      type: str
    quota_code:
      description: The Service Quotas code.
      type: str
      sample: L-DB2E81BA
    quota_name:
      description: Its name.
      type: str
      sample: Running On-Demand G and VT instances
    value:
      description: The account's quota, in vCPUs.
      type: float
      sample: 8.0
    planned_vcpus:
      description: The vCPUs of the hosts that count against it.
      type: int
      sample: 12
    other_vcpus:
      description: The vCPUs of the other running instances of the region that count against it.
      type: int
    hosts:
      description: The hosts that count against it, each with C(name), C(instance_type), C(vcpus), C(exists).
      type: list
      elements: dict
    exceeded:
      description: Whether the planned and the other vCPUs together are more than the quota.
      type: bool
exceeded:
  description: One message per quota exceeded, with its numbers; empty when none is.
  returned: always
  type: list
  elements: str
  sample:
    - "G and VT on-demand: the GPU hosts need 12 vCPUs (chat g5.xlarge 4, batch g5.2xlarge 8), over the quota
      L-DB2E81BA (Running On-Demand G and VT instances) of 8 vCPUs"
to_create:
  description: The hosts that have no instance yet.
  returned: always
  type: list
  elements: str
unchecked:
  description:
    - The hosts whose instance family has no quota class here, each with C(name) and C(instance_type).
  returned: always
  type: list
  elements: dict
"""

import contextlib

with contextlib.suppress(ImportError):  # AnsibleAWSModule reports a missing botocore
    from botocore.exceptions import ClientError

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry
from ansible_collections.llmfleet.aws.plugins.module_utils.capacity import (
    LIVE_STATES,
    QUOTA_CLASSES,
    describe_instances,
    error_code,
    plan_quotas,
    quota_class,
    quota_report,
)


def argument_spec():
    return dict(
        deployment=dict(type="str", required=True),
        hosts=dict(
            type="list",
            elements="dict",
            required=True,
            options=dict(
                name=dict(type="str", required=True),
                instance_types=dict(type="list", elements="str", required=True),
                spot=dict(type="bool", default=False),
            ),
        ),
    )


def tag(instance, key):
    return next((t["Value"] for t in instance.get("Tags", []) if t["Key"] == key), None)


def vcpus_of(client, module, types, hosts):
    """{type: vCPUs}; fails naming the hosts of a type that does not exist in the region."""
    vcpus = {}
    for start in range(0, len(types), 100):
        batch = types[start : start + 100]
        try:
            answer = client.describe_instance_types(InstanceTypes=batch, aws_retry=True)["InstanceTypes"]
        except ClientError as e:
            if error_code(e) != "InvalidInstanceType":
                module.fail_json_aws(e, msg=f"Unable to describe the instance types {', '.join(batch)}")
            answer = []
            for instance_type in batch:  # find which
                try:
                    answer += client.describe_instance_types(InstanceTypes=[instance_type], aws_retry=True)[
                        "InstanceTypes"
                    ]
                except ClientError as e2:
                    if error_code(e2) != "InvalidInstanceType":
                        module.fail_json_aws(e2, msg=f"Unable to describe the instance type {instance_type}")
        for described in answer:
            vcpus[described["InstanceType"]] = described["VCpuInfo"]["DefaultVCpus"]
    unknown = [t for t in types if t not in vcpus]
    if unknown:
        named = [h["name"] for h in hosts if set(h["instance_types"]) & set(unknown)]
        module.fail_json(
            msg=f"no instance type {', '.join(unknown)} in {module.region} (hosts {', '.join(named)})",
            unknown_instance_types=unknown,
        )
    return vcpus


def quota_values(module, keys):
    quotas = module.client("service-quotas", retry_decorator=AWSRetry.jittered_backoff())
    values = {}
    for name, market in keys:
        code, quota_name = QUOTA_CLASSES[name][market]
        try:
            answer = quotas.get_service_quota(ServiceCode="ec2", QuotaCode=code, aws_retry=True)
        except ClientError as e:
            module.fail_json_aws(e, msg=f"Unable to read the quota {code} ({quota_name}) of ec2")
        values[(name, market)] = float(answer["Quota"]["Value"])
    return values


def main():
    module = AnsibleAWSModule(argument_spec=argument_spec(), supports_check_mode=True)
    client = module.client("ec2", retry_decorator=AWSRetry.jittered_backoff())
    deployment = module.params["deployment"]
    hosts = module.params["hosts"]
    for host in hosts:
        if not host["instance_types"]:
            module.fail_json(msg=f"hosts: {host['name']} has no instance type")
    try:
        ours = describe_instances(
            client,
            Filters=[
                {"Name": "tag:llmfleet:deployment", "Values": [deployment]},
                {"Name": "instance-state-name", "Values": LIVE_STATES},
            ],
        )
        running = describe_instances(
            client, Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}]
        )
    except ClientError as e:
        module.fail_json_aws(e, msg="Unable to describe the instances")
    by_name = {tag(i, "Name"): i for i in ours}
    planned = []
    for host in hosts:
        instance = by_name.get(f"{deployment}-{host['name']}")
        planned.append(
            {
                "name": host["name"],
                "instance_type": instance["InstanceType"] if instance else host["instance_types"][0],
                "spot": instance.get("InstanceLifecycle") == "spot" if instance else host["spot"],
                "exists": instance is not None,
            }
        )
    host_ids = {i["InstanceId"] for i in ours if tag(i, "llmfleet:role") == "gpu-host"}
    others = [
        {"instance_type": i["InstanceType"], "spot": i.get("InstanceLifecycle") == "spot"}
        for i in running
        if i["InstanceId"] not in host_ids and quota_class(i["InstanceType"]) is not None
    ]
    # every type a host may get, so that a wrong name among the later ones fails here too
    listed = {t for h in hosts for t in h["instance_types"]}
    types = sorted(listed | {p["instance_type"] for p in planned} | {o["instance_type"] for o in others})
    # a type is named with the hosts that list it or whose instance has it
    named = [
        dict(h, instance_types=h["instance_types"] + [planned[i]["instance_type"]])
        for i, h in enumerate(hosts)
    ]
    vcpus = vcpus_of(client, module, types, named)
    usage, unchecked = plan_quotas(planned, others, vcpus)
    quotas, exceeded = quota_report(usage, quota_values(module, sorted(usage)))
    module.exit_json(
        changed=False,
        quotas=quotas,
        exceeded=exceeded,
        to_create=[p["name"] for p in planned if not p["exists"]],
        unchecked=unchecked,
    )


if __name__ == "__main__":
    main()
