"""Requests the fleet's gateway forwards: the gateway authenticates the caller (keys, directory logins,
budgets, from the shared store), then calls the agent with its own key - a key made `--gateway` - and
names the caller in headers. The agent serves the request as the caller's (their role and model patterns
decide, their key and person are in the usage record) and writes the request's one usage record; the
gateway writes none for what it forwards.

A gateway key is accepted only from `auth.gateway_sources` (the gateway's addresses; none by default), so
the headers of anyone else count for nothing: another key's X-Llmfleet-* headers are ignored. Without
the headers a gateway key acts as itself (its own role: the gateway's status and readiness polling).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace

from aiohttp import web

from .keys import KeyRecord, normalize_pattern
from .roles import Role

KEY_ID = "X-Llmfleet-Key-Id"  # the caller's key (or directory login) id
ROLE = "X-Llmfleet-Role"  # the caller's role
MODELS = "X-Llmfleet-Models"  # the caller's model patterns, comma-separated; absent or empty: every model
USER = "X-Llmfleet-User"  # the person behind the request, when there is one
REQUEST_ID = "X-Llmfleet-Request-Id"  # the gateway's id of the request, for the record
HEADERS = (KEY_ID, ROLE, MODELS, USER, REQUEST_ID)

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_REQUEST_ID = re.compile(r"^[0-9a-f]{8,32}$")
# a key's model pattern: a model name's characters and the glob's (keys.model_matches)
_PATTERN = re.compile(r"^[A-Za-z0-9._:/*?\[\]-]{1,200}$")
MAX_USER = 256
MAX_PATTERNS = 64


class GatewayRefusal(Exception):
    """A gateway key used from elsewhere, or headers that do not name a caller: the message says which."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def from_gateway(remote: str | None, sources: list[str]) -> bool:
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(source, strict=False) for source in sources)


def acting_for(gateway_key: KeyRecord, request: web.Request, sources: list[str]) -> KeyRecord:
    """The identity a request of `gateway_key` is served as: the caller its headers name, or the gateway
    itself when they name none. GatewayRefusal when it is not from auth.gateway_sources or the headers are
    wrong."""
    if not from_gateway(request.remote, sources):
        raise GatewayRefusal(
            403,
            f"key {gateway_key.id} is a gateway's key: accepted only from auth.gateway_sources, not from"
            f" {request.remote}",
        )
    headers = request.headers
    key_id = headers.get(KEY_ID)
    if key_id is None:
        return gateway_key
    if not _ID.match(key_id):
        raise GatewayRefusal(400, f"{KEY_ID}: not a key id")
    try:
        role = Role(headers.get(ROLE, ""))
    except ValueError:
        raise GatewayRefusal(400, f"{ROLE}: one of user, operator, admin") from None
    patterns = [p.strip() for p in headers.get(MODELS, "").split(",") if p.strip()]
    if len(patterns) > MAX_PATTERNS:
        raise GatewayRefusal(400, f"{MODELS}: at most {MAX_PATTERNS} patterns")
    for pattern in patterns:
        if not _PATTERN.match(pattern):
            raise GatewayRefusal(400, f"{MODELS}: {pattern[:80]!r} is not a model pattern")
    user = headers.get(USER, "").strip() or None
    if user is not None and (len(user) > MAX_USER or not user.isprintable()):
        raise GatewayRefusal(400, f"{USER}: printable, at most {MAX_USER} characters")
    request_id = headers.get(REQUEST_ID)
    if request_id is not None and not _REQUEST_ID.match(request_id):
        raise GatewayRefusal(400, f"{REQUEST_ID}: 8 to 32 lower-case hexadecimal digits")
    return replace(
        gateway_key,
        id=key_id,
        name=f"via gateway {gateway_key.id}",
        role=role,
        models=tuple(normalize_pattern(p) for p in patterns),
        owner=user,
        gateway=False,
        max_concurrent=None,
        rpm=None,
    )
