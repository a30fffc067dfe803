#!/usr/bin/python

# Copyright: llmfleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# Ansible modules import after their DOCUMENTATION, EXAMPLES and RETURN strings.
# ruff: noqa: E402

DOCUMENTATION = r"""
---
module: spot_requests
version_added: 0.1.0
short_description: Cancel EC2 spot instance requests in every state that can still launch instances
description:
  - Finds the spot instance requests of the instances O(instance_ids) and the requests
    O(spot_instance_request_ids), and cancels those whose state is C(open), C(active) or C(disabled).
  - A persistent request whose instance is stopped is C(disabled); terminating the instance opens the
    request again and AWS launches a new instance. M(amazon.aws.ec2_spot_instance) cancels only C(open)
    and C(active) requests, so a stopped spot host would come back; this module cancels the C(disabled)
    ones too. Cancel first, then terminate the instances (cancelling leaves them as they are).
  - Requests already C(cancelled), C(closed) or C(failed) need nothing and are left as they are, so running
    the module again changes nothing.
author:
  - llmfleet developers (@llmfleet)
options:
  state:
    description:
      - V(cancelled) cancels the requests found.
    type: str
    choices: [cancelled]
    default: cancelled
  instance_ids:
    description:
      - The instances whose spot requests to cancel (the requests' C(instance-id)), in any state.
      - Instances that have no spot request are ignored.
    type: list
    elements: str
    default: []
  spot_instance_request_ids:
    description:
      - Spot requests to cancel by their IDs. An ID that does not exist fails the module.
    type: list
    elements: str
    default: []
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
"""

EXAMPLES = r"""
- name: Find the deployment's instances, stopped ones too
  amazon.aws.ec2_instance_info:
    filters:
      "tag:llmfleet:deployment": acme-llm
  register: found

- name: Cancel their spot requests first (a persistent request would launch them again)
  llmfleet.aws.spot_requests:
    instance_ids: "{{ found.instances | map(attribute='instance_id') | list }}"
    state: cancelled
"""

RETURN = r"""
cancelled:
  description: The IDs of the requests cancelled (in check mode, that would be cancelled).
  returned: always
  type: list
  elements: str
  sample: ["sir-0123456789abcdef0"]
spot_requests:
  description:
    - The requests found, as DescribeSpotInstanceRequests answers them (keys in snake case), after the
      cancellation (in check mode, before it).
  returned: always
  type: list
  elements: dict
  contains:
    spot_instance_request_id:
      description: The request's ID.
      type: str
      sample: sir-0123456789abcdef0
    state:
      description: The request's state, for example C(cancelled) or C(closed).
      type: str
      sample: cancelled
    type:
      description: C(one-time) or C(persistent).
      type: str
      sample: persistent
    instance_id:
      description: The instance that fulfils the request, when there is one.
      type: str
      sample: i-0123456789abcdef0
    status:
      description: The request's status code and message.
      type: dict
"""

import contextlib

with contextlib.suppress(ImportError):  # AnsibleAWSModule reports a missing botocore
    from botocore.exceptions import BotoCoreError, ClientError

from ansible.module_utils.common.dict_transformations import camel_dict_to_snake_dict
from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry

# the states in which a request still launches instances; cancelled, closed and failed ones never do
CANCELLABLE_STATES = ("open", "active", "disabled")


def describe(client, module, **kwargs):
    """Every spot request that the call's filters or IDs name, page by page."""
    requests = []
    while True:
        try:
            page = client.describe_spot_instance_requests(aws_retry=True, **kwargs)
        except (BotoCoreError, ClientError) as e:
            module.fail_json_aws(e, msg="Unable to describe spot instance requests")
        requests.extend(page.get("SpotInstanceRequests", []))
        if not page.get("NextToken"):
            return requests
        kwargs["NextToken"] = page["NextToken"]


def find_requests(client, module, instance_ids, request_ids):
    found = {}
    if instance_ids:
        for request in describe(client, module, Filters=[{"Name": "instance-id", "Values": instance_ids}]):
            found[request["SpotInstanceRequestId"]] = request
    if request_ids:
        for request in describe(client, module, SpotInstanceRequestIds=request_ids):
            found[request["SpotInstanceRequestId"]] = request
    return [found[key] for key in sorted(found)]


def snake(request):
    return camel_dict_to_snake_dict(request, ignore_list=["Tags"])


def main():
    module = AnsibleAWSModule(
        argument_spec=dict(
            state=dict(type="str", choices=["cancelled"], default="cancelled"),
            instance_ids=dict(type="list", elements="str", default=[]),
            spot_instance_request_ids=dict(type="list", elements="str", default=[]),
        ),
        supports_check_mode=True,
    )
    client = module.client("ec2", retry_decorator=AWSRetry.jittered_backoff())
    instance_ids = module.params["instance_ids"]
    request_ids = module.params["spot_instance_request_ids"]
    requests = find_requests(client, module, instance_ids, request_ids)
    to_cancel = [r["SpotInstanceRequestId"] for r in requests if r.get("State") in CANCELLABLE_STATES]
    if to_cancel and not module.check_mode:
        try:
            client.cancel_spot_instance_requests(SpotInstanceRequestIds=to_cancel, aws_retry=True)
        except (BotoCoreError, ClientError) as e:
            module.fail_json_aws(e, msg=f"Unable to cancel the spot instance requests {', '.join(to_cancel)}")
        requests = find_requests(client, module, instance_ids, request_ids)
    module.exit_json(changed=bool(to_cancel), cancelled=to_cancel, spot_requests=[snake(r) for r in requests])


if __name__ == "__main__":
    main()
