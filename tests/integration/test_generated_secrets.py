"""The generated secrets (roles/common tasks/secret.yml) against the emulator: teardown keeps the database's
master password scheduled for deletion, so a later build of the same deployment finds it there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from playbook_runs import ansible_playbook

NAME = "llmfleet/secret-test/database-master"

PLAYBOOK = """
- name: One generated secret
  hosts: localhost
  gather_facts: false
  module_defaults:
    group/community.aws.aws: {aws}
  tasks:
    - name: Generate or read it
      ansible.builtin.include_role:
        name: llmfleet.aws.common
        tasks_from: secret
      vars:
        common_secret_name: {name}
        common_aws: {aws}
    - name: Write its value where the test reads it
      ansible.builtin.copy:
        content: "{{{{ common_secret_value }}}}"
        dest: {out}
        mode: "0600"
"""


def test_a_secret_scheduled_for_deletion_is_restored_with_its_value(
    aws: Any, aws_endpoint: str, tmp_path: Path
) -> None:
    secrets = aws("secretsmanager")
    secrets.create_secret(Name=NAME, SecretString="the-password-of-the-snapshots")
    secrets.delete_secret(SecretId=NAME, RecoveryWindowInDays=7)
    assert "DeletedDate" in secrets.describe_secret(SecretId=NAME)

    out = tmp_path / "value"
    connection = {
        "region": "us-east-1",
        "endpoint_url": aws_endpoint,
        "access_key": "testing",
        "secret_key": "t",
    }
    playbook = tmp_path / "secret.yml"
    env = {"AWS_ENDPOINT_URL": aws_endpoint}  # the local inventory's aws_ec2 source reads it too
    playbook.write_text(PLAYBOOK.format(name=NAME, aws=json.dumps(connection), out=out))
    try:
        run = ansible_playbook(str(playbook), env=env)
        assert run.returncode == 0, run.output[-3000:]
        assert out.read_text() == "the-password-of-the-snapshots"
        assert "DeletedDate" not in secrets.describe_secret(SecretId=NAME)
        again = ansible_playbook(str(playbook), env=env)
        assert again.returncode == 0 and again.recap()["changed"] == 0, again.output[-3000:]
    finally:
        secrets.delete_secret(SecretId=NAME, ForceDeleteWithoutRecovery=True)
