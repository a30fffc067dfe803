# Copyright: llmfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters of the idle sweep and of wake: the rules are module_utils/idle_rules.py, which the gateway's
sweep shares (the agent package carries that file as its own); these wrap them for the playbooks, an error
of theirs becoming the filter's.

The sweep (roles/idle_shutdown/tasks/sweep.yml) is: idle_sweep_plan (each running instance's agent URL,
certificate and threshold, from its tags) -> llmfleet.aws.agent_idle_batch (every agent asked at once) ->
one ec2_instance stop -> agent_idle_batch resume for a failed stop -> idle_outcomes (each host's fate) ->
idle_summary (counts and savings) -> idle_report (the lines printed). wake_line is one line of wake's report.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ansible.errors import AnsibleFilterError
from ansible_collections.llmfleet.aws.plugins.module_utils import idle_rules

OUTCOMES = idle_rules.OUTCOMES


def _filter(rule: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(rule)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return rule(*args, **kwargs)
        except ValueError as exc:
            raise AnsibleFilterError(str(exc)) from None

    return call


idle_sweep_plan = _filter(idle_rules.idle_sweep_plan)
idle_outcomes = _filter(idle_rules.idle_outcomes)
idle_summary = _filter(idle_rules.idle_summary)
idle_report = _filter(idle_rules.idle_report)
wake_line = _filter(idle_rules.wake_line)


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "idle_sweep_plan": idle_sweep_plan,
            "idle_outcomes": idle_outcomes,
            "idle_summary": idle_summary,
            "idle_report": idle_report,
            "wake_line": wake_line,
        }
