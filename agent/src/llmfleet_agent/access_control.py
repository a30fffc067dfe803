"""Which role each route needs, and the middleware that enforces it.

Handlers declare their role with `@requires(Role.X)` or `@public`. A handler that declares nothing is
refused to everyone: forgetting the declaration can never open a route. Requests for unknown routes need
a credential too, so the route map is not revealed to strangers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from .access import REQUEST_KEY_ID
from .appkeys import AUDIT, CONFIG, KEYRING
from .auth import AuthFailure
from .gateway_identity import GatewayRefusal, acting_for, request_stamp
from .http_errors import Handler, json_error, send_continue
from .keys import KeyRecord
from .logs import clip
from .roles import Role
from .store import AuditRecord

_ATTR = "llmfleet_role"
_PUBLIC = PUBLIC = "public"
# the handler authenticates the caller itself (directory credentials or a key): personal_keys.py
SELF_SERVICE = "self-service"
REQUEST_KEY = "llmfleet_key"
# the id and time the gateway gave a request it forwards (gateway_identity.py), for its usage record
GATEWAY_REQUEST_ID = "llmfleet_gateway_request_id"
GATEWAY_REQUEST_TS = "llmfleet_gateway_request_ts"

F = TypeVar("F", bound=Callable[..., Any])


def requires(role: Role) -> Callable[[F], F]:
    def mark(handler: F) -> F:
        setattr(handler, _ATTR, role)
        return handler

    return mark


def public(handler: F) -> F:
    setattr(handler, _ATTR, _PUBLIC)
    return handler


def self_service(handler: F) -> F:
    """The handler checks who asks itself (HTTP Basic directory credentials, or a key) before it reads a
    body; it must refuse every request it cannot attribute."""
    setattr(handler, _ATTR, SELF_SERVICE)
    return handler


def role_of(handler: Any) -> Role | str | None:
    """What a handler declared: a Role, PUBLIC, or None (open to no role)."""
    return getattr(handler, _ATTR, None)


def request_key(request: web.Request) -> KeyRecord:
    key: KeyRecord = request[REQUEST_KEY]
    return key


def _is_basic(request: web.Request) -> bool:
    return request.headers.get("Authorization", "").partition(" ")[0].lower() == "basic"


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    match_info = request.match_info
    route_handler = getattr(match_info, "handler", None)
    needed = role_of(route_handler)
    if needed == _PUBLIC:
        await send_continue(request)
        return await handler(request)
    if needed == SELF_SERVICE:
        return await handler(request)
    ldap = request.app[CONFIG].auth.ldap
    if ldap is not None and ldap.basic_on_api and _is_basic(request):
        from .directory_login import basic_identity  # only with directory logins

        identity = await basic_identity(request)
        if isinstance(identity, web.StreamResponse):
            return identity
        result: KeyRecord | AuthFailure = identity
    else:
        result = await request.app[KEYRING].authenticate(request)
    if isinstance(result, AuthFailure):
        if result.key_id:
            request[REQUEST_KEY_ID] = result.key_id
        if result.status == 503:  # the key could not be checked: the store is away
            return json_error(503, result.message, {"Retry-After": "5"})
        return json_error(result.status, result.message, {"WWW-Authenticate": 'Bearer realm="llmfleet"'})
    if result.gateway:  # the fleet's gateway, acting for the caller it authenticated
        try:
            result = acting_for(result, request, request.app[CONFIG].auth.gateway_sources)
            request_id, request_ts = request_stamp(request)
        except GatewayRefusal as refusal:
            request[REQUEST_KEY_ID] = result.id
            detail = {"path": clip(request.path), "remote": clip(request.remote), "error": refusal.message}
            request.app[AUDIT].add(AuditRecord("gateway_refused", result.id, detail))
            return json_error(refusal.status, refusal.message)
        if request_id is not None:
            request[GATEWAY_REQUEST_ID] = request_id
        if request_ts is not None:
            request[GATEWAY_REQUEST_TS] = request_ts
    request[REQUEST_KEY] = result
    request[REQUEST_KEY_ID] = result.id
    http_exception = getattr(match_info, "http_exception", None)
    if http_exception is not None:  # unknown route or method: say so, now that we know who asks
        raise http_exception
    if not isinstance(needed, Role):
        return json_error(403, f"{request.method} {request.path} is not open to any role")
    if not result.role.allows(needed):
        method, path = clip(request.method), clip(request.path)
        detail = {"path": path, "method": method, "role": result.role.value}
        request.app[AUDIT].add(AuditRecord("forbidden", result.id, detail))
        return json_error(
            403, f"key {result.id} has role {result.role.value}; {method} {path} needs {needed.value}"
        )
    await send_continue(request)  # only now may the client send its body
    return await handler(request)
