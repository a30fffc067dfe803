"""A small reader of the older `/api/create` Modelfile text (FROM, SYSTEM, TEMPLATE, PARAMETER, LICENSE).

Ollama before its create rewrite read `modelfile` on the server; newer servers ignore the field (their
client turns a Modelfile into `from` and `files`). The simulator reads it as the older servers did, and
the agent checks every FROM line against a key's model patterns, since either kind of server may run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .models import parse_digest


@dataclass
class Modelfile:
    source: str = ""  # the last FROM line's value: the one the server uses
    sources: list[str] = field(default_factory=list)  # every FROM line's value
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
        keyword, value = [*stripped.split(None, 1), ""][:2]  # a tab separates them too
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
            parsed.sources.append(value)
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


def names_model(source: str) -> bool:
    """True when a FROM value names a model; False for a blob digest or a file path on the server."""
    return not (parse_digest(source.lstrip("@")) or source.startswith(("/", ".", "~")))


def models_named(text: str) -> list[str]:
    """The models a Modelfile's FROM lines name (every line: a server may use any one of them)."""
    return [source for source in parse_modelfile(text).sources if names_model(source)]
