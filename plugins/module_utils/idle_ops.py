# Copyright: llmfleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""What llmfleet.aws.agent_idle and agent_idle_batch do to one agent: report, drain if idle, resume.

Each function asks one AgentClient and returns the module result for that agent (a dict): the idle
figures of the last answer (idle_seconds, inflight, last_activity, draining), and what the call did
(changed, drained, would_drain, resumed, reason, status, agent_unreachable). They raise the errors of
agent_api (AgentUnreachable, KeyRefused, UnexpectedAnswer) when the agent gives no usable answer.
Check mode never posts: a drain only reads the figures and says whether the agent would drain.
"""

from __future__ import annotations

from ansible_collections.llmfleet.aws.plugins.module_utils.agent_api import AgentClient, Answer
from ansible_collections.llmfleet.aws.plugins.module_utils.idle_rules import agent_result, meets


def outcome(answer: Answer, **overrides) -> dict:
    """The result for the figures of `answer`; what the call did goes in `overrides`."""
    return agent_result(answer.status, answer.figures, **overrides)


def report(client: AgentClient) -> dict:
    """The idle figures only (GET /agent/idle)."""
    return outcome(client.idle())


def drain(client: AgentClient, threshold: float, check_mode: bool) -> dict:
    """Drain the agent if it has been idle `threshold` seconds with nothing in flight (the agent decides,
    atomically); in check mode, only whether it would."""
    before = client.idle()
    if check_mode:
        would = meets(before.figures, threshold)
        return outcome(before, changed=would and not before.figures["draining"], would_drain=would)
    answer = client.drain(threshold)
    drained = answer.status == 200
    return outcome(
        answer,
        changed=drained and not before.figures["draining"],
        drained=drained,
        would_drain=drained,
        reason="" if drained else answer.error,
    )


def resume(client: AgentClient, check_mode: bool) -> dict:
    """Let a draining agent take inference again; an agent that is not draining is left as it is."""
    before = client.idle()
    if not before.figures["draining"]:
        return outcome(before)  # a resume would only restart the agent's idle time
    if check_mode:
        return outcome(before, changed=True)
    return outcome(client.resume(), changed=True, resumed=True)
