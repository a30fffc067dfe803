"""`GET /agent/keys/me`: who the caller is to the agent (the key, the person behind it) and their budget,
what they used this UTC day and month fleet-wide and what is left (budgets.py)."""

from __future__ import annotations

from aiohttp import web

from .access_control import request_key, requires
from .appkeys import BUDGETS
from .directory_login import LOGIN_ID_PREFIX
from .frontend import request_user
from .roles import Role

routes = web.RouteTableDef()


@routes.get("/agent/keys/me")
@requires(Role.USER)
async def keys_me(request: web.Request) -> web.Response:
    key = request_key(request)
    user = request_user(key, request.headers)
    budgets = request.app.get(BUDGETS)
    budget = await budgets.status(user) if budgets is not None and user is not None else None
    # a directory login on the API (auth.ldap.basic_on_api) is not a key
    shown = None if key.id.startswith(LOGIN_ID_PREFIX) else key.public()
    return web.json_response({"key": shown, "user": user, "budget": budget})
