#!/usr/bin/python

# Copyright: llmfleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# Ansible modules import after their DOCUMENTATION, EXAMPLES and RETURN strings.
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: agent_idle
version_added: 0.1.0
short_description: Read an llmfleet agent's idle figures, drain it when idle, or resume it
description:
  - Asks the llmfleet agent on a GPU host how long it has been idle, over the agent's control routes
    (C(GET /agent/idle), C(POST /agent/drain), C(POST /agent/resume)) with a key of the C(operator) role.
  - Without O(drain_if_idle_for) and O(resume) the module only reads the figures.
  - With O(drain_if_idle_for) the agent enters draining (it refuses new inference with HTTP 503) only if
    nothing is in flight and it has been idle at least that many seconds. The agent decides and starts
    refusing work in one step, so no request can slip in between the check and the drain. When the agent
    declines (HTTP 409) the module does not fail; RV(drained) is V(false) and RV(reason) says why.
  - With O(resume=true) a draining agent accepts inference again.
  - The module runs wherever the task runs; the agent must be reachable from there at O(url) (usually
    the task is delegated to the controller, or runs on the GPU host itself against V(https://127.0.0.1:8443)).
author:
  - llmfleet developers (@llmfleet)
options:
  url:
    description:
      - The agent's base URL, V(http://) or V(https://), for example V(https://10.0.1.5:8443).
      - A trailing slash is ignored.
    type: str
    required: true
  operator_key:
    description:
      - An API key of the agent with the C(operator) role.
      - If not set, the environment variable E(LLMFLEET_OPERATOR_KEY) is used.
      - The key is never shown in the module's messages.
    type: str
    required: true
  validate_certs:
    description:
      - Whether to verify the agent's TLS certificate (O(url) with V(https://)).
      - Set O(ca_path) for an agent with a self-signed certificate rather than turning this off.
    type: bool
    default: true
  ca_path:
    description:
      - A PEM file of CA certificates to verify the agent's certificate with, for example the agent's own
        self-signed certificate. The system's CA store is used when not set.
      - Ignored when O(validate_certs=false).
    type: path
  timeout:
    description:
      - Seconds to wait for each HTTP request. Must be more than 0.
    type: float
    default: 10
  drain_if_idle_for:
    description:
      - Drain the agent if, and only if, nothing is in flight and it has been idle at least this many
        seconds (C(POST /agent/drain) with O(drain_if_idle_for) as C(if_idle_for) in its body).
      - V(0) drains whenever nothing is in flight.
      - Must be 0 or more.
      - Cannot be combined with O(resume=true).
    type: float
  resume:
    description:
      - Take the agent out of draining (C(POST /agent/resume)), so that it accepts inference again.
      - Nothing is posted when the agent is not draining, as a resume restarts the agent's idle time.
      - Cannot be combined with O(drain_if_idle_for).
    type: bool
    default: false
notes:
  - Support for check mode is full; in check mode the module only reads the figures (C(GET /agent/idle))
    and reports whether it would drain (RV(would_drain)) or resume.
  - The module reads the figures before it drains or resumes, so that C(changed) is V(true) only when the
    call moved the agent into or out of draining.
  - When the agent cannot be reached (connection refused, timeout, TLS failure) the module fails with
    RV(agent_unreachable=true), which tells such an agent apart from one that answered with an error
    (a refused key, say). The host stays in the play (the key is not Ansible's C(unreachable)), so a
    task with C(failed_when=false) can report it and go on.
  - An agent whose inference is refused because it is draining still answers its control routes, so a
    drained host can be resumed, and its figures read, until it is stopped.
"""

EXAMPLES = r"""
- name: Read how long the agent has been idle
  llmfleet.aws.agent_idle:
    url: "https://{{ ansible_host }}:8443"
    operator_key: "{{ llmfleet_operator_key }}"
    ca_path: "{{ playbook_dir }}/files/agent-ca.pem"
  delegate_to: localhost
  register: idle

- name: Drain the agent if it has been idle for 30 minutes with nothing in flight
  llmfleet.aws.agent_idle:
    url: "https://{{ ansible_host }}:8443"
    operator_key: "{{ llmfleet_operator_key }}"
    ca_path: "{{ playbook_dir }}/files/agent-ca.pem"
    drain_if_idle_for: 1800
  delegate_to: localhost
  register: drain
  # an agent that cannot be asked is reported (drain.agent_unreachable), not a failed play
  failed_when: false

- name: Stop the instances whose agent drained
  amazon.aws.ec2_instance:
    instance_ids: ["{{ instance_id }}"]
    state: stopped
  delegate_to: localhost
  when: drain.drained | default(false)

- name: Take the agent out of draining (the key from LLMFLEET_OPERATOR_KEY)
  llmfleet.aws.agent_idle:
    url: http://127.0.0.1:8443
    resume: true
"""

RETURN = r"""
idle_seconds:
  description:
    - Seconds since the agent last finished a request (or started, or resumed); 0 while a request is in
      flight.
    - The figures are those after the call; in check mode, as read.
  returned: when the agent answered
  type: float
  sample: 1843.512
inflight:
  description: The number of proxied requests in flight.
  returned: when the agent answered
  type: int
  sample: 0
last_activity:
  description: When the agent was last used, as seconds since the epoch (Unix time).
  returned: when the agent answered
  type: float
  sample: 1767225600.25
draining:
  description: Whether the agent is draining (refusing new inference).
  returned: when the agent answered
  type: bool
  sample: true
drained:
  description:
    - Whether the agent is draining because this call's drain succeeded (the agent answered C(200) to
      C(POST /agent/drain)), so nothing was in flight and it had been idle at least O(drain_if_idle_for)
      seconds.
    - Also V(true) for an agent that was already draining and met the condition; C(changed) tells them apart.
    - Always V(false) in check mode and without O(drain_if_idle_for).
  returned: when the agent answered
  type: bool
  sample: true
would_drain:
  description:
    - Whether the figures meet O(drain_if_idle_for) (nothing in flight, idle long enough).
    - In check mode this comes from the figures read with C(GET /agent/idle); otherwise it is the agent's
      own decision, the same as RV(drained).
  returned: when O(drain_if_idle_for) is set and the agent answered
  type: bool
  sample: true
reason:
  description: Why the agent did not drain (the agent's C(409) message); empty otherwise.
  returned: when the agent answered
  type: str
  sample: "not drained: idle for 12.0s, less than 1800s"
resumed:
  description:
    - Whether this call took the agent out of draining (C(POST /agent/resume)).
    - V(false) in check mode, and when the agent was not draining (nothing is posted then).
  returned: when the agent answered
  type: bool
  sample: false
status:
  description: The HTTP status of the call that decided the result (the drain or resume, else the read).
  returned: when the agent answered
  type: int
  sample: 200
agent_unreachable:
  description:
    - V(true) when the agent could not be reached (connection refused, timeout, TLS failure); the module
      has then failed, and C(msg) names the URL and the cause.
  returned: always
  type: bool
  sample: false
url:
  description: The agent's base URL, as used (without a trailing slash).
  returned: always
  type: str
  sample: https://10.0.1.5:8443
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.llmfleet.aws.plugins.module_utils.agent_api import (
    AgentClient,
    AgentError,
    AgentUnreachable,
    base_url,
    connection_argument_spec,
    connection_problems,
)
from ansible_collections.llmfleet.aws.plugins.module_utils.idle_ops import drain, report, resume


def argument_spec() -> dict:
    return dict(
        url=dict(type="str", required=True),
        **connection_argument_spec(),
        drain_if_idle_for=dict(type="float"),
        resume=dict(type="bool", default=False),
    )


def check_params(module: AnsibleModule) -> str:
    """Fail, naming the option and its value, for what the argument spec cannot check; the base URL."""
    params = module.params
    try:
        url = base_url(params["url"])
    except ValueError as e:
        module.fail_json(msg=str(e), agent_unreachable=False)
    for problem in connection_problems(params):
        module.fail_json(msg=problem, agent_unreachable=False, url=url)
    threshold = params["drain_if_idle_for"]
    if threshold is not None and not threshold >= 0:  # NaN too
        module.fail_json(
            msg=f"drain_if_idle_for must be a number of seconds >= 0; got {threshold!r}",
            agent_unreachable=False,
            url=url,
        )
    if threshold is not None and params["resume"]:
        module.fail_json(
            msg="drain_if_idle_for and resume=true cannot be combined: drain or resume, not both",
            agent_unreachable=False,
            url=url,
        )
    return url


def run(module: AnsibleModule, client: AgentClient) -> dict:
    params = module.params
    if params["drain_if_idle_for"] is not None:
        return drain(client, params["drain_if_idle_for"], module.check_mode)
    if params["resume"]:
        return resume(client, module.check_mode)
    return report(client)


def main() -> None:
    module = AnsibleModule(
        argument_spec=argument_spec(),
        supports_check_mode=True,
    )
    url = check_params(module)
    params = module.params
    client = AgentClient(
        url,
        params["operator_key"],
        validate_certs=params["validate_certs"],
        ca_path=params["ca_path"],
        timeout=params["timeout"],
    )
    try:
        result = run(module, client)
    except AgentUnreachable as e:
        module.fail_json(msg=str(e), agent_unreachable=True, url=url)
    except AgentError as e:
        module.fail_json(msg=str(e), agent_unreachable=False, status=e.status, url=url)
    module.exit_json(url=url, **result)


if __name__ == "__main__":
    main()
