# Copyright: llmfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The filter llmfleet.aws.instance_role_policy: the one inline policy document of an instance role the
collection makes (the GPU hosts', the gateways'). Every such role gets Session Manager (how Ansible reaches
the hosts: no bastion, no open port) and exactly the statements its role adds, nothing else.

Session Manager is granted by its own statement, not by the AWS managed policy AmazonSSMManagedInstanceCore:
that policy also allows `ssm:GetParameter(s)` on every parameter of the account, patching and inventory,
which no llmfleet host uses. The five actions below are the ones AWS documents for a Session Manager
instance profile (its managed AWSCloud9SSMInstanceProfile is the same five)."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError

SESSION_MANAGER: dict[str, Any] = {
    "Sid": "SessionManager",
    "Effect": "Allow",
    "Action": [
        "ssm:UpdateInstanceInformation",
        "ssmmessages:CreateControlChannel",
        "ssmmessages:CreateDataChannel",
        "ssmmessages:OpenControlChannel",
        "ssmmessages:OpenDataChannel",
    ],
    "Resource": "*",
}


def instance_role_policy(statements: Any) -> dict[str, Any]:
    """The policy document: Session Manager's statement, then `statements` (each a dict with its own Sid)."""
    if not isinstance(statements, list) or not all(isinstance(s, dict) for s in statements):
        raise AnsibleFilterError(f"instance_role_policy: {statements!r} is not a list of statements")
    sids = [SESSION_MANAGER["Sid"]] + [s.get("Sid") for s in statements]
    if None in sids or len(set(sids)) != len(sids):
        raise AnsibleFilterError(f"instance_role_policy: every statement needs its own Sid, got {sids[1:]!r}")
    return {"Version": "2012-10-17", "Statement": [SESSION_MANAGER, *statements]}


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"instance_role_policy": instance_role_policy}
