"""The repository's metadata agrees with itself: one licence for the collection (the agent its own, on
purpose), one minimum Ansible, pinned installs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
ROLES = sorted(path.parent.parent for path in REPO.glob("roles/*/meta/main.yml"))
# the header each licence gives a plugin file
HEADERS = {"GPL-3.0-or-later": "GNU General Public License v3.0+"}


def _yaml(path: str | Path) -> dict:
    return yaml.safe_load((REPO / path).read_text())


def licence() -> str:
    licences = _yaml("galaxy.yml")["license"]
    assert len(licences) == 1, f"galaxy.yml: one licence for the collection, not {licences}"
    return licences[0]


# the agent is a program of its own (a wheel on the hosts, no Ansible code in it): its own licence, on purpose
AGENT_LICENCE = "Apache-2.0"


def test_the_collection_has_one_licence_and_the_agent_its_own() -> None:
    agent = tomllib.loads((REPO / "agent" / "pyproject.toml").read_text())["project"]["license"]
    assert licence() == "GPL-3.0-or-later"
    assert agent == AGENT_LICENCE
    imports = [
        path
        for path in (REPO / "agent" / "src").rglob("*.py")
        if re.search(r"^\s*(from|import) ansible", path.read_text(), re.MULTILINE)
    ]
    assert not imports, f"the agent imports Ansible code, so it cannot keep its own licence: {imports}"


@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.name)
def test_every_role_has_the_collections_licence(role: Path) -> None:
    assert _yaml(role / "meta" / "main.yml")["galaxy_info"]["license"] == licence()


def test_every_plugin_file_says_the_licence() -> None:
    header = HEADERS[licence()]
    unlabelled = [
        str(path.relative_to(REPO))
        for path in sorted(REPO.glob("plugins/**/*.py"))
        if path.name != "__init__.py" and header not in path.read_text()[:600]
    ]
    assert unlabelled == []


# ansible 12 is ansible-core 2.19 with amazon.aws 10 (where the aws_ssm connection lives) and community.aws 10
ANSIBLE, ANSIBLE_CORE, AWS_COLLECTIONS = Version("12"), "2.19", Version("10")


def _requirement(name: str) -> Requirement:
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and Requirement(line).name == name:
            return Requirement(line)
    raise AssertionError(f"requirements.txt: no {name}")


def _lowest(spec: str) -> Version:
    """The lower bound of a >= specifier such as '>=10.0.0'."""
    bounds = [Version(s.version) for s in SpecifierSet(spec) if s.operator == ">="]
    assert bounds, f"{spec!r}: no lower bound"
    return max(bounds)


def test_ansible_12_is_required_everywhere() -> None:
    ansible = _requirement("ansible").specifier
    assert Version("11.99") not in ansible and Version("12.0.0") in ansible, ansible
    requires_ansible = _yaml("meta/runtime.yml")["requires_ansible"]
    assert _lowest(requires_ansible).release[:2] == Version(ANSIBLE_CORE).release[:2], requires_ansible
    galaxy = _yaml("galaxy.yml")["dependencies"]
    wanted = {entry["name"]: entry["version"] for entry in _yaml("requirements.yml")["collections"]}
    for collection in ("amazon.aws", "community.aws"):
        assert _lowest(galaxy[collection]) >= AWS_COLLECTIONS, f"galaxy.yml {collection} {galaxy[collection]}"
        assert _lowest(wanted[collection]) >= AWS_COLLECTIONS, (
            f"requirements.yml {collection} {wanted[collection]}"
        )


@pytest.mark.parametrize("role", ROLES, ids=lambda role: role.name)
def test_every_role_asks_for_the_collections_ansible(role: Path) -> None:
    requires_ansible = _lowest(_yaml("meta/runtime.yml")["requires_ansible"])
    minimum = str(_yaml(role / "meta" / "main.yml")["galaxy_info"]["min_ansible_version"])
    assert Version(minimum).release[:2] == requires_ansible.release[:2]


def test_the_constraints_pin_what_this_venv_has() -> None:
    """constraints.txt pins, to the version installed here, everything the requirements pull in."""
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "lock.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr


def test_the_constraints_allow_what_the_requirements_ask() -> None:
    pins = {
        match.group(1).lower(): Version(match.group(2))
        for match in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    }
    assert "llmfleet-agent" not in pins
    assert pins["ansible"] in _requirement("ansible").specifier


def _make_would_run(*args: str) -> list[str]:
    """The pip commands make would run for the venv (make -n: nothing is run); -o FILE: as if FILE had not
    changed, -W FILE: as if FILE had just changed."""
    run = subprocess.run(
        ["make", "-n", *args, ".venv/bin/.installed"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return [line for line in run.stdout.splitlines() if "pip install" in line]


def test_the_venv_is_installed_with_the_constraints_and_rebuilt_when_they_change() -> None:
    if not (REPO / ".venv" / "bin" / ".installed").is_file():
        pytest.skip("no .venv made by make venv here")
    unchanged = ["-o", "agent/pyproject.toml", "-o", "requirements.txt", "-o", "requirements-dev.txt"]
    assert _make_would_run(*unchanged, "-o", "constraints.txt") == []
    installs = _make_would_run(*unchanged, "-W", "constraints.txt")
    assert installs and all("-c constraints.txt" in line for line in installs), installs
