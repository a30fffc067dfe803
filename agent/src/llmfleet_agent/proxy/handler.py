"""Forwarding one request to Ollama: checks, then a byte-for-byte stream in both directions, then a record.

Order of checks, none of which awaits between the admission steps: body (413, 400) -> model rights (403)
-> Ollama RUNNING (503) -> per-key limits (429) -> draining (503). Only then is the request in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from ..access_control import request_key, requires
from ..appkeys import ACTIVITY, AUDIT, CONFIG, LIMITER, METRICS, SESSION, SUPERVISOR, USAGE
from ..http_errors import Handler, json_error
from ..keys import KeyRecord, model_matches
from ..logs import event
from ..models import normalize_model
from ..store import AuditRecord
from ..supervisor import State
from ..usage import UsageRecord
from .observe import Counts, Observer, PassThrough, observer_for
from .routes import Filter, Kind, RouteSpec

log = logging.getLogger("llmfleet.proxy")

# never forwarded upstream: hop-by-hop headers, the client's credential, what aiohttp sets itself
_DROP_REQUEST = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "authorization",
        "expect",
    }
)
_DROP_RESPONSE = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "date",
        "server",
    }
)
_STREAM_ERRORS = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError)


@dataclass
class Exchange:
    """One proxied request, from admission to its usage record."""

    spec: RouteSpec
    key: KeyRecord
    request_id: str = field(default_factory=lambda: os.urandom(8).hex())
    ts: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None
    stream: bool = False
    status: int = 0
    ttfb: float | None = None
    counts: Counts = field(default_factory=Counts)
    error: str | None = None
    models: list[str] = field(default_factory=list)  # every model the request names
    strip_usage: bool = False  # the proxy asked for a usage chunk the client did not ask for
    recorded: bool = False


def make_handler(spec: RouteSpec) -> Handler:
    @requires(spec.role)
    async def handler(request: web.Request) -> web.StreamResponse:
        return await proxy(request, Exchange(spec, request_key(request)))

    handler.__name__ = f"proxy {spec.method} {spec.path}"
    return handler


def add_proxy_routes(app: web.Application, specs: tuple[RouteSpec, ...]) -> None:
    for spec in specs:
        app.router.add_route(spec.method, spec.path, make_handler(spec))


# ----- the request ------------------------------------------------------------------
async def proxy(request: web.Request, ex: Exchange) -> web.StreamResponse:
    app = request.app
    try:
        body, refusal = await _read_body(request, ex)
        if refusal is not None:
            return _refuse(request, ex, *refusal)
        refusal = _check_rights(request, ex)
        if refusal is not None:
            return _refuse(request, ex, *refusal)
        return await _admit_and_forward(request, ex, body)
    except asyncio.CancelledError:
        ex.status, ex.error = 499, "client disconnected"
        raise
    finally:
        if ex.status:
            _record(app, ex)  # once: a no-op when the stream already recorded it


async def _read_body(request: web.Request, ex: Exchange) -> tuple[bytes | None, tuple[int, str] | None]:
    spec = ex.spec
    if not spec.json_body:
        return None, None
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].limits.max_body_bytes
        return None, (413, f"request body too large (limit {limit} bytes)")
    try:
        payload = json.loads(raw) if raw else None
    except ValueError as exc:
        return None, (400, f"request body is not valid JSON: {exc}")
    if not isinstance(payload, dict):
        return None, (400, "request body must be a JSON object")
    named = [payload[f] for f in spec.model_fields if f in payload]
    for name in named:
        if not isinstance(name, str) or not name:
            return None, (400, f"model name must be a non-empty string (got {name!r})")
    if spec.model_required and not named:
        return None, (400, f"missing field: {spec.model_fields[0]}")
    ex.model = named[0] if named else None
    ex.models = named
    if spec.kind is Kind.INFERENCE:
        ex.stream = bool(payload.get("stream", not spec.openai)) and not spec.path.endswith(
            ("embed", "embeddings")
        )
    if spec.openai and ex.stream and not (payload.get("stream_options") or {}).get("include_usage"):
        # ask Ollama for the usage chunk; the observer keeps it from the client, who did not ask for it
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        ex.strip_usage = True
        return json.dumps(payload).encode(), None
    return raw, None


def _check_rights(request: web.Request, ex: Exchange) -> tuple[int, str] | None:
    if "model" in request.match_info:
        ex.model = request.match_info["model"]
        ex.models = [ex.model]
    for name in ex.models:
        if not model_matches(ex.key.models, name):
            return 403, f"key {ex.key.id} may not use model {name!r}"
    return None


async def _admit_and_forward(request: web.Request, ex: Exchange, body: bytes | None) -> web.StreamResponse:
    app = request.app
    cfg = app[CONFIG]
    supervisor = app[SUPERVISOR]
    retry = {"Retry-After": str(math.ceil(cfg.proxy.retry_after))}
    if supervisor.state is not State.RUNNING:
        return _refuse(request, ex, 503, f"ollama is {supervisor.state.value}: {supervisor.reason}", retry)
    limiter = app[LIMITER]
    refusal = limiter.acquire(ex.key.id, ex.key.max_concurrent, ex.key.rpm)
    if refusal is not None:
        headers = {"Retry-After": str(max(1, math.ceil(refusal.retry_after)))}
        return _refuse(request, ex, 429, refusal.message, headers, reason="rate_limited")
    activity = app[ACTIVITY]
    if not activity.try_begin():
        limiter.release(ex.key.id)
        return _refuse(
            request, ex, 503, "draining: this host is about to stop; retry later", retry, reason="draining"
        )
    try:
        return await _forward(request, ex, body)
    finally:
        activity.end()
        limiter.release(ex.key.id)


def _refuse(
    request: web.Request,
    ex: Exchange,
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    reason: str | None = None,
) -> web.Response:
    ex.status, ex.error = status, message
    request.app[METRICS].refusals.labels(reason or str(status)).inc()
    return json_error(status, message, {**(headers or {}), "X-Request-Id": ex.request_id})


# ----- forwarding ------------------------------------------------------------------
def _upstream_headers(request: web.Request) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST)


async def _forward(request: web.Request, ex: Exchange, body: bytes | None) -> web.StreamResponse:
    app = request.app
    cfg = app[CONFIG].proxy
    url = app[SUPERVISOR].base_url + request.rel_url.raw_path_qs
    data: Any = body if ex.spec.json_body else (request.content if ex.spec.streams_body else None)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout, sock_read=cfg.read_timeout)
    try:
        upstream_cm = app[SESSION].request(
            request.method,
            url,
            data=data,
            headers=_upstream_headers(request),
            timeout=timeout,
            allow_redirects=False,
        )
        async with upstream_cm as upstream:
            if ex.spec.filter is not Filter.NONE and ex.key.models and upstream.status == 200:
                return await _filtered(request, ex, upstream)
            return await _stream(request, ex, upstream)
    except aiohttp.ClientConnectorError as exc:
        return _refuse(
            request,
            ex,
            503,
            f"ollama is not reachable: {exc.os_error}",
            {"Retry-After": str(math.ceil(cfg.retry_after))},
            reason="unreachable",
        )
    except asyncio.TimeoutError:
        if ex.status:  # the answer had started: _stream recorded it
            raise
        return _refuse(
            request, ex, 504, f"ollama did not answer within {cfg.read_timeout:g}s", reason="timeout"
        )


async def _stream(request: web.Request, ex: Exchange, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    content_type = upstream.headers.get("Content-Type", "")
    observer: Observer = (
        observer_for(content_type, ex.spec.openai, ex.strip_usage)
        if ex.spec.kind is Kind.INFERENCE
        else PassThrough()
    )
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    for name, value in upstream.headers.items():
        if name.lower() not in _DROP_RESPONSE:
            response.headers.add(name, value)
    response.headers["X-Request-Id"] = ex.request_id
    if upstream.content_length is not None and not ex.strip_usage:
        response.content_length = upstream.content_length
    ex.status = upstream.status
    await response.prepare(request)
    if request.method == "HEAD":
        ex.ttfb = time.perf_counter()
        return response
    try:
        async for chunk in upstream.content.iter_any():
            if ex.ttfb is None:
                ex.ttfb = time.perf_counter()
            out = observer.feed(chunk)
            if out:
                await response.write(out)
        tail = observer.finish()
        if tail:
            await response.write(tail)
    except _STREAM_ERRORS as exc:
        # Ollama died or stalled mid-answer: tell the client in the stream's own framing
        upstream.close()
        ex.error = f"ollama stopped mid-answer: {type(exc).__name__}: {exc}"
        ex.status = 502
        event(log, logging.WARNING, "ollama failed mid-answer", request_id=ex.request_id, error=ex.error)
        await response.write(_error_tail(content_type, ex.error))
    except (ConnectionResetError, asyncio.CancelledError):
        upstream.close()  # the client went away: closing the upstream connection stops the generation
        ex.status, ex.error = 499, "client disconnected"
        raise
    ex.counts = observer.counts
    if ex.counts.error and ex.error is None:
        ex.error = ex.counts.error
    _record(request.app, ex)  # before the end reaches the client: a stop right after loses nothing
    await response.write_eof()
    return response


def _error_tail(content_type: str, message: str) -> bytes:
    if content_type.startswith("text/event-stream"):
        body = {"error": {"message": message, "type": "server_error", "code": 502}}
        return b"data: " + json.dumps(body).encode() + b"\n\n"
    return json.dumps({"error": message}).encode() + b"\n"


async def _filtered(request: web.Request, ex: Exchange, upstream: aiohttp.ClientResponse) -> web.Response:
    """A model list, cut down to the models the key may use."""
    body = await upstream.json(content_type=None)
    ex.ttfb = time.perf_counter()
    patterns = ex.key.models
    if ex.spec.filter is Filter.TAGS:
        body["models"] = [m for m in body.get("models", []) if model_matches(patterns, m.get("name", ""))]
    else:
        body["data"] = [m for m in body.get("data", []) if model_matches(patterns, m.get("id", ""))]
    ex.status = upstream.status
    return web.json_response(body, status=upstream.status, headers={"X-Request-Id": ex.request_id})


# ----- the record ------------------------------------------------------------------
def _record(app: web.Application, ex: Exchange) -> None:
    if ex.recorded:
        return
    ex.recorded = True
    now = time.perf_counter()
    duration = now - ex.started
    ttfb = None if ex.ttfb is None else ex.ttfb - ex.started
    model = normalize_model(ex.model) if ex.model else None
    record = UsageRecord(
        ts=ex.ts,
        request_id=ex.request_id,
        key_id=ex.key.id,
        method=ex.spec.method,
        route=ex.spec.path,
        model=model,
        status=ex.status,
        stream=ex.stream,
        prompt_tokens=ex.counts.prompt_tokens,
        completion_tokens=ex.counts.completion_tokens,
        ttfb_ms=None if ttfb is None else round(ttfb * 1000, 3),
        duration_ms=round(duration * 1000, 3),
        error=ex.error,
    )
    app[USAGE].add(record)
    metrics = app[METRICS]
    model_label = model if model and ex.status < 400 else "-"
    metrics.requests.labels(ex.spec.path, model_label, str(ex.status)).inc()
    metrics.duration.labels(ex.spec.path).observe(duration)
    if ttfb is not None:
        metrics.ttfb.labels(ex.spec.path).observe(ttfb)
    if ex.counts.prompt_tokens:
        metrics.prompt_tokens.labels(model_label).inc(ex.counts.prompt_tokens)
    if ex.counts.completion_tokens:
        metrics.completion_tokens.labels(model_label).inc(ex.counts.completion_tokens)
    if ex.spec.audit:
        detail = {"model": model, "status": ex.status, "error": ex.error, "request_id": ex.request_id}
        app[AUDIT].add(AuditRecord(ex.spec.audit, ex.key.id, detail))
