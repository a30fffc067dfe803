"""The agent role installs acl before any step runs as another user (become_user).

Over SSM Ansible logs in as ssm-user and hands its temporary files to the service user with POSIX ACLs
(setfacl); without the acl package every become_user step fails on a fresh Debian or Ubuntu host. The
molecule scenario runs the task (its image has acl: nothing inside can reach a package index); this test
holds its place in the role's order.
"""

from __future__ import annotations

from pathlib import Path

import yaml

TASKS = Path(__file__).resolve().parents[2] / "roles" / "agent" / "tasks"


def flatten(name: str) -> list[dict[str, object]]:
    """The role's tasks in the order they run, with imported and included files and blocks expanded."""
    order: list[dict[str, object]] = []
    for task in yaml.safe_load((TASKS / name).read_text()) or []:
        order += _expand(task)
    return order


def _expand(task: dict[str, object]) -> list[dict[str, object]]:
    for key in ("ansible.builtin.import_tasks", "ansible.builtin.include_tasks"):
        if key in task:
            return flatten(str(task[key]))
    if "block" in task:
        return [
            {**sub, "become_user": sub.get("become_user", task.get("become_user"))}
            for item in task["block"]  # type: ignore[attr-defined]
            for sub in _expand(item)
        ]
    return [task]


def test_acl_comes_before_every_become_user_step() -> None:
    tasks = flatten("main.yml")
    acl = [
        i
        for i, task in enumerate(tasks)
        if (task.get("ansible.builtin.package") or {}).get("name") in ("acl", ["acl"])  # type: ignore[union-attr]
    ]
    become_user = [i for i, task in enumerate(tasks) if task.get("become_user")]
    assert acl, "roles/agent installs no acl package"
    assert become_user, "no become_user step found: the test reads the role wrongly"
    assert acl[0] < become_user[0], (tasks[acl[0]]["name"], tasks[become_user[0]]["name"])
    when = tasks[acl[0]].get("when")
    assert "Debian" in str(when), f"the acl task should run on the Debian family only: when={when}"
