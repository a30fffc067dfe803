# Copyright: llmfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The filter llmfleet.aws.ldaps_urls: where the agents reach a directory's domain controllers, the one rule
for the summary and the agents' settings (the directory role's connection entry point)."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError

LDAPS_PORT = 636


def ldaps_urls(addresses: Any) -> list[str]:
    """`ldaps://<address>:636` for each domain controller's address (IPv6 in brackets)."""
    if not isinstance(addresses, list) or not all(isinstance(a, str) and a for a in addresses):
        raise AnsibleFilterError(f"ldaps_urls: {addresses!r} is not a list of addresses")
    return [f"ldaps://{f'[{a}]' if ':' in a else a}:{LDAPS_PORT}" for a in addresses]


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"ldaps_urls": ldaps_urls}
