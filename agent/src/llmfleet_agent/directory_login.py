"""Signing in with directory credentials (HTTP Basic): who the user is, whether they may, and, with
`auth.ldap.basic_on_api`, an identity for the API routes (for curl users) kept a short while so that not
every request binds.

Failed logins are throttled (login_throttle.py) and audited; the directory away answers 503.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import math
import os
import time
from collections import OrderedDict

from aiohttp import web

from .appkeys import AUDIT, CONFIG, DIRECTORY, KEYRING, LOGIN_THROTTLE
from .directory import DirectoryBusy, DirectoryUnavailable, DirectoryUser, InvalidCredentials
from .entitlements import Grant, grant_for, key_grant
from .http_errors import json_error
from .keys import KeyRecord
from .logs import clip, event
from .store import AuditRecord

log = logging.getLogger("llmfleet.directory")
DIRECTORY_AWAY = (
    "the directory is unreachable, so new logins cannot be checked (existing keys keep working);"
    " try again later"
)


def basic_credentials(request: web.Request) -> tuple[str, str] | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        login, sep, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
    except (binascii.Error, ValueError):  # not base64 (non-ASCII text included), or not UTF-8
        return ("", "")
    return (login, password) if sep else ("", "")


async def directory_user(request: web.Request, login: str, password: str) -> DirectoryUser | web.Response:
    throttle = request.app[LOGIN_THROTTLE]
    wait = throttle.retry_after(login, request.remote)
    if wait is not None:  # refused without a bind: the account is not locked out by guesses through us
        seconds = math.ceil(wait)
        return json_error(
            429,
            "too many failed directory logins for this account or from this address;"
            f" try again in {seconds} s",
            {"Retry-After": str(seconds)},
        )
    try:
        user = await request.app[DIRECTORY].authenticate(login, password)
    except InvalidCredentials:
        throttle.failed(login, request.remote)
        request.app[KEYRING].record_failure(request, f"invalid directory credentials for {clip(login)}")
        return json_error(
            401, "invalid directory credentials", {"WWW-Authenticate": 'Basic realm="llmfleet"'}
        )
    except DirectoryBusy:
        return json_error(503, "too many directory logins at once; try again shortly", {"Retry-After": "1"})
    except DirectoryUnavailable as exc:
        _log_unavailable(str(exc))
        return json_error(503, DIRECTORY_AWAY, {"Retry-After": "10"})
    throttle.succeeded(login)
    return user


_last_logged = [0.0]


def _log_unavailable(error: str) -> None:
    """Why logins cannot be checked (a wrong service password, a CA, every DC down), once a minute."""
    now = time.monotonic()
    if now - _last_logged[0] >= 60:
        _last_logged[0] = now
        event(log, logging.ERROR, "directory unreachable: logins refused with 503", error=error)


def entitled(request: web.Request, user: DirectoryUser) -> Grant | web.Response:
    if user.unusable is not None:
        request.app[KEYRING].record_failure(request, f"directory account {user.upn}: {user.unusable}")
        return json_error(401, f"{user.upn}: {user.unusable}")
    ldap = request.app[CONFIG].auth.ldap
    assert ldap is not None
    grant = grant_for(user.groups, ldap.groups)
    if grant is None:
        detail = {"user": clip(user.upn), "path": clip(request.path)}
        request.app[AUDIT].add(AuditRecord("directory_not_entitled", None, detail))
        return json_error(403, f"{user.upn} is in none of the groups that may use this service")
    return grant


async def signed_in(
    request: web.Request, login: str, password: str
) -> tuple[DirectoryUser, Grant] | web.Response:
    """The user behind directory credentials and what their groups grant, or the answer that refuses them."""
    user = await directory_user(request, login, password)
    if isinstance(user, web.Response):
        return user
    grant = entitled(request, user)
    if isinstance(grant, web.Response):
        return grant
    return user, grant


# --- HTTP Basic on the API routes (auth.ldap.basic_on_api) ------------------------------------------------
# a successful login is kept for auth.ldap.basic_cache_ttl under a keyed hash of the name and password (the
# key is random per process: nothing on disk, nothing a log could show); at most BASIC_CACHE_MAX entries
BASIC_CACHE_MAX = 10_000
_SALT = os.urandom(32)
_basic_cache: OrderedDict[bytes, tuple[float, KeyRecord]] = OrderedDict()


def _cache_key(login: str, password: str) -> bytes:
    return hmac.new(_SALT, f"{login.strip().lower()}\0{password}".encode(), hashlib.sha256).digest()


# the id of a directory login's identity on the API (never a key's: keys' ids are hexadecimal)
LOGIN_ID_PREFIX = "u-"


def identity_key(user: DirectoryUser, grant: Grant) -> KeyRecord:
    """The identity a directory login has on the API: what a personal key of theirs would have, under an
    id of its own (limits count per person), recorded for them."""
    capped = key_grant(grant)
    return KeyRecord(
        id=LOGIN_ID_PREFIX + hashlib.sha256(user.guid.encode()).hexdigest()[:14],
        name=user.upn,
        role=capped.role,
        hash="",
        models=capped.models,
        owner_id=user.guid,
        owner=user.upn,
        checked=time.time(),
    )


async def basic_identity(request: web.Request) -> KeyRecord | web.Response:
    """The caller of an API route who sent directory credentials, or the answer that refuses them."""
    login, password = basic_credentials(request) or ("", "")
    ldap = request.app[CONFIG].auth.ldap
    assert ldap is not None
    key = _cache_key(login, password)
    now = time.monotonic()
    cached = _basic_cache.get(key)
    if cached is not None and cached[0] > now:
        return cached[1]
    found = await signed_in(request, login, password)
    if isinstance(found, web.Response):
        return found
    identity = identity_key(*found)
    _basic_cache[key] = (now + ldap.basic_cache_ttl, identity)
    _basic_cache.move_to_end(key)
    while len(_basic_cache) > BASIC_CACHE_MAX:
        _basic_cache.popitem(last=False)
    return identity
