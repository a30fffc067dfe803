#!/usr/bin/python

# Copyright: llmfleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# Ansible modules import after their DOCUMENTATION, EXAMPLES and RETURN strings.
# ruff: noqa: E402

DOCUMENTATION = r"""
---
module: gpu_instance_start
version_added: 0.1.0
short_description: Start EC2 instances one by one, on another instance type when AWS has no capacity
description:
  - Starts the stopped instances of O(instance_ids), one at a time, so that one that cannot start does not
    keep the others from starting, then waits for all of them together until they run (the next one is not
    kept waiting while an earlier one boots). An instance that is stopping is waited for, then started; one
    that is running or pending is left as it is.
  - When AWS answers C(InsufficientInstanceCapacity) (no capacity of the instance's type in its
    Availability Zone now), the instance's other types are tried, in the order of its tag
    O(instance_types_tag) - the type is changed while the instance is stopped, and it is started again. An
    instance keeps its Availability Zone (its subnet and volumes are there). When no type has capacity, the
    instance gets its type back and stays stopped. A spot instance's type cannot be changed; it is tried
    with its own type only.
  - The module does not fail when an instance cannot be started; C(results) says which and why, and
    C(not_started) lists them. It fails when the instances cannot be described.
  - Each start is asked once. botocore retries an HTTP 500 (what AWS answers C(InsufficientInstanceCapacity)
    with) and M(amazon.aws.ec2_instance) retries the code for minutes; here the next type is tried at once.
author:
  - llmfleet developers (@llmfleet)
options:
  instance_ids:
    description: The instances, started in this order.
    type: list
    elements: str
    required: true
  instance_types_tag:
    description:
      - The tag that lists an instance's instance types in order of preference, comma-separated (what
        llmfleet's gpu_hosts role sets from a host's C(instance_types)). The instance's own type is tried
        first, then the others of the list. Without the tag, only its own type.
    type: str
    default: "llmfleet:instance-types"
  wait_timeout:
    description:
      - Seconds to wait for the started instances to run (and for a stopping one to stop). An instance that
        stops again for want of capacity meanwhile is started as its next type; one that does not run in time
        is reported V(failed).
    type: int
    default: 600
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
"""

EXAMPLES = r"""
- name: Start the deployment's GPU hosts, each on another of its types if need be
  llmfleet.aws.gpu_instance_start:
    instance_ids: [i-0a1b2c3d4e5f60718, i-0f1e2d3c4b5a69788]
  register: started

- name: Say which could not start
  ansible.builtin.debug:
    msg: "{{ started.results | selectattr('outcome', 'in', ['no_capacity', 'failed']) }}"
"""

RETURN = r"""
results:
  description: One entry per instance, in the order of O(instance_ids).
  returned: always
  type: list
  elements: dict
  contains:
    instance_id:
      description: The instance.
      type: str
    state_before:
      description: Its state before the module ran.
      type: str
      sample: stopped
    outcome:
      description:
        - V(started), V(running) (it already was, or was pending), V(would_start) (check mode),
          V(no_capacity) (no type had capacity; it is stopped, with its type of before), V(failed) (another
          error; see C(reason)).
      type: str
    instance_type:
      description: Its type now (the one it started with).
      type: str
      sample: g5.xlarge
    instance_type_before:
      description: Its type before.
      type: str
      sample: g6.xlarge
    availability_zone:
      description: Its Availability Zone.
      type: str
    tried:
      description: The types that had no capacity, in the order tried, each with AWS's message.
      type: list
      elements: dict
    reason:
      description: Why it did not start, for V(no_capacity) and V(failed); empty otherwise.
      type: str
started:
  description: The instances started by this run.
  returned: always
  type: list
  elements: str
not_started:
  description: The instances that could not be started (outcome V(no_capacity) or V(failed)).
  returned: always
  type: list
  elements: str
"""

import contextlib
import time

with contextlib.suppress(ImportError):  # AnsibleAWSModule reports a missing botocore
    from botocore.exceptions import ClientError

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.llmfleet.aws.plugins.module_utils.capacity import (
    capacity_clients,
    describe_instances,
    error_code,
    error_message,
    is_capacity_error,
    settled_capacity_reason,
    tried_text,
    wait_for_state,
)

# seconds between two looks at the instances being started
POLL_SECONDS = 5


def argument_spec():
    return dict(
        instance_ids=dict(type="list", elements="str", required=True),
        instance_types_tag=dict(type="str", default="llmfleet:instance-types"),
        wait_timeout=dict(type="int", default=600),
    )


def candidate_types(instance, tag):
    """The instance's own type first, then the others of its tag; its own type only for a spot instance."""
    own = instance["InstanceType"]
    if instance.get("InstanceLifecycle") == "spot":
        return [own]
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    listed = [t.strip() for t in tags.get(tag, "").split(",") if t.strip()]
    return [own] + [t for t in listed if t != own]


def set_type(client, instance_id, instance_type):
    client.modify_instance_attribute(
        InstanceId=instance_id, InstanceType={"Value": instance_type}, aws_retry=True
    )


class Start:
    """One instance being started: its entry of `results`, and the types still to try."""

    def __init__(self, instance, tag):
        self.instance_id = instance["InstanceId"]
        self.own = instance["InstanceType"]
        self.current = self.own
        self.zone = instance.get("Placement", {}).get("AvailabilityZone", "")
        self.remaining = candidate_types(instance, tag)
        self.result = {
            "instance_id": self.instance_id,
            "state_before": instance["State"]["Name"],
            "outcome": "",
            "instance_type": self.own,
            "instance_type_before": self.own,
            "availability_zone": self.zone,
            "tried": [],
            "reason": "",
        }

    def no_capacity(self, message):
        self.result["tried"].append(
            {
                "instance_type": self.current,
                "availability_zone": self.zone,
                "error": "InsufficientInstanceCapacity",
                "message": message,
            }
        )

    def next_start(self, client, launch_client):
        """Ask AWS to start it as its next type that AWS takes: True when one was accepted, False when no type
        was. Raises ClientError on another error."""
        while self.remaining:
            instance_type = self.remaining.pop(0)
            if instance_type != self.current:
                set_type(client, self.instance_id, instance_type)
                self.current = instance_type
            try:
                launch_client.start_instances(InstanceIds=[self.instance_id], aws_retry=True)
                return True
            except ClientError as e:
                if not is_capacity_error(e):
                    raise
                self.no_capacity(error_message(e))
        return False

    def done(self, client, outcome, reason=""):
        """Its outcome; one that did not start gets its own type back."""
        if outcome == "no_capacity":
            tried = tried_text(self.result["tried"])
            reason = f"no capacity: tried {tried} (InsufficientInstanceCapacity for each)"
        if outcome != "started" and self.current != self.own:
            try:
                set_type(client, self.instance_id, self.own)
                self.current = self.own
            except ClientError as e:
                reason += f" (and its type could not be set back to {self.own}: {error_message(e)})"
        self.result.update(outcome=outcome, reason=reason, instance_type=self.current)


def ask(start, client, launch_client):
    """Start it as its next type AWS takes; True when it is now starting, else its outcome is set."""
    try:
        if start.next_start(client, launch_client):
            return True
        start.done(client, "no_capacity")
    except ClientError as e:
        start.done(client, "failed", f"{error_code(e)}: {error_message(e)}")
    return False


def settle(module, client, launch_client, starting):
    """Wait until the instances AWS is starting run. One that ends stopped again for want of capacity is asked
    again as its next type; one that ends otherwise, or does not run in time, failed."""
    deadline = time.monotonic() + module.params["wait_timeout"]
    while starting:
        ids = [start.instance_id for start in starting]
        found = {i["InstanceId"]: i for i in describe_instances(client, InstanceIds=ids)}
        still = []
        for start in starting:
            instance = found.get(start.instance_id, {"State": {"Name": "missing"}})
            state = instance["State"]["Name"]
            if state == "running":
                start.done(client, "started")
            elif state in ("stopped", "terminated", "missing"):
                reason = settled_capacity_reason(instance)
                if not reason:
                    message = instance.get("StateReason", {}).get("Message", "no reason given")
                    start.done(client, "failed", f"it is {state} again: {message}")
                    continue
                start.no_capacity(reason)
                if ask(start, client, launch_client):
                    still.append(start)
            else:
                still.append(start)
        starting = still
        if starting and time.monotonic() >= deadline:
            for start in starting:
                start.done(client, "failed", f"not running after {module.params['wait_timeout']}s")
            return
        if starting:
            time.sleep(POLL_SECONDS)


def start_all(module, client, launch_client, instances):
    """Each instance asked to start in turn (its types tried at once on a capacity error), then all waited for
    together: the next one is not kept waiting while an earlier one boots."""
    starts = [Start(instance, module.params["instance_types_tag"]) for instance in instances]
    starting = []
    for start in starts:
        state = start.result["state_before"]
        if state in ("running", "pending"):
            start.result["outcome"] = "running"
        elif state not in ("stopped", "stopping"):
            start.result.update(outcome="failed", reason=f"it is {state}")
        elif module.check_mode:
            start.result["outcome"] = "would_start"
        else:
            if state == "stopping":
                try:
                    wait_for_state(client, start.instance_id, module.params["wait_timeout"])
                except TimeoutError as e:
                    start.result.update(outcome="failed", reason=str(e))
                    continue
            if ask(start, client, launch_client):
                starting.append(start)
    settle(module, client, launch_client, starting)
    return [start.result for start in starts]


def main():
    module = AnsibleAWSModule(argument_spec=argument_spec(), supports_check_mode=True)
    client, launch_client = capacity_clients(module)
    ids = module.params["instance_ids"]
    if not ids:
        module.exit_json(changed=False, results=[], started=[], not_started=[])
    try:
        found = {i["InstanceId"]: i for i in describe_instances(client, InstanceIds=ids)}
        results = start_all(module, client, launch_client, [found[instance_id] for instance_id in ids])
    except ClientError as e:
        module.fail_json_aws(e, msg=f"Unable to describe the instances {', '.join(ids)}")
    started = [r["instance_id"] for r in results if r["outcome"] == "started"]
    not_started = [r["instance_id"] for r in results if r["outcome"] in ("no_capacity", "failed")]
    changed = bool(started) or any(r["outcome"] == "would_start" for r in results)
    module.exit_json(changed=changed, results=results, started=started, not_started=not_started)


if __name__ == "__main__":
    main()
