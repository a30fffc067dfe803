"""The OpenAI-compatible endpoints Ollama serves under /v1: chat completions, completions, embeddings,
models. Errors come back as OpenAI error objects (see app.py)."""

from __future__ import annotations

import base64
import secrets
import struct
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web

from ..models import parse_name
from .generation import Channel, Result, run_generation
from .httpio import (
    ApiError,
    ClientGone,
    SseStream,
    dumps,
    known_model,
    model_name,
    opt_bool,
    opt_dict,
    opt_int,
    raw_model_field,
    read_json,
)
from .native import chat_source
from .state import STATE, SimState
from .store import ModelRecord
from .toymodel import Plan, count_words, embed, plan_answer

FINGERPRINT = "fp_ollama"


@dataclass(frozen=True)
class Shape:
    """How one endpoint writes its answers."""

    prefix: str  # of the id
    full_object: str
    chunk_object: str
    chat: bool

    def choice(self, text: str, finish: str | None, streaming: bool) -> dict[str, Any]:
        if not self.chat:
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        key = "delta" if streaming else "message"
        return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}


CHAT = Shape("chatcmpl", "chat.completion", "chat.completion.chunk", chat=True)
TEXT = Shape("cmpl", "text_completion", "text_completion", chat=False)


@dataclass(frozen=True)
class Job:
    shape: Shape
    raw_model: str
    record: ModelRecord
    plan: Plan
    stream: bool
    include_usage: bool
    id: str
    created: int

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.raw_model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        }

    def chunk(self, text: str, finish: str | None = None) -> dict[str, Any]:
        chunk = self.envelope(self.shape.chunk_object, [self.shape.choice(text, finish, streaming=True)])
        if self.include_usage:
            chunk["usage"] = None
        return chunk


def usage(result: Result) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_eval_count,
        "completion_tokens": result.eval_count,
        "total_tokens": result.prompt_eval_count + result.eval_count,
    }


def finish_reason(result: Result) -> str:
    return "length" if result.done_reason == "length" else "stop"


def _new_job(shape: Shape, body: dict[str, Any], raw: str, record: ModelRecord, plan: Plan) -> Job:
    stream = opt_bool(body, "stream", False)
    include_usage = stream and opt_bool(opt_dict(body, "stream_options"), "include_usage", False)
    job_id = f"{shape.prefix}-{secrets.randbelow(1000)}"
    return Job(shape, raw, record, plan, stream, include_usage, job_id, int(time.time()))


async def _answer(request: web.Request, state: SimState, job: Job) -> web.StreamResponse:
    keep_alive = state.settings.keep_alive
    if not job.stream:
        try:
            result = await run_generation(
                state, job.record.name, keep_alive, job.plan, Channel.collecting(request)
            )
        except ClientGone:
            return web.Response(status=499, text="client disconnected")
        reply = job.envelope(
            job.shape.full_object, [job.shape.choice(result.text, finish_reason(result), False)]
        )
        reply["usage"] = usage(result)
        return web.json_response(reply, dumps=dumps)
    out = SseStream(request)
    await out.open()

    async def send_piece(_index: int, text: str) -> None:
        await out.send(job.chunk(text))

    try:
        result = await run_generation(
            state, job.record.name, keep_alive, job.plan, Channel.streaming(out, send_piece)
        )
        await out.send(job.chunk("", finish_reason(result)))
        if job.include_usage:
            await out.send({**job.envelope(job.shape.chunk_object, []), "usage": usage(result)})
        await out.done()
        await out.close()
    except ClientGone:
        pass
    return out.response


def message_text(content: object) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    raise ApiError(400, "invalid message content: expected a string or a list of content parts")


def _token_limit(body: dict[str, Any]) -> int | None:
    limit = opt_int(body, "max_completion_tokens")
    return limit if limit is not None else opt_int(body, "max_tokens")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    raw = raw_model_field(body)
    record = known_model(state, raw)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "messages is required: a non-empty list of message objects")
    plain = [{"role": m.get("role"), "content": message_text(m.get("content"))} for m in messages]
    plan = plan_answer(chat_source(plain), [m["content"] for m in plain], _token_limit(body))
    return await _answer(request, state, _new_job(CHAT, body, raw, record, plan))


def _prompt_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    raise ApiError(400, "invalid prompt: expected a string")


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    raw = raw_model_field(body)
    record = known_model(state, raw)
    prompt = _prompt_text(body.get("prompt", ""))
    plan = plan_answer(prompt, [prompt], _token_limit(body))
    return await _answer(request, state, _new_job(TEXT, body, raw, record, plan))


def _embedding_inputs(value: object) -> list[str]:
    """Strings, or token arrays (written back as text so they can be hashed)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [" ".join(map(str, value))]
    if isinstance(value, list) and value:
        out = []
        for item in value:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, list) and all(isinstance(v, int) for v in item):
                out.append(" ".join(map(str, item)))
            else:
                raise ApiError(400, "invalid input: expected strings or token arrays")
        return out
    raise ApiError(400, "invalid input: expected a string or a non-empty list")


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


async def embeddings(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request)
    raw = raw_model_field(body)
    record = known_model(state, raw)
    inputs = _embedding_inputs(body.get("input"))
    encoding = body.get("encoding_format") or "float"
    if encoding not in {"float", "base64"}:
        raise ApiError(400, "invalid encoding_format: expected float or base64")
    state.residency.load(record.name, state.settings.keep_alive)
    data = [
        {"object": "embedding", "embedding": _encode(embed(text), encoding), "index": index}
        for index, text in enumerate(inputs)
    ]
    count = count_words(inputs)
    reply = {
        "object": "list",
        "data": data,
        "model": raw,
        "usage": {"prompt_tokens": count, "total_tokens": count},
    }
    return web.json_response(reply, dumps=dumps)


def _model_object(record: ModelRecord) -> dict[str, Any]:
    created = datetime.fromisoformat(record.modified_at.replace("Z", "+00:00"))
    owner = parse_name(record.name).namespace
    return {"id": record.name, "object": "model", "created": int(created.timestamp()), "owned_by": owner}


async def list_models(request: web.Request) -> web.Response:
    data = [_model_object(r) for r in request.app[STATE].store.all()]
    return web.json_response({"object": "list", "data": data}, dumps=dumps)


async def retrieve_model(request: web.Request) -> web.Response:
    raw = request.match_info["model"]
    record = request.app[STATE].store.get(model_name(raw).full)
    if record is None:
        raise ApiError(404, f'model "{raw}" not found')
    return web.json_response(_model_object(record), dumps=dumps)
