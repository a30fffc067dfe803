"""Where the gateway sends a request: the model's ready hosts, the one with the fewest of the gateway's
requests first, the others after it (a host that refuses the connection makes way for the next). The
request goes with the gateway's key and the caller's identity (gateway_identity.py), so the host's agent
writes its one usage record; the gateway records only what it answers itself.

Its own routes: the fleet's model lists (the union of the ready hosts', cut to the caller's patterns),
`GET /gateway/status` (operator), `/healthz` and `/readyz`.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from ..access_control import public, request_key, requires
from ..control import healthz, metrics
from ..gateway_identity import KEY_ID, MODELS, REQUEST_ID, REQUEST_TS, ROLE, USER
from ..keys import model_matches
from ..proxy.handler import Exchange, Refused
from ..proxy.upstream import Forward, Target
from ..roles import Role
from .fleet import Fleet, Host
from .sweep import Sweeper
from .wake import Waker

routes = web.RouteTableDef()
FLEET = web.AppKey("fleet", Fleet)
WAKER = web.AppKey("waker", Waker)
SWEEPER = web.AppKey("sweeper", Sweeper)
RETRY_AFTER = "5"


class GatewayUpstream:
    def __init__(self, fleet: Fleet, key: str, waker: Waker | None = None) -> None:
        self._fleet = fleet
        self._key = key
        self._waker = waker

    def _target(self, host: Host, ex: Exchange, tried: list[Host]) -> Target:
        headers = {
            "Authorization": f"Bearer {self._key}",
            KEY_ID: ex.key.id,
            ROLE: ex.key.role.value,
            MODELS: json.dumps(list(ex.key.models)),
            REQUEST_ID: ex.request_id,
            REQUEST_TS: repr(ex.ts),
        }
        if ex.user:
            headers[USER] = ex.user

        def attempt() -> None:  # the host has one more of the gateway's requests until this one ends
            host.routed += 1
            tried.append(host)

        return Target(
            host.id,
            host.url,
            headers,
            records=True,
            on_attempt=attempt,
            on_connected=lambda: self._fleet.connected(host),
            on_failed=lambda error: self._fleet.failed(host, error),
        )

    async def forward(self, request: web.Request, ex: object, send: Forward) -> web.StreamResponse:
        assert isinstance(ex, Exchange)
        held = [False]  # a request is held for a wake at most once
        try:
            return await self._forward(ex, send, held)
        except Refused as refused:
            # every host refused the connection (nothing was sent): they may have just been stopped (the idle
            # sweep) while the fleet's last look saw them ready; look again, and wake one if none is left
            if refused.reason != "unreachable" or not ex.model or self._waker is None:
                raise
            await self._fleet.refresh()
            return await self._forward(ex, send, held)

    async def _forward(self, ex: Exchange, send: Forward, held: list[bool]) -> web.StreamResponse:
        usable, having = self._fleet.candidates(ex.model)
        if not usable and ex.model and having and self._waker is not None and not held[0]:
            held[0] = True
            await self._waker.hold(ex.model)  # a host with the model is ready now, or Refused
            usable, having = self._fleet.candidates(ex.model)
        if not usable:
            if ex.model and not having:
                raise Refused(404, f"model {ex.model!r}: no host of the fleet has it", reason="no_host")
            what = f"has {ex.model!r}" if ex.model else "is ready"
            raise Refused(503, f"no host that {what} is ready; retry later", {"Retry-After": RETRY_AFTER})
        tried: list[Host] = []
        try:
            return await send([self._target(h, ex, tried) for h in usable])
        finally:
            for host in tried:
                host.routed -= 1


def _union(fleet: Fleet, entries: str, name: str, patterns: tuple[str, ...]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    now = time.monotonic()
    for host in fleet.hosts.values():
        if not host.usable(now):
            continue
        for entry in getattr(host, entries):
            label = str(entry.get(name, ""))
            if label and label not in seen and model_matches(patterns, label):
                seen[label] = entry
    return [seen[k] for k in sorted(seen)]


@routes.get("/api/tags")
@requires(Role.USER)
async def fleet_tags(request: web.Request) -> web.Response:
    models = _union(request.app[FLEET], "tags", "name", request_key(request).models)
    return web.json_response({"models": models})


@routes.get("/v1/models")
@requires(Role.USER)
async def fleet_models(request: web.Request) -> web.Response:
    data = _union(request.app[FLEET], "openai_models", "id", request_key(request).models)
    return web.json_response({"object": "list", "data": data})


@routes.get("/gateway/status")
@requires(Role.OPERATOR)
async def gateway_status(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    now = time.monotonic()
    return web.json_response(
        {
            "refreshed_at": fleet.refreshed_at,
            "discovery_error": fleet.last_error,
            "hosts": [h.snapshot(now) for h in sorted(fleet.hosts.values(), key=lambda h: h.id)],
            "wakes": request.app[WAKER].status() if WAKER in request.app else [],
            "sweep": request.app[SWEEPER].status() if SWEEPER in request.app else None,
        }
    )


routes.get("/metrics")(metrics)  # the agent's own (operator)
routes.get("/healthz")(healthz)  # the agent's own liveness answer


@routes.get("/readyz")
@public
async def readyz(request: web.Request) -> web.Response:
    """Ready once the fleet was looked at; a fleet with no ready host is still a gateway that answers (503
    per request, naming the model): a load balancer must not take every gateway out for it."""
    fleet = request.app[FLEET]
    if fleet.refreshed_at is None:
        return web.json_response(
            {"ready": False, "reason": "the fleet has not been looked at yet"}, status=503
        )
    ready = sum(1 for h in fleet.hosts.values() if h.usable(time.monotonic()))
    return web.json_response({"ready": True, "hosts_ready": ready, "hosts": len(fleet.hosts)})
