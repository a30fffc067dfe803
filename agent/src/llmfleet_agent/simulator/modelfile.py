"""A small reader of the older `/api/create` Modelfile text (FROM, SYSTEM, TEMPLATE, PARAMETER, LICENSE)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Modelfile:
    source: str = ""
    system: str | None = None
    template: str | None = None
    license: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def _unquote(value: str) -> str:
    value = value.strip()
    for quote in ('"""', '"'):
        if len(value) >= 2 * len(quote) and value.startswith(quote) and value.endswith(quote):
            return value[len(quote) : -len(quote)]
    return value


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, value) pairs; a value opened with triple quotes may span lines."""
    pairs: list[tuple[str, str]] = []
    lines = iter(text.splitlines())
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, value = stripped.partition(" ")
        value = value.strip()
        if value.startswith('"""') and (value.count('"""') == 1):
            rest = [value]
            for more in lines:
                rest.append(more)
                if '"""' in more:
                    break
            value = "\n".join(rest)
        pairs.append((keyword.upper(), _unquote(value)))
    return pairs


def parse_modelfile(text: str) -> Modelfile:
    """Read the instructions the simulator cares about; others are ignored."""
    parsed = Modelfile()
    for keyword, value in _instructions(text):
        if keyword == "FROM":
            parsed.source = value
        elif keyword == "SYSTEM":
            parsed.system = value
        elif keyword == "TEMPLATE":
            parsed.template = value
        elif keyword == "LICENSE":
            parsed.license = value
        elif keyword == "PARAMETER":
            key, _, raw = value.partition(" ")
            _add_parameter(parsed.parameters, key.strip(), _unquote(raw))
    return parsed


def _add_parameter(parameters: dict[str, Any], key: str, value: str) -> None:
    if key == "stop":  # stop may be given many times
        parameters.setdefault("stop", []).append(value)
        return
    for kind in (int, float):
        try:
            parameters[key] = kind(value)
        except ValueError:
            continue
        return
    parameters[key] = value
