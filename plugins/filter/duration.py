# Copyright: llmfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The filter llmfleet.aws.duration_seconds: a duration (an idle threshold, a tag value) in seconds.

The preflights check with it (gpu_hosts' idle_after, idle_shutdown's default) and the idle sweep reads the
tag llmfleet:idle-after with it. The rule itself is module_utils/durations.py, which the agent package
carries as its own (one file, a symbolic link); tests/unit/plugins/filter/test_rules.py holds both sides
to one table of examples.
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError
from ansible_collections.llmfleet.aws.plugins.module_utils.durations import parse_duration


def duration_seconds(value: Any, name: str = "duration") -> float | int | None:
    """Seconds in `value` (module_utils/durations.py), a whole number as an int; an error naming `name`
    and the value otherwise. `never`, `off` and `always-on` give None (no limit)."""
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise AnsibleFilterError(f"{name}: {exc}") from None
    if seconds is None:
        return None
    return int(seconds) if seconds.is_integer() else seconds


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"duration_seconds": duration_seconds}
