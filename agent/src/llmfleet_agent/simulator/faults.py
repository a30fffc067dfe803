"""Speed and fault switches of the simulator.

Each switch is a command-line flag and an environment variable (so a supervisor can hand them to its
child through the environment); a flag given on the command line wins over the variable.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn


class SettingError(ValueError):
    """A bad setting; the message names the variable or flag it came from."""


TOKEN_DELAY_ENV = "LLMFLEET_SIM_TOKEN_DELAY"  # noqa: S105 (a variable name, not a secret)
PULL_DELAY_ENV = "LLMFLEET_SIM_PULL_DELAY"
START_DELAY_ENV = "LLMFLEET_SIM_START_DELAY"
EXIT_AT_ONCE_ENV = "LLMFLEET_SIM_EXIT_AT_ONCE"
EXIT_AFTER_TOKENS_ENV = "LLMFLEET_SIM_EXIT_AFTER_TOKENS"
REFUSE_START_ENV = "LLMFLEET_SIM_REFUSE_START"

DEFAULT_PULL_DELAY = 0.01

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_seconds(source: str, raw: str) -> float:
    """A non-negative, finite number of seconds; `source` names where `raw` came from."""
    try:
        value = float(raw)
    except ValueError:
        raise SettingError(f"{source} must be a number of seconds, got {raw!r}") from None
    if value < 0 or not math.isfinite(value):
        raise SettingError(f"{source} must be a non-negative number of seconds, got {raw!r}")
    return value


def parse_switch(source: str, raw: str) -> bool:
    """A boolean written as 1/0, true/false, yes/no or on/off."""
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise SettingError(f"{source} must be 1 or 0 (or true/false), got {raw!r}")


def parse_token_count(source: str, raw: str) -> int:
    """A positive whole number of tokens."""
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingError(f"{source} must be a positive whole number, got {raw!r}") from None
    if value < 1:
        raise SettingError(f"{source} must be a positive whole number, got {raw!r}")
    return value


@dataclass(frozen=True)
class Faults:
    """How fast the simulator is and how it misbehaves."""

    token_delay: float = 0.0
    pull_delay: float = DEFAULT_PULL_DELAY
    start_delay: float = 0.0
    exit_at_once: bool = False
    exit_after_tokens: int | None = None
    refuse_start: bool = False

    def describe(self) -> str:
        """One line for the start-up log."""
        return (
            f"token_delay={self.token_delay}s pull_delay={self.pull_delay}s start_delay={self.start_delay}s "
            f"exit_after_tokens={self.exit_after_tokens or 'off'} "
            f"refuse_start={self.refuse_start} exit_at_once={self.exit_at_once}"
        )


@dataclass(frozen=True)
class FaultFlags:
    """The values given on the command line; None where a flag was not given."""

    token_delay: float | None = None
    pull_delay: float | None = None
    start_delay: float | None = None
    exit_at_once: bool | None = None
    exit_after_tokens: int | None = None
    refuse_start: bool | None = None


def _env(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name, "")
    return raw if raw.strip() else None


def faults_from(env: Mapping[str, str], flags: FaultFlags) -> Faults:
    """Merge flags over environment variables; raises SettingError naming a bad variable."""

    def seconds(flag: float | None, name: str, default: float) -> float:
        if flag is not None:
            return flag
        raw = _env(env, name)
        return default if raw is None else parse_seconds(name, raw)

    def switch(flag: bool | None, name: str) -> bool:
        if flag is not None:
            return flag
        raw = _env(env, name)
        return False if raw is None else parse_switch(name, raw)

    exit_after = flags.exit_after_tokens
    if exit_after is None and (raw := _env(env, EXIT_AFTER_TOKENS_ENV)) is not None:
        exit_after = parse_token_count(EXIT_AFTER_TOKENS_ENV, raw)
    return Faults(
        token_delay=seconds(flags.token_delay, TOKEN_DELAY_ENV, 0.0),
        pull_delay=seconds(flags.pull_delay, PULL_DELAY_ENV, DEFAULT_PULL_DELAY),
        start_delay=seconds(flags.start_delay, START_DELAY_ENV, 0.0),
        exit_at_once=switch(flags.exit_at_once, EXIT_AT_ONCE_ENV),
        exit_after_tokens=exit_after,
        refuse_start=switch(flags.refuse_start, REFUSE_START_ENV),
    )


def die(reason: str) -> NoReturn:
    """End the process at once with code 1, the way a crashed server goes: no cleanup, no goodbye."""
    sys.stderr.write(f"llmfleet-ollama-sim: fault: {reason}; exiting abruptly\n")
    sys.stderr.flush()
    os._exit(1)
