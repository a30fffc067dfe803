"""Ollama's native inference endpoints: /api/generate, /api/chat, /api/embed, /api/embeddings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .generation import Channel, Result, run_generation
from .httpio import (
    ApiError,
    ClientGone,
    NdjsonStream,
    dumps,
    keep_alive_of,
    known_model,
    opt_bool,
    opt_dict,
    opt_int,
    opt_str,
    raw_model_field,
    read_json,
)
from .state import STATE, SimState
from .store import ModelRecord, now_rfc3339
from .toymodel import Plan, context_ids, count_words, embed, plan_answer, timings

Content = Callable[[str], dict[str, Any]]


@dataclass(frozen=True)
class Job:
    """One native generation request, checked and planned."""

    raw_model: str  # the name as the client wrote it, echoed back in "model"
    record: ModelRecord
    keep_alive: float
    plan: Plan
    stream: bool
    content: Content  # the answer text in the endpoint's shape: {"response": ...} or {"message": ...}
    # more fields for the final chunk (generate's context)
    final_fields: Callable[[Result], dict[str, Any]] | None = None

    def chunk(self, text: str) -> dict[str, Any]:
        return {"model": self.raw_model, "created_at": now_rfc3339(), **self.content(text), "done": False}

    def final(self, result: Result, text: str) -> dict[str, Any]:
        t = result.timings
        return {
            "model": self.raw_model,
            "created_at": now_rfc3339(),
            **self.content(text),
            "done": True,
            "done_reason": result.done_reason,
            **(self.final_fields(result) if self.final_fields else {}),
            "total_duration": t.total_ns,
            "load_duration": t.load_ns,
            "prompt_eval_count": result.prompt_eval_count,
            "prompt_eval_duration": t.prompt_eval_ns,
            "eval_count": result.eval_count,
            "eval_duration": t.eval_ns,
        }


def _response_content(text: str) -> dict[str, Any]:
    return {"response": text}


def _message_content(text: str) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": text}}


async def _answer(request: web.Request, state: SimState, job: Job) -> web.StreamResponse:
    """Run the job and answer with an NDJSON stream or one JSON object."""
    if not job.stream:
        try:
            result = await run_generation(
                state, job.record.name, job.keep_alive, job.plan, Channel.collecting(request)
            )
        except ClientGone:
            return web.Response(status=499, text="client disconnected")
        return web.json_response(job.final(result, result.text), dumps=dumps)
    out = NdjsonStream(request)
    await out.open()

    async def send_piece(_index: int, text: str) -> None:
        await out.send(job.chunk(text))

    try:
        result = await run_generation(
            state, job.record.name, job.keep_alive, job.plan, Channel.streaming(out, send_piece)
        )
        await out.send(job.final(result, ""))
        await out.close()
    except ClientGone:
        pass
    return out.response


def _load_or_unload(
    state: SimState, raw: str, record: ModelRecord, keep_alive: float, content: Content
) -> web.Response:
    """An empty prompt (or no messages) only loads the model, or unloads it with keep_alive 0."""
    state.residency.load(record.name, keep_alive)
    reason = "unload" if keep_alive == 0 else "load"
    if reason == "unload":
        state.residency.unload(record.name)
    reply = {"model": raw, "created_at": now_rfc3339(), **content(""), "done": True, "done_reason": reason}
    return web.json_response(reply, dumps=dumps)


async def generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    raw = raw_model_field(body)
    record = known_model(state, raw)
    keep_alive = keep_alive_of(state, body)
    prompt, system = opt_str(body, "prompt"), opt_str(body, "system")
    if not prompt:
        return _load_or_unload(state, raw, record, keep_alive, _response_content)
    plan = plan_answer(prompt, [system, prompt], opt_int(opt_dict(body, "options"), "num_predict"))

    def context(result: Result) -> dict[str, Any]:
        return {} if opt_bool(body, "raw", False) else {"context": context_ids(prompt, result.pieces)}

    job = Job(raw, record, keep_alive, plan, opt_bool(body, "stream", True), _response_content, context)
    return await _answer(request, state, job)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages") or []
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "invalid value for 'messages': expected a list of objects")
    for message in messages:
        if not isinstance(message.get("content") or "", str):
            raise ApiError(400, "invalid message content: expected a string")
    return messages


def chat_source(messages: list[dict[str, Any]]) -> str:
    """What the toy model answers: the last user message (else the last message with words)."""
    for role in ("user", None):
        for message in reversed(messages):
            if (role is None or message.get("role") == role) and (message.get("content") or "").strip():
                return str(message["content"])
    return ""


async def chat(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    raw = raw_model_field(body)
    record = known_model(state, raw)
    keep_alive = keep_alive_of(state, body)
    messages = _messages(body)
    if not messages:
        return _load_or_unload(state, raw, record, keep_alive, _message_content)
    counted = [str(m.get("content") or "") for m in messages]
    plan = plan_answer(chat_source(messages), counted, opt_int(opt_dict(body, "options"), "num_predict"))
    job = Job(raw, record, keep_alive, plan, opt_bool(body, "stream", True), _message_content)
    return await _answer(request, state, job)


def embed_inputs(value: object) -> list[str]:
    """`input` as a list of texts: a string, or a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ApiError(400, "invalid input type: expected a string or a list of strings")


async def embed_endpoint(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request)
    raw = raw_model_field(body)
    record = known_model(state, raw)
    keep_alive = keep_alive_of(state, body)
    inputs = embed_inputs(body.get("input"))
    started = time.perf_counter_ns()
    cold = state.residency.load(record.name, keep_alive)
    vectors = [embed(text) for text in inputs]
    count = count_words(inputs)
    t = timings(count, 0, 0, time.perf_counter_ns() - started, cold)
    reply = {
        "model": raw,
        "embeddings": vectors,
        "total_duration": t.load_ns + t.prompt_eval_ns,
        "load_duration": t.load_ns,
        "prompt_eval_count": count,
    }
    return web.json_response(reply, dumps=dumps)


async def embeddings_legacy(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request)
    raw = raw_model_field(body)
    record = known_model(state, raw)
    state.residency.load(record.name, keep_alive_of(state, body))
    prompt = opt_str(body, "prompt")
    return web.json_response({"embedding": embed(prompt) if prompt else []}, dumps=dumps)
