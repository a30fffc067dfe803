"""The examples the documents show, for the tests that run them (tests/unit/plugins/filter/test_rules.py,
tests/integration/test_rules_in_preflights.py)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
# the documents that show idle_after values
IDLE_DOCS = ("docs/idle.md", "docs/deploying.md")
# `idle_after: 1.5h`, `llmfleet_idle_after: 30m`: a YAML value, typed as YAML types it (900 is a number,
# a bare off is false), inline or in a code block
_YAML_EXAMPLE = re.compile(r"\b\w*idle_after:[ \t]*([^\s`,}\]]+)")
# `llmfleet:idle-after=never`: a tag, always a string
_TAG_EXAMPLE = re.compile(r"llmfleet:idle-after=([^\s`,)]+)")


def documented_idle_after() -> list[tuple[str, object]]:
    """Every idle_after value the documents show, as (file:line: text, value)."""
    found: list[tuple[str, object]] = []
    for doc in IDLE_DOCS:
        for number, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
            for raw in _YAML_EXAMPLE.findall(line):
                found.append((f"{doc}:{number}: {raw}", yaml.safe_load(f"v: {raw}")["v"]))
            for raw in _TAG_EXAMPLE.findall(line):
                found.append((f"{doc}:{number}: llmfleet:idle-after={raw}", raw))
    return found
