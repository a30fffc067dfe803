# Copyright: llmfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The filter llmfleet.aws.agent_key_id: an agent API key's id, as the agent derives it.

The agent (agent/src/llmfleet_agent/keys.py, key_id_for) is the definition: the first 16 hex digits of
the key's SHA-256. The collection cannot import the agent package; tests/unit/plugins/filter/test_rules.py
holds this filter to key_id_for on sample keys.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ansible.errors import AnsibleFilterError

ID_LENGTH = 16


def agent_key_id(secret: Any) -> str:
    """The id the agent gives the key `secret` (already stripped, as the agent stores it)."""
    if not isinstance(secret, str) or not secret:
        raise AnsibleFilterError("agent_key_id: a key (a non-empty string) is needed")
    return hashlib.sha256(secret.encode()).hexdigest()[:ID_LENGTH]


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"agent_key_id": agent_key_id}
