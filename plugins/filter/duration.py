# Copyright: llmfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The filter llmfleet.aws.duration_seconds: a duration (an idle threshold, a tag value) in seconds.

The collection's one definition of a duration: the preflights check with it (gpu_hosts' idle_after,
idle_shutdown's default) and the idle sweep reads the tag llmfleet:idle-after with it. The agent's
config.parse_duration reads the same language in its own package (the collection does not import the
agent); tests/unit/plugins/filter/test_rules.py holds both to one table of examples.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ansible.errors import AnsibleFilterError

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# ASCII digits only ([0-9], not \d: float() would take other scripts' digits too)
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)$")
# the words for no limit at all (a host that is never stopped for idleness)
NEVER = ("never", "off", "always-on")
_FORMS = "seconds, or a number with s, m, h, d or w such as 30m or 1.5h, or never"


def duration_seconds(value: Any, name: str = "duration") -> float | int | None:
    """Seconds in `value`: a number, or a number with a unit s, m, h, d or w (`90`, `30m`, `1.5h`, `2w`).

    Case and surrounding spaces do not matter. `never`, `off` and `always-on` give None (no limit).
    Anything else (a negative or non-finite number, a boolean, another word) raises an error naming `name`
    and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise AnsibleFilterError(f"{name}: {value!r} is not a duration ({_FORMS})")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in NEVER:
            return None
        match = _DURATION.match(text)
        if not match:
            raise AnsibleFilterError(f"{name}: {value!r} is not a duration ({_FORMS})")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise AnsibleFilterError(f"{name}: {value!r} is not a duration ({_FORMS})")
    if seconds < 0:
        raise AnsibleFilterError(f"{name}: {value!r} is negative")
    return int(seconds) if seconds.is_integer() else seconds


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"duration_seconds": duration_seconds}
