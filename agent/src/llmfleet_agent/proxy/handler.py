"""Forwarding one request to Ollama: checks, then a byte-for-byte stream in both directions, then a record.

Order of checks: per-key limits (429, counted from the moment the key is known) -> the person's budget
(429, inference only: budgets.py) -> body (408, 413, 400)
-> model rights (403) -> Ollama RUNNING, agent stopping, draining (503, reads excepted; nothing awaits
between these and the forwarding). Only then is the request in flight (reads never count as in flight:
`Kind.counts_as_use`). Every outcome, refusals included, leaves one usage record; a failure writing to
the client is the client's (499), one reading from Ollama is Ollama's (502, 504 when it stalls past
`proxy.read_timeout`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..access_control import GATEWAY_REQUEST_ID, GATEWAY_REQUEST_TS, request_key, requires
from ..appkeys import (
    ACTIVITY,
    AUDIT,
    BUDGETS,
    CONFIG,
    GATE,
    HOST_ID,
    KNOWN_MODELS,
    LIMITER,
    METRICS,
    SUPERVISOR,
    UPSTREAM,
    UPSTREAM_CLIENT,
    USAGE,
)
from ..frontend import MAX_USER, USER_HEADERS, request_user
from ..gojson import BodyError, GoObject, loads_object
from ..http_errors import Handler, defer_expect, json_error
from ..keys import KeyRecord, model_matches
from ..logs import clip, event
from ..modelfile import models_named
from ..models import InvalidName, parse_name, recorded_model
from ..store import AuditRecord
from ..supervisor import State
from ..usage import UsageRecord
from . import http1
from .gate import SHUTTING_DOWN
from .observe import Counts, Observer, PassThrough, observer_for
from .routes import Filter, Kind, RouteSpec
from .upstream import Target

log = logging.getLogger("llmfleet.proxy")

# never forwarded upstream: hop-by-hop headers, the client's credential, what the client sets itself
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
        # the gateway's identity headers (gateway_identity.py) are for the agent only
        "x-llmfleet-key-id",
        "x-llmfleet-role",
        "x-llmfleet-models",
        "x-llmfleet-user",
        "x-llmfleet-request-id",
        "expect",
        "content-encoding",  # aiohttp has decoded the body: what is forwarded is plain
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
# reading from Ollama failed (writing to the client is wrapped apart: see _send)
_UPSTREAM_ERRORS = (http1.UpstreamError, asyncio.TimeoutError)
_UPSTREAM_TEXT = 4096  # how much of a plain-text error from Ollama is read
# an agent's refusal because its host is being stopped (draining, or shutting down), which took nothing:
# the gateway sends the request elsewhere (gateway/routing.py)
REFUSED_HEADER = "X-Llmfleet-Refused"


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
    body_timed_out: bool = False  # a streamed request body (blob) stalled past limits.body_timeout
    cut: list[str] = field(default_factory=list)  # set by the gate when the agent ends the request
    recorded: bool = False
    user: str | None = None  # the person behind the request (frontend.py)
    target: Target | None = None  # where it was sent
    # the target answered it as its own request (its X-Request-Id is ours): it wrote the record
    recorded_upstream: bool = False
    budgeted: bool = False  # admitted by the person's budget: released when it ends
    body_size: int = 0


class Refused(Exception):
    """The request is answered with an error before (or instead of) reaching Ollama."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.reason = reason
        self.close = close  # the connection cannot be reused (an unread body)


ROUTE_SPEC = "llmfleet_route_spec"


class _ClientGone(Exception):
    """Writing to the client failed: it went away."""


def make_handler(spec: RouteSpec) -> Handler:
    @requires(spec.role)
    async def handler(request: web.Request) -> web.StreamResponse:
        key = request_key(request)
        ex = Exchange(spec, key, user=request_user(key, request.headers))
        if GATEWAY_REQUEST_ID in request:  # forwarded by the gateway: its id and time of the request
            ex.request_id = request[GATEWAY_REQUEST_ID]
        if GATEWAY_REQUEST_TS in request:
            ex.ts = request[GATEWAY_REQUEST_TS]
        return await proxy(request, ex)

    handler.__name__ = f"proxy {spec.method} {spec.path}"
    setattr(handler, ROUTE_SPEC, spec)  # what the OpenAPI document describes
    return handler


def add_proxy_routes(app: web.Application, specs: tuple[RouteSpec, ...]) -> None:
    for spec in specs:
        app.router.add_route(spec.method, spec.path, make_handler(spec), expect_handler=defer_expect)


# ----- the request ------------------------------------------------------------------
async def proxy(request: web.Request, ex: Exchange) -> web.StreamResponse:
    app = request.app
    limiter = app[LIMITER]
    admitted = False
    try:
        refusal = limiter.acquire(ex.key.id, ex.key.max_concurrent, ex.key.rpm)
        if refusal is not None:
            headers = {"Retry-After": str(max(1, math.ceil(refusal.retry_after)))}
            raise Refused(429, refusal.message, headers, reason="rate_limited")
        admitted = True
        await _check_budget(request, ex)
        body = await _read_body(request, ex)
        ex.body_size = len(body or b"")
        _check_rights(request, ex)
        return await _admit_and_forward(request, ex, body)
    except Refused as refused:
        return _refuse(request, ex, refused)
    except asyncio.CancelledError:
        if not ex.status:
            ex.status, ex.error = 499, "client disconnected"
        raise
    finally:
        if admitted:
            limiter.release(ex.key.id)
        if ex.budgeted and ex.user is not None:
            app[BUDGETS].release(ex.user)
        if ex.status:
            _record(app, ex)  # once: a no-op when the stream already recorded it


async def _check_budget(request: web.Request, ex: Exchange) -> None:
    budgets = request.app.get(BUDGETS)
    if budgets is None or ex.spec.kind is not Kind.INFERENCE:
        return
    if ex.user is None:
        if ex.key.frontend:  # budgets are per person: a frontend must say whose request it is
            names = ", ".join(USER_HEADERS)
            raise Refused(
                400,
                f"a frontend key's request must name its user ({names}; printable, at most"
                f" {MAX_USER} characters): budgets apply per person",
            )
        return
    overrun = await budgets.admit(ex.user)
    if overrun is not None:
        headers = {"Retry-After": str(max(1, math.ceil(overrun.retry_after)))}
        raise Refused(429, overrun.message, headers, reason="over_budget")
    ex.budgeted = True


async def _read_body(request: web.Request, ex: Exchange) -> bytes | None:
    spec = ex.spec
    if not spec.json_body:
        return None
    limits = request.app[CONFIG].limits
    try:
        if request.content.is_eof():  # all there already (most bodies): no timer needed
            raw = await request.read()
        else:
            raw = await asyncio.wait_for(request.read(), limits.body_timeout)
    except web.HTTPRequestEntityTooLarge:
        message = f"request body too large (limit {limits.max_body_bytes} bytes)"
        raise Refused(413, message, close=True) from None
    except asyncio.TimeoutError:
        message = f"request body not received within {limits.body_timeout:g}s"
        raise Refused(408, message, reason="body_timeout", close=True) from None
    except ConnectionError:
        raise Refused(499, "client disconnected while sending the body", close=True) from None
    except HttpProcessingError as exc:  # the body's framing (chunks, length) was wrong
        raise Refused(400, f"bad request body: {clip(exc.message)}", close=True) from None
    try:
        payload = loads_object(raw)
    except BodyError as exc:
        raise Refused(400, str(exc)) from None
    return _read_fields(ex, payload, raw)


def _preview(value: Any) -> str:
    return clip(repr(value)) or ""


def _once(payload: GoObject, name: str) -> Any:
    """A field the agent decides on: refused when the body names it twice (as Ollama would take the last)."""
    if payload.count(name) > 1:
        raise Refused(
            400,
            f"field {name!r} appears {payload.count(name)} times (Ollama matches keys without regard to "
            "case and takes the last one): send it once",
        )
    return payload.get(name)


def _flag(obj: GoObject, name: str, default: bool) -> bool:
    value = obj.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise Refused(400, f"{name} must be true or false (got {_preview(value)})")
    return value


def _model_names(payload: GoObject, spec: RouteSpec) -> list[str]:
    """Every model the body names, in the order of spec.model_fields, then the Modelfile's FROM lines."""
    names = []
    for name in spec.model_fields:
        value = _once(payload, name)
        if value is None or value == "":  # Ollama treats an empty name as no name
            continue
        if not isinstance(value, str):
            raise Refused(400, f"{name} must be a model name, a string (got {_preview(value)})")
        names.append(value)
    if spec.modelfile:
        text = _once(payload, "modelfile")
        if text is not None:
            if not isinstance(text, str):
                raise Refused(400, f"modelfile must be a string (got {_preview(text)})")
            names.extend(models_named(text))
    return names


# create's sources other than a model: blobs by digest (which may be the layers of any model on the host,
# digests of registry models are public) and a remote host to proxy to; none is open to a model-limited key
_BLOB_SOURCES = ("files", "adapters", "draft_files", "remote_host")


def _check_blob_sources(ex: Exchange, payload: GoObject) -> None:
    for name in _BLOB_SOURCES:
        if payload.get(name):
            raise Refused(
                403,
                f"key {ex.key.id} is limited to model patterns: it may create a model only from a model "
                f"it may use, not from {name}",
            )


def _read_fields(ex: Exchange, payload: GoObject, raw: bytes) -> bytes:
    """Check and read the fields the agent decides on; the body to forward."""
    spec = ex.spec
    names = _model_names(payload, spec)
    if spec.model_required and not names:
        raise Refused(400, f"missing field: {spec.model_fields[0]}")
    ex.models = names
    if spec.modelfile and ex.key.models:
        _check_blob_sources(ex, payload)
    ex.model = next((payload.get(f) for f in spec.model_fields if payload.get(f)), None)
    if spec.kind is not Kind.INFERENCE:
        return raw
    streams = not spec.path.endswith(("embed", "embeddings"))
    ex.stream = _flag(payload, "stream", not spec.openai) and streams
    if not (spec.openai and ex.stream):
        return raw
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, GoObject):
        raise Refused(400, f"stream_options must be an object (got {_preview(options)})")
    if options is not None and _flag(options, "include_usage", False):
        return raw
    # ask Ollama for the usage chunk; the observer keeps it from the client, who did not ask for it. The
    # body is not rebuilt (that could change what Go reads of repeated keys): the field is added at its
    # end, and of a field given twice Go takes the last.
    ex.strip_usage = True
    return _with_last_field(raw, b'"stream_options":{"include_usage":true}')


def _with_last_field(raw: bytes, member: bytes) -> bytes:
    """The JSON object `raw` (parsed already) with `member` added as its last member."""
    head = raw.rstrip()[:-1].rstrip()  # without the closing brace
    return head + (b"" if head.endswith(b"{") else b",") + member + b"}"


def _check_path(request: web.Request) -> None:
    """A path parameter is one plain segment: no dot segment (Ollama's router would resolve it to another
    path) and no control character."""
    for name, value in request.match_info.items():
        if value in (".", "..") or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            raise Refused(400, f"invalid {name} in the path: {_preview(value)}")


def _check_rights(request: web.Request, ex: Exchange) -> None:
    _check_path(request)
    if "model" in request.match_info:
        ex.model = request.match_info["model"]
        ex.models = [ex.model]
    if not ex.key.models:
        return  # an unlimited key: Ollama alone judges the names
    for name in ex.models:
        try:
            parse_name(name)
        except InvalidName:  # a name outside Ollama's grammar is refused, never matched loosely
            raise Refused(400, f"invalid model name {_preview(name)}") from None
        if not model_matches(ex.key.models, name):
            raise Refused(403, f"key {ex.key.id} may not use model {_preview(name)}")


async def _admit_and_forward(request: web.Request, ex: Exchange, body: bytes | None) -> web.StreamResponse:
    app = request.app
    upstream = app.get(UPSTREAM)
    if upstream is not None:  # the gateway: a host of the fleet answers (gateway/routing.py)
        return await upstream.forward(request, ex, lambda targets: _forward(request, ex, body, targets))
    cfg = app[CONFIG]
    supervisor = app[SUPERVISOR]
    gate = app[GATE]
    retry = {"Retry-After": str(math.ceil(cfg.proxy.retry_after))}
    if supervisor.state is not State.RUNNING:
        raise Refused(503, f"ollama is {supervisor.state.value}: {supervisor.reason}", retry)
    cut = gate.enter()
    if cut is None:
        refused = {**retry, REFUSED_HEADER: "stopping"}
        raise Refused(503, f"{SHUTTING_DOWN}; retry on another host", refused, reason="stopping")
    activity = app[ACTIVITY]
    use = ex.spec.kind.counts_as_use  # reads neither keep the host awake nor are refused while draining
    if use and not activity.try_begin():
        gate.leave()
        refused = {**retry, REFUSED_HEADER: "draining"}
        raise Refused(503, "draining: this host is about to stop; retry later", refused, reason="draining")
    ex.cut = cut
    try:
        return await _forward(request, ex, body, [Target("ollama", supervisor.base_url)])
    finally:
        if use:
            activity.end()
        gate.leave()


def _refuse(request: web.Request, ex: Exchange, refused: Refused) -> web.Response:
    ex.status, ex.error = refused.status, refused.message
    request.app[METRICS].count_refusal(refused.reason or str(refused.status))
    headers = {**refused.headers, "X-Request-Id": ex.request_id}
    if REFUSED_HEADER in refused.headers and GATEWAY_REQUEST_ID in request:
        # a host being stopped refuses the gateway's request before any work: the gateway sends it to another
        # host (or wakes this one again) and that host's answer is the request's one record, not this refusal
        ex.recorded = True
        del headers["X-Request-Id"]
    response = json_error(refused.status, refused.message, headers)
    if refused.close:
        response.force_close()
    return response


def _uncancel() -> None:
    """The cancellation was the gate's cut, handled here: the task goes on to write its last line."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()


# ----- forwarding ------------------------------------------------------------------
def _upstream_headers(request: web.Request, target: Target) -> list[tuple[str, str]]:
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST]
    if target.headers:  # the target's own replace the client's of the same names
        names = {name.lower() for name in target.headers}
        headers = [(k, v) for k, v in headers if k.lower() not in names]
        headers.extend(target.headers.items())
    return headers


async def _paced(request: web.Request, ex: Exchange) -> AsyncIterator[bytes]:
    """A streamed request body (a blob), each piece awaited at most limits.body_timeout."""
    timeout = request.app[CONFIG].limits.body_timeout
    while True:
        try:
            chunk = await asyncio.wait_for(request.content.readany(), timeout)
        except asyncio.TimeoutError:
            ex.body_timed_out = True
            raise
        if not chunk:
            return
        yield chunk


async def _forward(
    request: web.Request, ex: Exchange, body: bytes | None, targets: list[Target]
) -> web.StreamResponse:
    """Send the request to the first target that takes the connection (a connection refused before a byte
    was sent tries the next), and stream its answer back."""
    app = request.app
    cfg = app[CONFIG].proxy
    data: http1.Body = body if ex.spec.json_body else (_paced(request, ex) if ex.spec.streams_body else None)
    client = app[UPSTREAM_CLIENT]
    for index, target in enumerate(targets):
        headers = _upstream_headers(request, target)
        ex.target = target
        target.attempt()
        try:
            upstream = await client.request(
                request.method, target.base_url, request.rel_url.raw_path_qs, headers, data
            )
            async with upstream:
                if target.records and upstream.status == 503 and upstream.headers.get(REFUSED_HEADER):
                    # a host of the fleet being stopped took nothing: as with a refused connection, the
                    # next host (or, after the gateway's look again, a wake) takes the request
                    if index + 1 < len(targets):
                        continue
                    retry = {"Retry-After": str(math.ceil(cfg.retry_after))}
                    message = "no host with the model answered; retry later"
                    raise Refused(503, message, retry, reason="unreachable")
                target.connected()
                ex.recorded_upstream = (
                    target.records and upstream.headers.get("X-Request-Id") == ex.request_id
                )
                if ex.spec.filter is not Filter.NONE and ex.key.models and upstream.status == 200:
                    return await _filtered(request, ex, upstream)
                return await _stream(request, ex, upstream)
        except asyncio.CancelledError:
            if not ex.cut or ex.status:
                raise
            _uncancel()  # cut by the gate while Ollama had not answered yet
            raise Refused(503, f"{SHUTTING_DOWN}; retry on another host", reason="stopping") from None
        except http1.ConnectError as exc:  # nothing was sent: the next target may take it
            # the only failure that counts against a host: a slow answer is no fault of the host's
            target.failed(str(exc.os_error))
            if index + 1 < len(targets):
                continue
            retry = {"Retry-After": str(math.ceil(cfg.retry_after))}
            if target.records:  # hosts of the fleet: their names and addresses are the operators' (logs)
                tried = [t.name for t in targets]
                event(
                    log,
                    logging.WARNING,
                    "no host took the request",
                    request_id=ex.request_id,
                    tried=tried,
                    error=str(exc.os_error),
                )
                message = "no host with the model answered; retry later"
            else:
                message = f"{target.name} is not reachable: {exc.os_error}"
            raise Refused(503, message, retry, reason="unreachable") from None
        except _UPSTREAM_ERRORS as exc:
            if ex.status:  # the answer had started: _stream recorded it
                raise
            if ex.body_timed_out:
                limit = app[CONFIG].limits.body_timeout
                message = f"request body stalled: nothing received for {limit:g}s"
                raise Refused(408, message, reason="body_timeout", close=True) from None
            if isinstance(exc, asyncio.TimeoutError):
                message = f"{target.name} did not answer within {cfg.read_timeout:g}s"
                raise Refused(504, message, reason="timeout") from None
            message = f"{target.name} failed before answering: {type(exc).__name__}: {exc}"
            event(
                log,
                logging.WARNING,
                "upstream failed before answering",
                request_id=ex.request_id,
                error=message,
            )
            raise Refused(502, message, reason="upstream_failed") from None
    raise Refused(503, "no host to send the request to", {"Retry-After": str(math.ceil(cfg.retry_after))})


class Answer(web.StreamResponse):
    """The upstream's answer passed on. Its head goes out with its first bytes, in one write (as a Response
    does): a reader woken once, not twice, and a write less. Nothing waits on it: the upstream's head and
    first bytes come together (Ollama sends its head with its first flush), and an answer without a body
    sends its head at its end."""

    _send_headers_immediately = False


async def _send(response: web.StreamResponse, data: bytes, *, end: bool = False) -> None:
    """Write to the client (with the answer's end: `end`); _ClientGone when it went away (never confused
    with Ollama's errors)."""
    try:
        await (response.write_eof(data) if end else response.write(data))
    except ConnectionError as exc:  # aiohttp's ClientConnectionResetError is a ConnectionResetError
        raise _ClientGone from exc


async def _stream(request: web.Request, ex: Exchange, upstream: http1.Response) -> web.StreamResponse:
    content_type = upstream.headers.get("Content-Type", "")
    if upstream.status >= 400 and not content_type.startswith(("application/json", "text/event-stream")):
        return await _json_error_of(request, ex, upstream)
    observer: Observer = (
        observer_for(content_type, ex.spec.openai, ex.strip_usage)
        if ex.spec.kind is Kind.INFERENCE
        else PassThrough()
    )
    ex.counts = observer.counts  # filled as the answer streams: a cut answer is charged what it gave
    response = Answer(status=upstream.status, reason=upstream.reason)
    for name, value in upstream.headers.items():
        if name.lower() not in _DROP_RESPONSE:
            response.headers.add(name, value)
    response.headers["X-Request-Id"] = ex.request_id
    if upstream.content_length is not None and not ex.strip_usage:
        response.content_length = upstream.content_length
    ex.status = upstream.status
    await response.prepare(request)  # writes nothing yet: the head goes with the first bytes
    if request.method == "HEAD":
        ex.ttfb = time.perf_counter()
        return response
    ending = False  # the last bytes and the end are being written
    try:
        last = b""
        while chunk := await upstream.next_chunk():
            if ex.ttfb is None:
                ex.ttfb = time.perf_counter()
            out = observer.feed(chunk)
            if upstream.ended:  # the answer's last bytes: they go with its end, in one write
                last = out
                break
            if out:
                await _send(response, out)
        if observer.holds_back:
            last += observer.finish()
        ending = True
        try:
            await _send(response, last, end=True)
        finally:  # the whole answer went by: its counts, also when the client or the gate cut this write
            _settle(ex, observer)
    except _ClientGone:
        return _client_gone(request, ex, upstream, response)
    except asyncio.CancelledError:
        upstream.close()  # closing the upstream connection stops the generation
        if not ex.cut:
            ex.status, ex.error = 499, "client disconnected"
            raise
        _uncancel()
        if not ending:  # else the whole answer is on its way: it is recorded as answered (proxy)
            await _end_with_error(request, ex, response, content_type, 503, SHUTTING_DOWN)
        return response
    except _UPSTREAM_ERRORS as exc:
        # Ollama died or stalled mid-answer: tell the client in the stream's own framing
        upstream.close()
        message = f"ollama stopped mid-answer: {type(exc).__name__}: {exc}"
        event(log, logging.WARNING, "ollama failed mid-answer", request_id=ex.request_id, error=message)
        await _end_with_error(request, ex, response, content_type, 502, message)
        return response
    # in the same step of the event loop as the end's write (a write that does not wait returns at once):
    # a stop right after the client has the end finds the record made. A host of the fleet that recorded
    # it leaves the gateway only its metrics: they are counted by proxy() once the request is done.
    if not ex.recorded_upstream:
        _record(request.app, ex)
    return response


def _settle(ex: Exchange, observer: Observer) -> None:
    """The counts of a whole answer. Read after its end went out, unless the observer holds bytes back: the
    client does not wait for them."""
    observer.finish()
    if ex.counts.error and ex.error is None:
        ex.error = ex.counts.error


async def _json_error_of(request: web.Request, ex: Exchange, upstream: http1.Response) -> web.StreamResponse:
    """An error Ollama answered in plain text (its router's `404 page not found`), as every error: JSON."""
    text = (await upstream.read(_UPSTREAM_TEXT)).decode(errors="replace").strip()
    upstream.close()
    ex.ttfb = time.perf_counter()
    ex.status, ex.error = upstream.status, clip(text) or upstream.reason or str(upstream.status)
    if request.method == "HEAD":
        return web.Response(status=upstream.status, headers={"X-Request-Id": ex.request_id})
    return json_error(ex.status, ex.error, {"X-Request-Id": ex.request_id})


def _client_gone(
    request: web.Request, ex: Exchange, upstream: http1.Response, response: web.StreamResponse
) -> web.StreamResponse:
    upstream.close()  # closing the upstream connection stops the generation
    ex.status, ex.error = 499, "client disconnected"
    _record(request.app, ex)
    return response


async def _end_with_error(
    request: web.Request,
    ex: Exchange,
    response: web.StreamResponse,
    content_type: str,
    status: int,
    message: str,
) -> None:
    """End a started answer with an error in its own framing, and record it with that status."""
    ex.status, ex.error = status, message
    _record(request.app, ex)
    if response.content_length is not None:
        # a declared length has no room for an error line: the answer ends short and the connection
        # closes, which every client reads as a failed answer (not as a whole one, nor one to wait for)
        response.force_close()
        return
    try:
        await _send(response, _error_tail(content_type, message, status))
        await response.write_eof()
    except (_ClientGone, ConnectionError):
        pass  # the client is gone too; the record says what happened first


def _error_tail(content_type: str, message: str, status: int) -> bytes:
    if content_type.startswith("text/event-stream"):
        body = {"error": {"message": message, "type": "server_error", "code": status}}
        return b"data: " + json.dumps(body).encode() + b"\n\n"
    return json.dumps({"error": message}).encode() + b"\n"


async def _filtered(request: web.Request, ex: Exchange, upstream: http1.Response) -> web.Response:
    """A model list, cut down to the models the key may use."""
    body = await upstream.json()
    ex.ttfb = time.perf_counter()
    patterns = ex.key.models
    if ex.spec.filter is Filter.TAGS:
        body["models"] = [m for m in body.get("models", []) if model_matches(patterns, m.get("name", ""))]
    else:
        body["data"] = [m for m in body.get("data", []) if model_matches(patterns, m.get("id", ""))]
    ex.status = upstream.status
    return web.json_response(body, status=upstream.status, headers={"X-Request-Id": ex.request_id})


# ----- the record ------------------------------------------------------------------
def _model_label(app: web.Application, model: str | None) -> str:
    """A metric label: a model Ollama has, else `other` (never raw request text: labels must stay few)."""
    if model is None:
        return "-"
    supervisor = app.get(SUPERVISOR)
    known = app.get(KNOWN_MODELS)
    present = supervisor.models_present if supervisor is not None else known() if known is not None else None
    return model if present is not None and model in present else "other"


def _estimate_missing_counts(ex: Exchange) -> None:
    """Inference that began answering but whose counts Ollama did not give (the stream was cut, the
    legacy /api/embeddings, an answer too large to read) is charged an estimate: the pieces the client got
    as completion tokens, and a token per 4 bytes of the request body as prompt tokens."""
    if ex.spec.kind is not Kind.INFERENCE or ex.ttfb is None or ex.status in (400, 401, 403, 404, 405):
        return
    counts = ex.counts
    if counts.completion_tokens is None and counts.chunks:
        counts.completion_tokens = counts.chunks
    if counts.prompt_tokens is None and ex.body_size:
        counts.prompt_tokens = math.ceil(ex.body_size / 4)


def _record(app: web.Application, ex: Exchange) -> None:
    if ex.recorded:
        return
    ex.recorded = True
    _estimate_missing_counts(ex)
    if ex.recorded_upstream:  # a host of the fleet answered it as its own request and recorded it
        _count(app, ex, recorded_model(ex.model) if ex.model else None)
        return
    now = time.perf_counter()
    duration = now - ex.started
    ttfb = None if ex.ttfb is None else ex.ttfb - ex.started
    model = recorded_model(ex.model) if ex.model else None
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
        host=app[HOST_ID],
        user=ex.user,
    )
    app[USAGE].add(record)
    budgets = app.get(BUDGETS)
    if budgets is not None and ex.user is not None:
        budgets.ledger.add(
            ex.user, ex.ts, (ex.counts.prompt_tokens or 0) + (ex.counts.completion_tokens or 0)
        )
    _count(app, ex, model)


def _count(app: web.Application, ex: Exchange, model: str | None) -> None:
    """The request's metrics (and audit)."""
    duration = time.perf_counter() - ex.started
    ttfb = None if ex.ttfb is None else ex.ttfb - ex.started
    model_label = _model_label(app, model) if ex.status < 400 else "-"
    counts = ex.counts
    app[METRICS].count_request(
        ex.spec.path, model_label, ex.status, duration, ttfb, counts.prompt_tokens, counts.completion_tokens
    )
    if ex.spec.audit:
        detail = {"model": model, "status": ex.status, "error": ex.error, "request_id": ex.request_id}
        app[AUDIT].add(AuditRecord(ex.spec.audit, ex.key.id, detail))
