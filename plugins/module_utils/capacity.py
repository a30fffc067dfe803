# Copyright: llmfleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""GPU capacity and vCPU quotas: what gpu_instance_launch, gpu_instance_start and gpu_quota_info share.

AWS answers InsufficientInstanceCapacity (HTTP 500) when an instance type has no capacity in an
Availability Zone at the moment. Waiting rarely helps within minutes; another type or zone often does. So
the calls that launch or start an instance go through a client that returns that error at once:
botocore retries every HTTP 500 (four times, with backoff) and amazon.aws's ec2_instance retries this
code for minutes; here only throttling and AWS's internal errors are retried (AWSRetry's defaults).
"""

import contextlib
import re
import time

with contextlib.suppress(ImportError):  # AnsibleAWSModule reports a missing botocore
    import botocore.config

from ansible.module_utils.common.dict_transformations import camel_dict_to_snake_dict
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry
from ansible_collections.amazon.aws.plugins.module_utils.tagging import boto3_tag_list_to_ansible_dict

# the error codes on which another instance type or zone is tried; any other error is reported at once
CAPACITY_ERROR_CODES = frozenset(["InsufficientInstanceCapacity"])
# instance states in which an instance still exists for us (not gone, not going)
LIVE_STATES = ["pending", "running", "stopping", "stopped"]

# EC2's vCPU quotas (Service Quotas, service code ec2) per instance family class and market. A family class
# is named by the letters before the generation's digit (g5 -> g, vt1 -> vt, p4d -> p, im4gn -> im).
QUOTA_CLASSES = {
    "G and VT": {
        "families": ["g", "gr", "vt"],
        "on-demand": ("L-DB2E81BA", "Running On-Demand G and VT instances"),
        "spot": ("L-3819A6DF", "All G and VT Spot Instance Requests"),
    },
    "P": {
        "families": ["p"],
        "on-demand": ("L-417A185B", "Running On-Demand P instances"),
        "spot": ("L-7212CCBC", "All P Spot Instance Requests"),
    },
    "Standard": {
        "families": ["a", "c", "d", "h", "i", "im", "is", "m", "r", "t", "z"],
        "on-demand": ("L-1216C47A", "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances"),
        "spot": ("L-34B43A08", "All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests"),
    },
}


def capacity_clients(module):
    """(client, launch_client): EC2 clients retrying throttling; the second does not retry an HTTP 500, for
    RunInstances and StartInstances (so InsufficientInstanceCapacity comes back at once)."""
    client = module.client("ec2", retry_decorator=AWSRetry.jittered_backoff())
    no_botocore_retries = botocore.config.Config(retries={"total_max_attempts": 1})
    launch_client = module.client(
        "ec2", retry_decorator=AWSRetry.jittered_backoff(), config=no_botocore_retries
    )
    return client, launch_client


def error_code(error):
    """The AWS error code of a botocore ClientError ('' for anything else)."""
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def error_message(error):
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Message", "") or error)


def is_capacity_error(error):
    return error_code(error) in CAPACITY_ERROR_CODES


def tried_text(tried):
    """'g6.xlarge in us-east-1a, us-east-1b; g5.xlarge in us-east-1a': what was tried, type by type."""
    by_type = {}
    for attempt in tried:
        zones = by_type.setdefault(attempt["instance_type"], [])
        zone = attempt.get("availability_zone") or attempt.get("subnet_id") or "?"
        if zone not in zones:
            zones.append(zone)
    return "; ".join(f"{instance_type} in {', '.join(zones)}" for instance_type, zones in by_type.items())


def pretty_instance(instance):
    """An EC2 instance as amazon.aws's ec2_instance modules return one: snake_case keys, tags as a dict."""
    result = camel_dict_to_snake_dict(instance, ignore_list=["Tags"])
    result["tags"] = boto3_tag_list_to_ansible_dict(instance.get("Tags", []))
    return result


def describe_instances(client, **kwargs):
    """Every instance the DescribeInstances call finds, over all its pages (throttling retried)."""
    instances = []
    while True:
        page = client.describe_instances(aws_retry=True, **kwargs)
        instances += [i for reservation in page.get("Reservations", []) for i in reservation["Instances"]]
        if not page.get("NextToken"):
            return instances
        kwargs["NextToken"] = page["NextToken"]


def wait_for_state(client, instance_id, timeout, delay=5):
    """Poll until the instance is running or has settled in another state (stopped, terminated): that
    instance as described. A start or launch can end stopped or terminated with a StateReason such as
    Server.InsufficientInstanceCapacity. Raises TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = describe_instances(client, InstanceIds=[instance_id])
        if found and found[0]["State"]["Name"] in ("running", "stopped", "terminated"):
            return found[0]
        if time.monotonic() >= deadline:
            state = found[0]["State"]["Name"] if found else "not found"
            raise TimeoutError(f"{instance_id} still {state} after {timeout}s")
        time.sleep(delay)


def settled_capacity_reason(instance):
    """The state reason of an instance that ended stopped or terminated for want of capacity, else ''."""
    reason = instance.get("StateReason") or {}
    text = f"{reason.get('Code', '')} {reason.get('Message', '')}"
    return text.strip() if "InsufficientInstanceCapacity" in text else ""


# --- quotas ----------------------------------------------------------------------------------------------


def family_letters(instance_type):
    """g5.xlarge -> g, vt1.3xlarge -> vt, p4d.24xlarge -> p, im4gn.large -> im."""
    match = re.match(r"[a-z]+", instance_type.split(".")[0])
    return match.group(0) if match else ""


def quota_class(instance_type):
    """The name of the family class whose vCPU quotas count this type (None: a class not checked here)."""
    letters = family_letters(instance_type)
    for name, quota in QUOTA_CLASSES.items():
        if letters in quota["families"]:
            return name
    return None


def plan_quotas(planned, others, vcpus):
    """vCPUs per quota against the quotas' values.

    planned: [{name, instance_type, spot, exists}] the hosts as they would all run;
    others: [{instance_type, spot}] the other running instances of the account and region;
    vcpus: {instance type: vCPUs}.
    Returns (usage, unchecked): usage maps (class, market) to {planned_vcpus, other_vcpus, hosts}, for the
    classes the hosts use; unchecked lists the hosts whose family has no quota class here.
    """
    usage = {}
    unchecked = []
    for host in planned:
        name = quota_class(host["instance_type"])
        if name is None:
            unchecked.append({"name": host["name"], "instance_type": host["instance_type"]})
            continue
        key = (name, "spot" if host["spot"] else "on-demand")
        entry = usage.setdefault(key, {"planned_vcpus": 0, "other_vcpus": 0, "hosts": []})
        entry["planned_vcpus"] += vcpus[host["instance_type"]]
        entry["hosts"].append(
            {
                "name": host["name"],
                "instance_type": host["instance_type"],
                "vcpus": vcpus[host["instance_type"]],
                "exists": host["exists"],
            }
        )
    for instance in others:
        key = (quota_class(instance["instance_type"]), "spot" if instance["spot"] else "on-demand")
        if key in usage:
            usage[key]["other_vcpus"] += vcpus.get(instance["instance_type"], 0)
    return usage, unchecked


def quota_report(usage, values):
    """The quotas the hosts use, each with its numbers, and the message of each one exceeded.

    values maps (class, market) to the quota's value in vCPUs."""
    quotas = []
    exceeded = []
    for (name, market), entry in sorted(usage.items()):
        code, quota_name = QUOTA_CLASSES[name][market]
        value = values[(name, market)]
        needed = entry["planned_vcpus"] + entry["other_vcpus"]
        quota = {
            "family": name,
            "market": market,
            "quota_code": code,
            "quota_name": quota_name,
            "value": value,
            "planned_vcpus": entry["planned_vcpus"],
            "other_vcpus": entry["other_vcpus"],
            "hosts": entry["hosts"],
            "exceeded": needed > value,
        }
        quotas.append(quota)
        if quota["exceeded"]:
            hosts = ", ".join(f"{h['name']} {h['instance_type']} {h['vcpus']}" for h in entry["hosts"])
            exceeded.append(
                f"{name} {market}: the GPU hosts need {entry['planned_vcpus']} vCPUs ({hosts})"
                f"{' and other instances run ' + str(entry['other_vcpus']) if entry['other_vcpus'] else ''},"
                f" over the quota {code} ({quota_name}) of {value:g} vCPUs"
            )
    return quotas, exceeded
