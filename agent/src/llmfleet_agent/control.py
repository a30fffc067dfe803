"""The agent's own routes: liveness, readiness, status, idle figures, drain and resume."""

from __future__ import annotations

import logging
import os
import time
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from . import __version__
from .access_control import public, request_key, requires
from .appkeys import ACTIVITY, AUDIT, CONFIG, METRICS, PROBES, STARTED_AT, SUPERVISOR, USAGE
from .gojson import BodyError, loads_object
from .http_errors import json_error
from .logs import event
from .metrics import CONTENT_TYPE
from .openapi import openapi_json
from .probes import gpu_missing
from .roles import Role
from .store import AuditRecord
from .supervisor import State

log = logging.getLogger("llmfleet.control")
routes = web.RouteTableDef()


def not_ready_reasons(app: web.Application) -> list[str]:
    """Why the host must not get traffic now; empty when it is ready."""
    supervisor = app[SUPERVISOR]
    reasons = []
    if supervisor.state is not State.RUNNING:
        reasons.append(f"ollama is {supervisor.state.value}: {supervisor.reason}")
    else:
        for model in supervisor.missing_models():
            pull = supervisor.pulls.get(model)
            if pull is None:
                reasons.append(f"model missing: {model}")
            elif pull.error:
                reasons.append(f"model missing: {model} (pull failed: {pull.error})")
            else:
                done = f" {100 * pull.completed // pull.total}%" if pull.total else ""
                reasons.append(f"model missing: {model} (pulling: {pull.status}{done})")
    if app[CONFIG].probes.require_gpu:
        missing = gpu_missing(app[PROBES].results)
        if missing:
            reasons.append(missing)
    if app[ACTIVITY].draining:
        reasons.append("draining")
    return reasons


@routes.get("/healthz")
@public
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
@public
async def readyz(request: web.Request) -> web.Response:
    reasons = not_ready_reasons(request.app)
    if reasons:
        return web.json_response({"ready": False, "reason": "; ".join(reasons)}, status=503)
    return web.json_response({"ready": True})


@routes.get("/agent/status")
@requires(Role.OPERATOR)
async def status(request: web.Request) -> web.Response:
    app = request.app
    cfg = app[CONFIG]
    reasons = not_ready_reasons(app)
    body: dict[str, Any] = {
        "agent": {
            "version": __version__,
            "pid": os.getpid(),
            "started_at": app[STARTED_AT],
            "uptime_seconds": round(time.time() - app[STARTED_AT], 3),
            "listen": f"{cfg.listen.host}:{cfg.listen.port}",
            "tls": cfg.listen.tls is not None,
        },
        "ready": {"ready": not reasons, "reasons": reasons},
        "ollama": app[SUPERVISOR].snapshot(),
        "idle": app[ACTIVITY].figures().as_dict(),
        "host": app[PROBES].snapshot(),
        "store": store_status(app),
    }
    return web.json_response(body)


def store_status(app: web.Application) -> dict[str, Any]:
    """The store's kind, whether it takes writes, and per kind of record what waits in memory and in the
    spool."""
    cfg = app[CONFIG]
    now = time.time()
    writers = {name: app[key].snapshot(now) for name, key in (("usage", USAGE), ("audit", AUDIT))}
    failing = [w["failing_since"] for w in writers.values() if w["failing_since"] is not None]
    kind = urlsplit(cfg.store.url).scheme
    return {
        "kind": "postgresql" if kind == "postgres" else kind,
        "last_write_ok": not failing,
        "failing_since": min(failing, default=None),
        "spool_dir": str(cfg.resolved_spool_dir),
        "spool_max_bytes": cfg.store.spool_max_bytes,
        **writers,
    }


@routes.get("/agent/idle")
@requires(Role.OPERATOR)
async def idle(request: web.Request) -> web.Response:
    return web.json_response(request.app[ACTIVITY].figures().as_dict())


async def _drain_threshold(request: web.Request) -> float | None:
    """`if_idle_for` from the optional JSON body; raises a 400 naming the field when it is bad."""
    if not request.can_read_body:
        return None
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        body = loads_object(raw)
    except BodyError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    unknown = sorted(set(body) - {"if_idle_for"})
    if unknown:
        raise web.HTTPBadRequest(text=f"unknown field(s): {', '.join(unknown)}")
    value = body.get("if_idle_for")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise web.HTTPBadRequest(text=f"if_idle_for must be a number of seconds >= 0 (got {value!r})")
    return float(value)


@routes.post("/agent/drain")
@requires(Role.OPERATOR)
async def drain(request: web.Request) -> web.Response:
    threshold = await _drain_threshold(request)
    # from here to the answer nothing awaits: the decision and the refusal of new work are one step
    drained, figures = request.app[ACTIVITY].drain(threshold)
    key = request_key(request)
    detail = {"if_idle_for": threshold, "drained": drained, **figures.as_dict()}
    request.app[AUDIT].add(AuditRecord("drain", key.id, detail))
    if not drained:
        why = (
            f"{figures.inflight} request(s) in flight"
            if figures.inflight
            else (f"idle for {figures.idle_seconds:.1f}s, less than {threshold:g}s")
        )
        return json_error(409, f"not drained: {why}", **figures.as_dict())
    event(log, logging.WARNING, "draining: new inference is refused", key_id=key.id, if_idle_for=threshold)
    return web.json_response(figures.as_dict())


@routes.post("/agent/resume")
@requires(Role.OPERATOR)
async def resume(request: web.Request) -> web.Response:
    figures = request.app[ACTIVITY].resume()
    key = request_key(request)
    request.app[AUDIT].add(AuditRecord("resume", key.id, {}))
    event(log, logging.INFO, "resumed: accepting inference again", key_id=key.id)
    return web.json_response(figures.as_dict())


@routes.get("/metrics")
@requires(Role.OPERATOR)
async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


@routes.get("/openapi.json")
@requires(Role.OPERATOR)
async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=openapi_json(request.app), content_type="application/json")
