# Copyright: llmfleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The one definition of a duration, shared by the collection and the agent.

The collection's filter llmfleet.aws.duration_seconds (preflights, the idle sweep's llmfleet:idle-after
tag) wraps it; the agent package carries this very file as llmfleet_agent/durations.py (a symbolic link:
its wheel holds a copy), where its settings and CLI read durations with it. Pure Python, standard library
only, so that both sides can import it.
"""

from __future__ import annotations

import math
import re

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# ASCII digits only ([0-9], not \d: float() would take other scripts' digits too)
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)$")
# the words for no limit at all: a host never stopped for idleness, a retention that keeps everything, a key
# that never expires
NEVER = ("never", "off", "always-on")
FORMS = "seconds, or a number with s, m, h, d or w such as 30m or 1.5h, or never"


def parse_duration(value: object) -> float | None:
    """Seconds in `value`: a number, or a number with a unit s, m, h, d or w (`90`, `30m`, `1.5h`, `2w`).

    Case and surrounding spaces do not matter; `never`, `off` and `always-on` give None (no limit).
    Anything else (a negative or non-finite number, a boolean, another word) raises ValueError.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{value!r} is not a duration ({FORMS})")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in NEVER:
            return None
        match = _DURATION.match(text)
        if not match:
            raise ValueError(f"{value!r} is not a duration ({FORMS})")
        try:
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
        except OverflowError:
            raise ValueError(f"{value!r} is too large a duration") from None
    else:
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(f"{value!r} is too large a duration") from None
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a duration ({FORMS})")
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds
