"""Personal keys: a directory user mints keys for their scripts and tools (docs/directory.md).

- `POST /agent/keys` with HTTP Basic directory credentials: a new key (shown once, stored hashed) whose
  role and models are the user's current group rights (`auth.ldap.groups`), tied to the account's
  objectGUID and UPN; body `{"name": ..., "expires": "30d"}`, both optional, the lifetime capped at
  `auth.ldap.key_max_ttl`, at most `auth.ldap.max_keys_per_user` active keys.
- `GET /agent/keys`: the caller's own personal keys (a personal key or Basic credentials say who the caller
  is); an admin sees everyone's.
- `DELETE /agent/keys/{id}`: revoke one of the caller's keys; an admin may revoke anyone's.

Only personal keys are listed and revoked here: the operators' keys are the deployment's
(`llmfleet-agent keys`, the agent role). Every login failure, mint and revocation is audited.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass

from aiohttp import web

from .access_control import SELF_SERVICE, self_service
from .appkeys import AUDIT, CONFIG, KEYRING, STORE
from .auth import AuthFailure
from .config import parse_duration
from .directory_login import basic_credentials, signed_in
from .entitlements import key_grant
from .http_errors import json_error, send_continue
from .keys import PERSONAL_HASH_PREFIX, KeyRecord, generate_secret
from .logs import clip, event
from .roles import Role
from .store import AuditRecord

routes = web.RouteTableDef()
log = logging.getLogger("llmfleet.directory")
_OWNER_LOCKS: dict[str, asyncio.Lock] = {}

MAX_BODY = 4096
MAX_NAME = 64


@dataclass(frozen=True)
class Caller:
    owner_id: str | None  # the directory account (None: a key that is not personal)
    owner: str | None
    admin: bool
    key_id: str | None


def _store_away() -> web.Response:
    return json_error(503, "the key store is unreachable; try again later", {"Retry-After": "5"})


async def _caller(request: web.Request) -> Caller | web.Response:
    """Who asks: Basic directory credentials, or a key (a personal key names its owner)."""
    basic = basic_credentials(request)
    if basic is not None:
        found = await signed_in(request, *basic)
        if isinstance(found, web.Response):
            return found
        user, grant = found
        return Caller(user.guid, user.upn, grant.role is Role.ADMIN, None)
    result = await request.app[KEYRING].authenticate(request)
    if isinstance(result, AuthFailure):
        headers = (
            {"Retry-After": "5"} if result.status == 503 else {"WWW-Authenticate": 'Bearer realm="llmfleet"'}
        )
        return json_error(result.status, result.message, headers)
    if not result.personal and result.role is not Role.ADMIN:
        return json_error(
            403,
            f"key {result.id} is not a personal key: sign in with your directory account or a personal key",
        )
    return Caller(result.owner_id, result.owner, result.role is Role.ADMIN, result.id)


async def _body(request: web.Request) -> dict[str, object] | web.Response:
    raw = b""
    while len(raw) <= MAX_BODY:  # to the end (a body may come in many chunks), never past the cap
        chunk = await request.content.read(MAX_BODY + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    if len(raw) > MAX_BODY:
        return json_error(413, f"the body is larger than {MAX_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        return json_error(400, "the body is not JSON")
    if not isinstance(doc, dict):
        return json_error(400, 'the body must be a JSON object: {"name": ..., "expires": ...}')
    unknown = sorted(set(doc) - {"name", "expires"})
    if unknown:
        return json_error(400, f"unknown field(s) {', '.join(unknown)}: only name and expires")
    return doc


@routes.post("/agent/keys")
@self_service
async def mint(request: web.Request) -> web.StreamResponse:
    basic = basic_credentials(request)
    if basic is None:
        return json_error(
            401,
            "minting a personal key needs your directory credentials (HTTP Basic: user and password)",
            {"WWW-Authenticate": 'Basic realm="llmfleet"'},
        )
    found = await signed_in(request, *basic)
    if isinstance(found, web.Response):
        return found
    user, grant = found[0], key_grant(found[1])
    await send_continue(request)
    doc = await _body(request)
    if isinstance(doc, web.Response):
        return doc
    ldap = request.app[CONFIG].auth.ldap
    assert ldap is not None
    name = doc.get("name", "personal")
    if (
        not isinstance(name, str)
        or not name.strip()
        or len(name) > MAX_NAME
        or any(ord(c) < 32 for c in name)
    ):
        return json_error(400, f"name: a label of 1 to {MAX_NAME} characters (got {clip(repr(name))})")
    ttl: float | None = ldap.key_default_ttl
    if "expires" in doc:
        try:
            ttl = parse_duration(doc["expires"])  # type: ignore[arg-type]
        except ValueError as exc:
            return json_error(400, f"expires: {exc}")
        if ttl is None or ttl > ldap.key_max_ttl or ttl <= 0:
            return json_error(
                400,
                f"expires: at most {ldap.key_max_ttl:g} seconds (auth.ldap.key_max_ttl);"
                f" got {clip(repr(doc['expires']))}",
            )
    store = request.app[STORE]
    # one mint per owner at a time on this agent, so two at once cannot both pass the count
    lock = _OWNER_LOCKS.setdefault(user.guid, asyncio.Lock())
    try:
        async with lock:
            mine = [k for k in await store.list_keys() if k.owner_id == user.guid and k.refusal() is None]
            if len(mine) >= ldap.max_keys_per_user:
                return json_error(
                    409,
                    f"{user.upn} has {len(mine)} active keys, the most allowed (auth.ldap.max_keys_per_user);"
                    " revoke one first",
                )
            secret = generate_secret()
            minted = KeyRecord.new(secret, name.strip(), grant.role, grant.models, ttl)
            record = dataclasses.replace(
                minted,
                hash=PERSONAL_HASH_PREFIX + minted.hash,
                owner_id=user.guid,
                owner=user.upn,
                checked=time.time(),
            )
            await store.put_key(record)
    except Exception as exc:
        event(log, logging.WARNING, "could not store a personal key", error=repr(exc))
        return _store_away()
    finally:
        if not lock.locked():
            _OWNER_LOCKS.pop(user.guid, None)
    detail = {"owner": clip(user.upn), "name": clip(record.name), "role": record.role.value}
    request.app[AUDIT].add(AuditRecord("key_minted", record.id, detail))
    return web.json_response({"key": secret, **record.public()}, status=201)


@routes.get("/agent/keys")
@self_service
async def list_personal(request: web.Request) -> web.StreamResponse:
    caller = await _caller(request)
    if isinstance(caller, web.Response):
        return caller
    try:
        keys = await request.app[STORE].list_keys()
    except Exception:
        return _store_away()
    shown = [k for k in keys if k.personal and (caller.admin or k.owner_id == caller.owner_id)]
    return web.json_response({"keys": [k.public() for k in shown]})


@routes.delete("/agent/keys/{key_id}")
@self_service
async def revoke(request: web.Request) -> web.StreamResponse:
    caller = await _caller(request)
    if isinstance(caller, web.Response):
        return caller
    key_id = request.match_info["key_id"]
    store = request.app[STORE]
    try:
        record = await store.get_key(key_id)
        if record is None or not record.personal or not (caller.admin or record.owner_id == caller.owner_id):
            return json_error(404, f"no personal key {clip(key_id)} of yours")
        revoked = await store.revoke_key(key_id, time.time())
    except Exception:
        return _store_away()
    assert revoked is not None
    detail = {"owner": clip(record.owner or ""), "by": clip(caller.owner or caller.key_id or "")}
    request.app[AUDIT].add(AuditRecord("key_revoked", key_id, detail))
    return web.json_response(revoked.public())


__all__ = ["SELF_SERVICE", "routes"]
