"""One rule, one place: a duration, a deployment's name and an agent key's id are each defined once.

A duration is module_utils/durations.py, one file that the agent package carries as its own
(agent/src/llmfleet_agent/durations.py is a symbolic link to it; the agent's wheel holds a copy): the filter
llmfleet.aws.duration_seconds (every preflight and the idle sweep) and the agent's config.parse_duration
(its configuration file and CLI) both read it. The table below holds both to the language: the same seconds
for every entry it accepts, a refusal for every entry it refuses. The documentation's examples (every
`idle_after:` and `llmfleet:idle-after=` value in docs/idle.md and docs/deploying.md) go through the filter
too; the integration test test_rules_in_preflights.py sends them through the gpu_hosts preflight.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError
from ansible_collections.llmfleet.aws.plugins.filter.agent_keys import agent_key_id
from ansible_collections.llmfleet.aws.plugins.filter.deployment import deployment_name
from ansible_collections.llmfleet.aws.plugins.filter.duration import duration_seconds
from doc_examples import documented_idle_after
from llmfleet_agent.config import parse_duration
from llmfleet_agent.keys import generate_secret, key_id_for

REPO = Path(__file__).resolve().parents[4]
REFUSED = object()

# value -> seconds (None: never), or REFUSED
DURATIONS: list[tuple[object, object]] = [
    (90, 90),
    (0.5, 0.5),
    (0, 0),
    ("90", 90),
    ("0", 0),
    ("0.5", 0.5),
    ("90s", 90),
    ("30m", 1800),
    ("30 m", 1800),
    (" 1H ", 3600),
    ("1.5h", 5400),
    ("2d", 172800),
    ("2w", 1209600),
    ("never", None),
    ("NEVER", None),
    ("off", None),
    ("Always-On", None),
    ("soon", REFUSED),
    ("30 minutes", REFUSED),
    ("1h30m", REFUSED),
    ("-5", REFUSED),
    (-5, REFUSED),
    ("", REFUSED),
    ("m", REFUSED),
    (".5", REFUSED),
    ("5.", REFUSED),
    ("1e3", REFUSED),
    ("1,5h", REFUSED),
    ("3y", REFUSED),
    ("\u0663", REFUSED),  # ARABIC-INDIC DIGIT THREE: a digit to Python's \d and float(), not to anyone's eye
    ("inf", REFUSED),
    (float("inf"), REFUSED),
    (float("nan"), REFUSED),
    (True, REFUSED),
    (False, REFUSED),
    (None, REFUSED),
    ([], REFUSED),
]


def _id(value: object) -> str:
    return repr(value)


@pytest.mark.parametrize(("value", "seconds"), DURATIONS, ids=[_id(entry[0]) for entry in DURATIONS])
def test_the_filter_reads_the_table(value: object, seconds: object) -> None:
    if seconds is REFUSED:
        with pytest.raises(
            AnsibleFilterError, match=r"^tag llmfleet:idle-after: .* (is not a duration|is negative)"
        ):
            duration_seconds(value, "tag llmfleet:idle-after")
    else:
        assert duration_seconds(value) == seconds


@pytest.mark.parametrize(("value", "seconds"), DURATIONS, ids=[_id(entry[0]) for entry in DURATIONS])
def test_the_agent_reads_the_same_table(value: object, seconds: object) -> None:
    if seconds is REFUSED:
        with pytest.raises(ValueError, match=r"(is not a duration|is negative)"):
            parse_duration(value)  # type: ignore[arg-type]
    else:
        assert parse_duration(value) == seconds  # type: ignore[arg-type]


def test_the_filter_names_what_it_reads() -> None:
    with pytest.raises(
        AnsibleFilterError, match=r"^gpu_hosts_hosts\[0\]\.idle_after: '1\.5x' is not a duration"
    ):
        duration_seconds("1.5x", "gpu_hosts_hosts[0].idle_after")


def test_the_documents_show_idle_after_examples() -> None:
    values = {value for _where, value in documented_idle_after()}
    # the forms docs/idle.md promises: seconds, a number with a unit, a fraction, never
    assert {900, "30m", "1.5h", "never"} <= values, values


@pytest.mark.parametrize(
    ("where", "value"), documented_idle_after(), ids=[where for where, _value in documented_idle_after()]
)
def test_every_documented_idle_after_is_a_duration(where: str, value: object) -> None:
    duration_seconds(value, where)


@pytest.mark.parametrize(
    "name", ["abc", "acme-llm", "a1-b2", "a" + "b" * 30 + "c", "llm--x"], ids=lambda n: f"{n}({len(n)})"
)
def test_deployment_names(name: str) -> None:
    assert deployment_name(name, "network_deployment") == name


@pytest.mark.parametrize(
    "name",
    [
        "ab",
        "a" * 33,
        "Acme",
        "acme_llm",
        "1acme",
        "acme-",
        "-acme",
        "acme llm",
        "",
        42,
        None,
        ["acme"],
        "acmé",
    ],
    ids=repr,
)
def test_not_deployment_names(name: object) -> None:
    with pytest.raises(
        AnsibleFilterError, match=r"^database_deployment: .* is not a deployment name: lower-case"
    ):
        deployment_name(name, "database_deployment")


def test_the_agent_reads_durations_with_the_collections_own_file() -> None:
    shared = REPO / "plugins" / "module_utils" / "durations.py"
    for name in ("durations.py", "idle_rules.py"):
        carried = REPO / "agent" / "src" / "llmfleet_agent" / name
        assert carried.is_symlink() and carried.resolve() == (shared.parent / name).resolve(), name


@pytest.mark.parametrize(
    "secret",
    [generate_secret(), generate_secret(), "x" * 32, "llmf_" + "é" * 40],
    ids=["random", "random2", "x32", "utf8"],
)
def test_the_key_id_is_the_agents(secret: str) -> None:
    assert agent_key_id(secret) == key_id_for(secret)


def test_a_key_id_of_nothing_is_an_error() -> None:
    with pytest.raises(AnsibleFilterError, match="agent_key_id: a key"):
        agent_key_id(None)


# the rules above, and nowhere else in the roles' YAML
RULE_COPIES = {
    "a deployment-name pattern (use the filter llmfleet.aws.deployment_name)": re.compile(
        r"deployment\s+is\s+match\("
    ),
    "a duration pattern (use the filter llmfleet.aws.duration_seconds)": re.compile(r"\[smhdw?\]"),
    "a key id computed in YAML (use the filter llmfleet.aws.agent_key_id)": re.compile(
        r"hash\(\s*'sha256'\s*\)"
    ),
}


@pytest.mark.parametrize("what", sorted(RULE_COPIES))
def test_no_role_or_playbook_repeats_a_rule(what: str) -> None:
    pattern = RULE_COPIES[what]
    files = [*REPO.glob("roles/*/tasks/*.yml"), *REPO.glob("playbooks/**/*.yml"), REPO / "site.yml"]
    copies = [
        f"{path.relative_to(REPO)}:{number}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert copies == [], f"{what}: {copies}"
