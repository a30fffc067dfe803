"""What an instance role grants, read back from IAM, and what Session Manager needs (the tests' own statement
of it, as AWS documents a Session Manager instance profile: not AmazonSSMManagedInstanceCore, which also reads
every SSM parameter of the account)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

SESSION_MANAGER = {
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
SESSION_MANAGER_ONLY = {"Version": "2012-10-17", "Statement": [SESSION_MANAGER]}


def role_grants(aws: Any, role: str) -> dict[str, Any]:
    """What an instance role grants, read back from IAM: managed and inline policies."""
    iam = aws("iam")
    attached = iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]
    inline = {}
    for name in iam.list_role_policies(RoleName=role)["PolicyNames"]:
        document = iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]
        inline[name] = json.loads(unquote(document)) if isinstance(document, str) else document
    return {"managed": sorted(p["PolicyArn"] for p in attached), "inline": inline}
