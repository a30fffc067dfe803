"""The aiohttp application: routes, error answers in Ollama's (or OpenAI's) shape, request logging."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from . import logs, models_api, native, openai_compat, transfers
from .httpio import ApiError, dumps
from .logs import log
from .settings import Settings
from .state import STATE, SimState
from .store import BlobStore, ModelStore

MAX_BODY = 64 * 1024 * 1024  # chat requests may carry images
_OPENAI_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error"}


def error_response(request: web.Request, status: int, message: str) -> web.Response:
    """`{"error": message}` as Ollama answers; the OpenAI error object under /v1/."""
    if request.path.startswith("/v1/"):
        kind = _OPENAI_ERROR_TYPES.get(status, "api_error")
        body: object = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    else:
        body = {"error": message}
    return web.json_response(body, status=status, dumps=dumps)


def _route_miss(exc: web.HTTPException) -> web.Response:
    """An unknown path or method, answered in the words of Ollama's router."""
    text = "404 page not found" if exc.status == 404 else "405 method not allowed"
    return web.Response(status=exc.status, text=text)


@web.middleware
async def errors_and_access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ApiError as err:
        status = err.status
        return error_response(request, err.status, err.message)
    except web.HTTPException as exc:
        status = exc.status
        if exc.status in (404, 405):
            return _route_miss(exc)
        return error_response(request, exc.status, exc.reason)
    except asyncio.CancelledError:
        status = 499
        raise
    except Exception as exc:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(request, 500, f"internal error: {exc}")
    finally:
        logs.access(status, time.perf_counter() - started, request.remote, request.method, request.path)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", models_api.root)
    app.router.add_get("/api/version", models_api.version)
    app.router.add_get("/api/tags", models_api.tags)
    app.router.add_get("/api/ps", models_api.ps)
    app.router.add_post("/api/show", models_api.show)
    app.router.add_post("/api/copy", models_api.copy)
    app.router.add_delete("/api/delete", models_api.delete)
    app.router.add_route("HEAD", "/api/blobs/{digest}", models_api.blob_head)
    app.router.add_post("/api/blobs/{digest}", models_api.blob_post)
    app.router.add_post("/api/pull", transfers.pull)
    app.router.add_post("/api/push", transfers.push)
    app.router.add_post("/api/create", transfers.create)
    app.router.add_post("/api/generate", native.generate)
    app.router.add_post("/api/chat", native.chat)
    app.router.add_post("/api/embed", native.embed_endpoint)
    app.router.add_post("/api/embeddings", native.embeddings_legacy)
    app.router.add_post("/v1/chat/completions", openai_compat.chat_completions)
    app.router.add_post("/v1/completions", openai_compat.completions)
    app.router.add_post("/v1/embeddings", openai_compat.embeddings)
    app.router.add_get("/v1/models", openai_compat.list_models)
    app.router.add_get("/v1/models/{model:.+}", openai_compat.retrieve_model)


def build_app(settings: Settings, store: ModelStore) -> web.Application:
    """The simulator's application over an already loaded store."""
    app = web.Application(middlewares=[errors_and_access_log], client_max_size=MAX_BODY)
    app[STATE] = SimState(settings=settings, store=store, blobs=BlobStore(settings.models_dir))
    add_routes(app)
    return app
