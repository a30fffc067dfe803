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

import functools
import json
import re
import time
from dataclasses import replace

from aiohttp import web

from .addresses import parse_address, parse_networks, within
from .keys import KeyRecord, normalize_pattern
from .roles import Role

KEY_ID = "X-Llmfleet-Key-Id"  # the caller's key (or directory login) id
ROLE = "X-Llmfleet-Role"  # the caller's role
MODELS = "X-Llmfleet-Models"  # the caller's model patterns, a JSON array; absent or []: every model
USER = "X-Llmfleet-User"  # the person behind the request, when there is one
REQUEST_ID = "X-Llmfleet-Request-Id"  # the gateway's id of the request, for the record
# when the request reached the gateway (Unix seconds): the record's time, so that the record's key (time,
# request id) is the gateway's and a request recorded twice is stored once
REQUEST_TS = "X-Llmfleet-Request-Ts"
HEADERS = (KEY_ID, ROLE, MODELS, USER, REQUEST_ID, REQUEST_TS)
# the gateway enforced the caller's limits: the agent does not apply its defaults again
UNLIMITED = 2**31 - 1
MAX_SKEW = 300.0

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_REQUEST_ID = re.compile(r"^[0-9a-f]{8,32}$")
MAX_PATTERN = 200
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
    return _within(remote, tuple(sources))


# the answer for each address a gateway key came from (a gateway has one or a few): parsing the address and
# the networks cost more than the rest of the check
@functools.lru_cache(maxsize=256)
def _within(remote: str, sources: tuple[str, ...]) -> bool:
    return within(parse_address(remote), parse_networks(sources))


def request_stamp(request: web.Request) -> tuple[str | None, float | None]:
    """The gateway's id and time of the request (GatewayRefusal when they are wrong)."""
    request_id = request.headers.get(REQUEST_ID)
    if request_id is not None and not _REQUEST_ID.match(request_id):
        raise GatewayRefusal(400, f"{REQUEST_ID}: 8 to 32 lower-case hexadecimal digits")
    raw = request.headers.get(REQUEST_TS)
    if raw is None:
        return request_id, None
    try:
        ts = float(raw)
    except ValueError:
        raise GatewayRefusal(400, f"{REQUEST_TS}: Unix seconds") from None
    if not abs(ts - time.time()) <= MAX_SKEW:  # also refuses nan and inf
        raise GatewayRefusal(400, f"{REQUEST_TS}: more than {MAX_SKEW:g} s from this host's clock")
    return request_id, ts


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
    return _caller(gateway_key, key_id, headers.get(ROLE, ""), headers.get(MODELS), headers.get(USER, ""))


# the caller's identity made from the headers, remembered per gateway key and header values: a caller's
# requests repeat them. At most 256, each a few header values (under 8 KB each: aiohttp's field limit);
# a refusal raises and is not remembered
@functools.lru_cache(maxsize=256)
def _caller(
    gateway_key: KeyRecord, key_id: str, role_name: str, models: str | None, user_name: str
) -> KeyRecord:
    if not _ID.match(key_id):
        raise GatewayRefusal(400, f"{KEY_ID}: not a key id")
    try:
        role = Role(role_name)
    except ValueError:
        raise GatewayRefusal(400, f"{ROLE}: one of user, operator, admin") from None
    try:
        patterns = json.loads(models or "[]")
    except ValueError:
        patterns = None
    if (
        not isinstance(patterns, list)
        or len(patterns) > MAX_PATTERNS
        or not all(isinstance(p, str) and 0 < len(p) <= MAX_PATTERN for p in patterns)
    ):
        raise GatewayRefusal(400, f"{MODELS}: a JSON array of at most {MAX_PATTERNS} model patterns")
    user = user_name.strip() or None
    if user is not None and (len(user) > MAX_USER or not user.isprintable()):
        raise GatewayRefusal(400, f"{USER}: printable, at most {MAX_USER} characters")
    return replace(
        gateway_key,
        id=key_id,
        name=f"via gateway {gateway_key.id}",
        role=role,
        models=tuple(normalize_pattern(p) for p in patterns),
        owner=user,
        gateway=False,
        max_concurrent=UNLIMITED,
        rpm=UNLIMITED,
    )
