"""Who is behind a request, for its usage record (and budgets): the owner of a personal key, or, for a
key marked `frontend` (the key Open WebUI talks to the agent with), the end user the frontend names in its
forwarded headers (Open WebUI's `ENABLE_FORWARD_USER_INFO_HEADERS`): the e-mail, else the id, else the
name. Any other key's such headers are ignored: a client cannot charge its use to someone else.
"""

from __future__ import annotations

from collections.abc import Mapping

from .keys import KeyRecord

# in order of preference: the e-mail is what a directory login and the usage report share
USER_HEADERS = ("X-OpenWebUI-User-Email", "X-OpenWebUI-User-Id", "X-OpenWebUI-User-Name")
MAX_USER = 256


def request_user(key: KeyRecord, headers: Mapping[str, str]) -> str | None:
    if key.owner is not None:
        return key.owner
    if not key.frontend:
        return None
    for name in USER_HEADERS:
        value = headers.get(name, "").strip()
        if value and len(value) <= MAX_USER and value.isprintable():
            return value
    return None
