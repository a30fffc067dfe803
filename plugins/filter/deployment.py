# Copyright: llmfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The filter llmfleet.aws.deployment_name: the one rule for a deployment's name, which every role's
preflight checks with (it names AWS resources: `<deployment>-db`, `llmfleet/<deployment>/...`, tags)."""

from __future__ import annotations

import re
from typing import Any

from ansible.errors import AnsibleFilterError

_NAME = re.compile(r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$")
RULE = (
    "lower-case letters, digits and dashes, 3 to 32 characters, starting with a letter and ending with a"
    " letter or digit"
)


def deployment_name(value: Any, name: str = "deployment") -> str:
    """`value` when it is a deployment's name; otherwise an error naming `name` and the value."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise AnsibleFilterError(f"{name}: {value!r} is not a deployment name: {RULE}")
    return value


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"deployment_name": deployment_name}
