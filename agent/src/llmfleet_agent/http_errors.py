"""JSON errors shaped like Ollama's (`{"error": "..."}`), and the middleware that makes every error one."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestHandler

from .appkeys import CONFIG
from .logs import clip, event

log = logging.getLogger("llmfleet.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(
    status: int, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.content_type == "application/json":
            raise
        message = exc.text if exc.text and exc.text != f"{exc.status}: {exc.reason}" else exc.reason
        if exc.status == 404:
            message = f"no route {clip(request.method)} {clip(request.path)}"
        elif exc.status == 405:
            message = f"method {clip(request.method)} not allowed on {clip(request.path)}"
        elif exc.status == 413:
            message = f"request body too large (limit {request.app[CONFIG].limits.max_body_bytes} bytes)"
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return json_error(exc.status, message, headers)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return json_error(500, "internal error in the agent; see its log")


# ----- Expect: 100-continue, answered once the credential is checked ---------------------------------
async def defer_expect(request: web.Request) -> web.StreamResponse | None:
    """The routes' expect handler. aiohttp calls it before any middleware, and its default answers
    `100 Continue` at once, inviting the body before the key is checked; this one only refuses unknown
    expectations, and `send_continue` answers after the access check."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect.lower() != "100-continue":
        return json_error(417, f"unknown expectation: Expect: {clip(expect)}")
    return None


async def send_continue(request: web.Request) -> None:
    if request.version == HttpVersion11 and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not started


def add_routes(app: web.Application, routes: web.RouteTableDef) -> None:
    """Add a route table with the deferring expect handler on every route."""
    for route in routes:
        assert isinstance(route, web.RouteDef)
        app.router.add_route(
            route.method, route.path, route.handler, expect_handler=defer_expect, **route.kwargs
        )


# ----- errors of aiohttp's request parser ---------------------------------------------------------------
def _parser_error(
    self: RequestHandler,
    request: web.BaseRequest,
    status: int = 500,
    exc: BaseException | None = None,
    message: str | None = None,
) -> web.StreamResponse:
    """aiohttp's answer to a request it could not parse (bad framing, headers too large): as JSON like
    every other error, and logged as one short line (a client's garbage must not fill the log)."""
    if request.writer.output_size > 0:
        raise ConnectionError("the answer had started; the connection is closed")
    text = clip(message or (str(exc) if exc else "") or "bad request") or ""
    if status >= 500:
        text = "internal error in the agent; see its log"
    event(log, logging.INFO, "request not parsed", status=status, error=text, remote=clip(request.remote))
    response = json_error(status, text)
    response.force_close()
    return response


def install_parser_errors() -> None:
    """Make aiohttp's parser errors JSON (it has no hook for them; its RequestHandler's method is replaced
    for this process, the agent's server)."""
    RequestHandler.handle_error = _parser_error  # type: ignore[method-assign]
