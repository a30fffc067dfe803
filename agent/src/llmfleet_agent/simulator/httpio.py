"""HTTP plumbing shared by the handlers: request bodies and fields, errors, streamed responses."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from ..gojson import BodyError, GoObject, loads_object
from ..models import InvalidName, ModelName, parse_name
from .residency import parse_keep_alive
from .state import SimState
from .store import ModelRecord

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
_FLUSH_TIMEOUT = 2.0
_FLUSH_POLL = 0.005


class ApiError(Exception):
    """An error answer: `{"error": message}` natively, the OpenAI error object under /v1."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(Exception):
    """The client went away while a response was being produced."""


def not_found_message(raw_name: str) -> str:
    return f'model "{raw_name}" not found, try pulling it first'


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


async def read_json(request: web.Request) -> GoObject:
    """The request body as a JSON object, read as Ollama reads it (gojson: keys without regard to case,
    the last of a repeated key winning); ApiError 400 when it is missing or not a JSON object."""
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, "missing request body")
    try:
        return loads_object(raw)
    except BodyError as exc:
        raise ApiError(400, str(exc)) from None


def opt_str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ApiError(400, f"invalid value for {key!r}: expected a string")
    return value


def opt_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"invalid value for {key!r}: expected true or false")
    return value


def opt_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ApiError(400, f"invalid value for {key!r}: expected a whole number")
    return int(value)


def opt_dict(body: dict[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, f"invalid value for {key!r}: expected an object")
    return value


def raw_model_field(body: dict[str, Any], key: str = "model") -> str:
    """The model named in the body (`model`, or the older `name`); ApiError 400 when missing."""
    value = body.get(key) or (body.get("name") if key == "model" else None)
    if not value:
        raise ApiError(400, f"{key} is required")
    if not isinstance(value, str):
        raise ApiError(400, f"invalid value for {key!r}: expected a string")
    return value


def model_name(raw: str) -> ModelName:
    try:
        return parse_name(raw)
    except InvalidName:
        raise ApiError(400, "invalid model name") from None


def known_model(state: SimState, raw: str) -> ModelRecord:
    """The store's record for `raw`; ApiError 404 in Ollama's words when there is none."""
    record = state.store.get(model_name(raw).full)
    if record is None:
        raise ApiError(404, not_found_message(raw))
    return record


def keep_alive_of(state: SimState, body: dict[str, Any]) -> float:
    """The request's keep_alive in seconds, else the server's default (OLLAMA_KEEP_ALIVE)."""
    value = body.get("keep_alive")
    if value is None:
        return state.settings.keep_alive
    try:
        return parse_keep_alive(value)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class EventStream:
    """A response written piece by piece, each piece sent as soon as it is produced."""

    def __init__(self, request: web.Request, content_type: str) -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        if content_type == SSE:
            self.response.headers["Cache-Control"] = "no-cache"

    async def open(self) -> None:
        await self.response.prepare(self.request)

    async def write(self, data: bytes) -> None:
        try:
            await self.response.write(data)
        except ConnectionResetError as exc:  # aiohttp's ClientConnectionResetError is one
            raise ClientGone from exc

    async def flush(self) -> None:
        """Wait (at most _FLUSH_TIMEOUT) until what was written has left the process."""
        for _ in range(int(_FLUSH_TIMEOUT / _FLUSH_POLL)):
            transport = self.request.transport
            if transport is None or transport.get_write_buffer_size() == 0:
                return
            await asyncio.sleep(_FLUSH_POLL)

    def gone(self) -> bool:
        return client_gone(self.request)

    async def close(self) -> None:
        try:
            await self.response.write_eof()
        except ConnectionResetError as exc:
            raise ClientGone from exc


class NdjsonStream(EventStream):
    """Ollama's native streaming: one JSON object per line."""

    def __init__(self, request: web.Request) -> None:
        super().__init__(request, NDJSON)

    async def send(self, obj: dict[str, Any]) -> None:
        await self.write((dumps(obj) + "\n").encode())


class SseStream(EventStream):
    """OpenAI's streaming: `data: {...}` events, then `data: [DONE]`."""

    def __init__(self, request: web.Request) -> None:
        super().__init__(request, SSE)

    async def send(self, obj: dict[str, Any]) -> None:
        await self.write(f"data: {dumps(obj)}\n\n".encode())

    async def done(self) -> None:
        await self.write(b"data: [DONE]\n\n")
