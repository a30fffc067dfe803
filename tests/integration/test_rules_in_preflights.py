"""The preflights check with the collection's one definition of each rule (tests/unit/.../test_rules.py).

- every idle_after the documents show passes the gpu_hosts preflight, and a bad one fails it naming the
  entry;
- every role's preflight refuses a bad deployment name naming its own variable;
- the idle sweep's default threshold takes what the filter takes.

Each test is one ansible-playbook run of the roles' preflight task files (block/rescue per role), with no
AWS endpoint: nothing may reach AWS.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from doc_examples import documented_idle_after
from playbook_runs import BIN, ROOT

pytestmark = pytest.mark.slow

# nothing listens here: a preflight that let the play reach AWS would fail with a connection error instead
NO_AWS = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}


def run_steps(tmp_path: Path, steps: list[dict[str, object]]) -> dict[str, str]:
    """Run each step {id, role, tasks_from, vars} in its own block: {id: 'passed' or the failed result}."""
    results = tmp_path / "results.json"
    tasks: list[dict[str, object]] = [
        {"name": "Start the record", "ansible.builtin.set_fact": {"_results": {}}},
    ]
    for step in steps:
        tasks.append(
            {
                "name": f"Step {step['id']}",
                "block": [
                    {
                        "name": f"{step['role']} {step['tasks_from']}",
                        "ansible.builtin.include_role": {
                            "name": f"llmfleet.aws.{step['role']}",
                            "tasks_from": step["tasks_from"],
                        },
                        "vars": step["vars"],
                    },
                    {
                        "name": "Passed",
                        "ansible.builtin.set_fact": {
                            "_results": "{{ _results | combine({_step: 'passed'}) }}"
                        },
                    },
                ],
                "rescue": [
                    {
                        "name": "Failed",
                        "ansible.builtin.set_fact": {
                            "_results": "{{ _results | combine({_step: ansible_failed_result | to_json}) }}"
                        },
                    }
                ],
                "vars": {"_step": step["id"]},
            }
        )
    tasks.append(
        {
            "name": "Write the record",
            "ansible.builtin.copy": {
                "content": "{{ _results | to_json }}",
                "dest": str(results),
                "mode": "0600",
            },
        }
    )
    playbook = tmp_path / "preflights.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Preflights",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "vars": {"ansible_python_interpreter": "{{ ansible_playbook_python }}"},
                    "tasks": tasks,
                }
            ]
        )
    )
    run = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(playbook)],
        cwd=ROOT,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **NO_AWS},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0 and results.is_file(), (run.stdout + run.stderr)[-4000:]
    found = json.loads(results.read_text())
    assert "Could not connect" not in run.stdout and "EndpointConnectionError" not in run.stdout
    return found


def _a_host() -> dict[str, object]:
    """A host entry the gpu_hosts preflight takes: the local inventory's first one."""
    hosts = yaml.safe_load((ROOT / "inventories/local/group_vars/all.yml").read_text())["llmfleet_gpu_hosts"]
    return dict(hosts[0])


def test_every_documented_idle_after_passes_the_gpu_hosts_preflight(tmp_path: Path) -> None:
    examples = documented_idle_after()
    assert examples
    base = _a_host()
    hosts = [{**base, "name": f"doc-{i}", "idle_after": value} for i, (_where, value) in enumerate(examples)]
    bad = [*hosts[:1], {**base, "name": "bad", "idle_after": "1.5x"}]
    found = run_steps(
        tmp_path,
        [
            {
                "id": "documented",
                "role": "gpu_hosts",
                "tasks_from": "preflight",
                "vars": {"gpu_hosts_deployment": "acme-llm", "gpu_hosts_hosts": hosts},
            },
            {
                "id": "bad",
                "role": "gpu_hosts",
                "tasks_from": "preflight",
                "vars": {"gpu_hosts_deployment": "acme-llm", "gpu_hosts_hosts": bad},
            },
        ],
    )
    assert found["documented"] == "passed", (found["documented"], examples)
    assert "gpu_hosts_hosts[1].idle_after: '1.5x' is not a duration" in found["bad"], found["bad"]


# each role's deployment variable, and the task file whose first check is the deployment's name
DEPLOYMENT_VARIABLES = {
    "network": "preflight",
    "directory": "preflight",
    "database": "preflight",
    "gpu_hosts": "preflight",
    "agent": "preflight",
    "idle_schedule": "preflight",
    "idle_shutdown": "discover",
}


def test_every_preflight_refuses_a_bad_deployment_name(tmp_path: Path) -> None:
    steps = [
        {"id": role, "role": role, "tasks_from": tasks_from, "vars": {f"{role}_deployment": "Acme_LLM"}}
        for role, tasks_from in DEPLOYMENT_VARIABLES.items()
    ]
    found = run_steps(tmp_path, steps)
    for role in DEPLOYMENT_VARIABLES:
        assert f"{role}_deployment" in found[role] and "'Acme_LLM' is not a deployment name" in found[role], (
            role,
            found[role],
        )


def test_the_sweeps_default_threshold_is_a_duration(tmp_path: Path) -> None:
    def sweep(value: object) -> dict[str, object]:
        return {
            "idle_shutdown_deployment": "acme-llm",
            "idle_shutdown_default_idle_after": value,
            "idle_shutdown_operator_key": "",  # the next check fails, before any AWS call
        }

    found = run_steps(
        tmp_path,
        [
            {"id": str(value), "role": "idle_shutdown", "tasks_from": "discover", "vars": sweep(value)}
            for value in ["2w", "1.5h", "never", 900, "soon"]
        ],
    )
    for value in ["2w", "1.5h", "never", "900"]:
        assert "idle_shutdown_operator_key" in found[value], (value, found[value])
    assert "idle_shutdown_default_idle_after: 'soon' is not a duration" in found["soon"], found["soon"]


def test_the_database_preflight_checks_retention_and_its_three_roles(tmp_path: Path) -> None:
    def database(**extra: object) -> dict[str, object]:
        return {"database_deployment": "acme-llm", "database_aws": {}, **extra}

    found = run_steps(
        tmp_path,
        [
            {"id": "defaults", "role": "database", "tasks_from": "preflight", "vars": database()},
            {
                "id": "never",
                "role": "database",
                "tasks_from": "preflight",
                "vars": database(database_usage_retention="never", database_audit_retention="2w"),
            },
            {
                "id": "bad",
                "role": "database",
                "tasks_from": "preflight",
                "vars": database(database_audit_retention="a year"),
            },
            {
                "id": "same",
                "role": "database",
                "tasks_from": "preflight",
                "vars": database(database_agent_username="llmfleet_owner"),
            },
        ],
    )
    assert found["defaults"] == "passed" and found["never"] == "passed", found
    assert "database_audit_retention (llmfleet_audit_retention): 'a year' is not a duration" in found["bad"]
    assert (
        "database_agent_username=llmfleet_owner" in found["same"] and "three different roles" in found["same"]
    )


def test_the_agent_preflight_names_what_a_postgresql_store_lacks(tmp_path: Path) -> None:
    def agent(**extra: object) -> dict[str, object]:
        return {"agent_deployment": "acme-llm", "agent_store": "postgresql", **extra}

    full = {"host": "db.internal", "database": "llmfleet", "user": "llmfleet_agent", "ca_bundle": "/ca.pem"}
    found = run_steps(
        tmp_path,
        [
            {
                "id": "no-password",
                "role": "agent",
                "tasks_from": "preflight",
                "vars": agent(agent_store_postgres=full),
            },
            {
                "id": "no-owner",
                "role": "agent",
                "tasks_from": "preflight",
                "vars": agent(
                    agent_store_postgres={**full, "password": "s3cret-agent-password"},
                    agent_keys=[{"name": "ops", "role": "operator"}],
                ),
            },
            {"id": "unknown", "role": "agent", "tasks_from": "preflight", "vars": agent(agent_store="mysql")},
        ],
    )
    assert "agent_store_postgres=" in found["no-password"] and "a mapping {host" in found["no-password"]
    assert "s3cret-agent-password" not in json.dumps(found)
    assert "agent_store_owner=" in found["no-owner"] and "writes keys" in found["no-owner"], found["no-owner"]
    assert "agent_store=mysql" in found["unknown"], found["unknown"]


def test_the_directory_logins_preflights_name_what_is_wrong(tmp_path: Path) -> None:
    """agent_ldap without its parts (the password never shown); directory_groups with a role that is none."""
    ldap = {
        "urls": ["ldaps://10.0.1.10:636"],
        "server_name": "corp.example.com",
        "ca_bundle": "/ad-ca.pem",
        "domain": "corp.example.com",
        "base_dn": "DC=corp,DC=example,DC=com",
        "bind_user": "llmfleet-svc@corp.example.com",
        "bind_password": "s3cret-service-password",
        "groups": {"llmfleet-users": {"role": "user"}},
    }
    agent = {"agent_deployment": "acme-llm"}
    directory = {
        "directory_deployment": "acme-llm",
        "directory_domain": "corp.example.com",
        "directory_aws": {},
    }
    found = run_steps(
        tmp_path,
        [
            {
                "id": "whole",
                "role": "agent",
                "tasks_from": "preflight",
                "vars": {**agent, "agent_ldap": ldap},
            },
            {
                "id": "no-groups",
                "role": "agent",
                "tasks_from": "preflight",
                "vars": {**agent, "agent_ldap": {**ldap, "groups": {}}},
            },
            {
                "id": "bad-role",
                "role": "directory",
                "tasks_from": "preflight",
                "vars": {**directory, "directory_groups": [{"name": "llmfleet-users", "role": "owner"}]},
            },
            {
                "id": "long-account",
                "role": "directory",
                "tasks_from": "preflight",
                "vars": {**directory, "directory_service_account": "a-service-account-name-too-long"},
            },
        ],
    )
    assert found["whole"] == "passed", found["whole"]
    assert "agent_ldap=" in found["no-groups"] and "groups (group name or DN" in found["no-groups"]
    assert "s3cret-service-password" not in json.dumps(found)
    assert "directory_groups=" in found["bad-role"] and "role (user, operator or admin)" in found["bad-role"]
    assert "directory_service_account=a-service-account-name-too-long" in found["long-account"]
