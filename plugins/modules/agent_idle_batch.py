#!/usr/bin/python

# Copyright: llmfleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# Ansible modules import after their DOCUMENTATION, EXAMPLES and RETURN strings.
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: agent_idle_batch
version_added: 0.1.0
short_description: Ask many llmfleet agents at once for their idle figures, drain the idle ones, or resume
description:
  - What M(llmfleet.aws.agent_idle) does to one agent, done to a list of agents concurrently from one
    module run; the idle sweep (C(playbooks/idle_shutdown.yml)) asks every GPU host of a deployment this way,
    so a sweep of 50 hosts costs one task rather than 50 forks.
  - Each agent is asked over its control routes (C(GET /agent/idle), C(POST /agent/drain),
    C(POST /agent/resume)) with a key of the C(operator) role.
  - An agent with C(drain_if_idle_for) is drained if, and only if, nothing is in flight and it has been idle
    at least that many seconds; the agent decides and starts refusing new inference in one step, so no
    request can slip in between. An agent without it is only asked for its figures.
  - With O(resume=true) every listed agent that is draining accepts inference again.
  - One agent that cannot be asked never fails the module; its entry in RV(agents) says why
    (RV(agents[].answered=false), RV(agents[].msg)). The module fails only for bad options.
author:
  - llmfleet developers (@llmfleet)
options:
  agents:
    description:
      - The agents to ask. An empty list asks none.
    type: list
    elements: dict
    required: true
    suboptions:
      id:
        description:
          - A name for the agent that is unique in the list, returned with its result (the idle sweep
            uses the instance id).
        type: str
        required: true
      url:
        description:
          - The agent's base URL, V(http://) or V(https://), for example V(https://10.0.1.5:8443).
          - A URL that is not one gives that agent a result with RV(agents[].answered=false), not a failure.
        type: str
        required: true
      drain_if_idle_for:
        description:
          - Drain this agent if nothing is in flight and it has been idle at least this many seconds
            (0 or more). Not set - only its figures are read.
          - Cannot be combined with O(resume=true).
        type: float
      ca_path:
        description: A PEM file to verify this agent's certificate with; O(ca_path) when not set.
        type: path
  operator_key:
    description:
      - An API key with the C(operator) role on every listed agent.
      - If not set, the environment variable E(LLMFLEET_OPERATOR_KEY) is used.
      - The key is never shown in the module's messages.
    type: str
    required: true
  validate_certs:
    description:
      - Whether to verify the agents' TLS certificates.
      - Give each agent its certificate in O(agents[].ca_path), or a common CA in O(ca_path), rather than
        turning this off.
    type: bool
    default: true
  ca_path:
    description:
      - A PEM file of CA certificates for the agents without their own O(agents[].ca_path); the system's CA
        store when neither is set. Ignored when O(validate_certs=false).
    type: path
  timeout:
    description: Seconds to wait for each HTTP request. Must be more than 0.
    type: float
    default: 10
  concurrency:
    description: How many agents are asked at the same time (at least 1).
    type: int
    default: 32
  resume:
    description:
      - Take every listed agent that is draining out of draining (C(POST /agent/resume)); nothing is posted
        to an agent that is not draining.
    type: bool
    default: false
notes:
  - Support for check mode is full; in check mode the agents are only read (C(GET /agent/idle)) and each
    result says whether the agent would drain (RV(agents[].would_drain)) or be resumed.
  - Each agent is asked as M(llmfleet.aws.agent_idle) asks it, with the same results; see that module for
    the meaning of each figure.
seealso:
  - module: llmfleet.aws.agent_idle
"""

EXAMPLES = r"""
- name: Drain the agents idle for 30 minutes (one of them only reports)
  llmfleet.aws.agent_idle_batch:
    agents:
      - {id: i-0a1b2c3d4e5f60718, url: "https://10.0.1.5:8443", drain_if_idle_for: 1800}
      - {id: i-0f1e2d3c4b5a69788, url: "https://10.0.1.6:8443", drain_if_idle_for: 1800}
      - {id: i-0123456789abcdef0, url: "https://10.0.1.7:8443"}
    operator_key: "{{ llmfleet_operator_key }}"
    ca_path: "{{ playbook_dir }}/files/agent-ca.pem"
  register: sweep

- name: Stop the instances whose agent drained
  amazon.aws.ec2_instance:
    instance_ids: "{{ sweep.drained }}"
    state: stopped
  when: sweep.drained | length > 0

- name: Resume two agents (the key from LLMFLEET_OPERATOR_KEY)
  llmfleet.aws.agent_idle_batch:
    agents:
      - {id: gpu-a, url: "https://10.0.1.5:8443"}
      - {id: gpu-b, url: "https://10.0.1.6:8443"}
    resume: true
"""

RETURN = r"""
agents:
  description: One result per agent, in the order of O(agents).
  returned: always
  type: list
  elements: dict
  contains:
    id:
      description: The agent's O(agents[].id).
      type: str
      sample: i-0a1b2c3d4e5f60718
    url:
      description: The agent's base URL, as used (without a trailing slash).
      type: str
      sample: https://10.0.1.5:8443
    answered:
      description: Whether the agent gave a usable answer; when V(false), RV(agents[].msg) says why.
      type: bool
      sample: true
    agent_unreachable:
      description:
        - V(true) when the agent could not be reached (connection refused, timeout, TLS failure); V(false)
          when it answered with an error (a refused key, say) or its URL is not one.
      type: bool
      sample: false
    msg:
      description: Why the agent could not be asked, naming its URL.
      returned: when RV(agents[].answered=false)
      type: str
      sample: "cannot reach the llmfleet agent at https://10.0.1.7:8443 (GET /agent/idle): Connection refused"
    changed:
      description: Whether the call moved this agent into or out of draining (in check mode, would).
      type: bool
      sample: true
    idle_seconds:
      description: Seconds since the agent last finished a request; 0 while a request is in flight.
      returned: when the agent answered
      type: float
      sample: 1843.512
    inflight:
      description: The number of proxied requests in flight.
      returned: when the agent answered
      type: int
      sample: 0
    last_activity:
      description: When the agent was last used, as seconds since the epoch.
      returned: when the agent answered
      type: float
      sample: 1767225600.25
    draining:
      description: Whether the agent is draining (refusing new inference).
      returned: when the agent answered
      type: bool
      sample: true
    drained:
      description: Whether the agent answered C(200) to the drain (always V(false) in check mode).
      returned: when the agent answered
      type: bool
      sample: true
    would_drain:
      description: Whether the figures meet O(agents[].drain_if_idle_for) (in check mode, as read).
      returned: when O(agents[].drain_if_idle_for) is set and the agent answered
      type: bool
      sample: true
    reason:
      description: Why the agent did not drain (its C(409) message); empty otherwise.
      returned: when the agent answered
      type: str
      sample: "not drained: idle for 12.0s, less than 1800s"
    resumed:
      description: Whether this call took the agent out of draining.
      returned: when the agent answered
      type: bool
      sample: false
    status:
      description: The HTTP status of the call that decided the result.
      returned: when the agent answered, or answered with an error
      type: int
      sample: 200
drained:
  description: The O(agents[].id) of the agents that drained (answered C(200) to the drain), in order.
  returned: always
  type: list
  elements: str
  sample: [i-0a1b2c3d4e5f60718]
"""

from concurrent.futures import ThreadPoolExecutor

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
        agents=dict(
            type="list",
            elements="dict",
            required=True,
            options=dict(
                id=dict(type="str", required=True),
                url=dict(type="str", required=True),
                drain_if_idle_for=dict(type="float"),
                ca_path=dict(type="path"),
            ),
        ),
        **connection_argument_spec(),
        concurrency=dict(type="int", default=32),
        resume=dict(type="bool", default=False),
    )


def check_params(module: AnsibleModule) -> None:
    """Fail, naming the option and its value, for what the argument spec cannot check."""
    params = module.params
    for problem in connection_problems(params):
        module.fail_json(msg=problem)
    if params["concurrency"] < 1:
        module.fail_json(msg=f"concurrency must be at least 1; got {params['concurrency']!r}")
    seen: set[str] = set()
    for agent in params["agents"]:
        if agent["id"] in seen:
            module.fail_json(msg=f"agents: the id {agent['id']!r} is given twice; each agent needs its own")
        seen.add(agent["id"])
        threshold = agent["drain_if_idle_for"]
        if threshold is not None and not threshold >= 0:  # NaN too
            module.fail_json(
                msg=f"agents: drain_if_idle_for of {agent['id']} must be a number of seconds >= 0;"
                f" got {threshold!r}"
            )
        if threshold is not None and params["resume"]:
            module.fail_json(
                msg=f"agents: {agent['id']} has drain_if_idle_for, which cannot be combined with resume=true"
            )


def ask(agent: dict, params: dict, check_mode: bool) -> dict:
    """One agent's result; never raises for what the agent answers or does not."""
    result = {"id": agent["id"], "url": agent["url"], "changed": False}
    try:
        result["url"] = base_url(agent["url"])
        client = AgentClient(
            result["url"],
            params["operator_key"],
            validate_certs=params["validate_certs"],
            ca_path=agent["ca_path"] or params["ca_path"],
            timeout=params["timeout"],
        )
        if agent["drain_if_idle_for"] is not None:
            answer = drain(client, agent["drain_if_idle_for"], check_mode)
        elif params["resume"]:
            answer = resume(client, check_mode)
        else:
            answer = report(client)
    except ValueError as e:  # the URL
        return dict(result, answered=False, agent_unreachable=False, msg=f"agent {agent['id']}: {e}")
    except AgentUnreachable as e:
        return dict(result, answered=False, agent_unreachable=True, msg=str(e))
    except AgentError as e:
        return dict(result, answered=False, agent_unreachable=False, status=e.status, msg=str(e))
    return dict(result, answered=True, **answer)


def run(params: dict, check_mode: bool) -> list[dict]:
    """Every agent's result, in the order given, asking up to `concurrency` of them at once."""
    agents = params["agents"]
    if not agents:
        return []
    workers = min(params["concurrency"], len(agents))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agent") as pool:
        return list(pool.map(lambda agent: ask(agent, params, check_mode), agents))


def main() -> None:
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    check_params(module)
    results = run(module.params, module.check_mode)
    module.exit_json(
        changed=any(r["changed"] for r in results),
        agents=results,
        drained=[r["id"] for r in results if r.get("drained")],
    )


if __name__ == "__main__":
    main()
