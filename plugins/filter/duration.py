# Copyright: llmfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The filter llmfleet.aws.duration_seconds: an idle threshold (a tag value) in seconds."""

from __future__ import annotations

import re
from typing import Any

from ansible.errors import AnsibleFilterError

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
# the words for a host that must never be stopped for idleness
NEVER = ("never", "off", "always-on")
_FORMS = "seconds, or a number with s, m, h or d, or never"


def duration_seconds(value: Any, name: str = "duration") -> float | int | None:
    """Seconds in `value`: a number, or a number with a unit s, m, h or d (`90`, `30m`, `1.5h`).

    `never`, `off` and `always-on` give None (no threshold). Anything else raises an error naming
    `name` and the value.
    """
    if isinstance(value, bool):
        raise AnsibleFilterError(f"{name}: {value!r} is not a duration ({_FORMS})")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        if text in NEVER:
            return None
        match = _DURATION.match(text)
        if not match:
            raise AnsibleFilterError(f"{name}: {value!r} is not a duration ({_FORMS})")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds < 0:
        raise AnsibleFilterError(f"{name}: {value!r} is negative")
    return int(seconds) if seconds.is_integer() else seconds


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"duration_seconds": duration_seconds}
