"""The endpoints that answer with a progress stream: /api/pull, /api/push and /api/create.

Nothing is downloaded or uploaded: the progress is made up (layer digests derived from the model's
name), paced by the pull delay, and the store is updated when the stream reaches `success`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..modelfile import names_model, parse_modelfile
from ..models import ModelName, parse_digest
from .httpio import (
    ApiError,
    ClientGone,
    NdjsonStream,
    dumps,
    model_name,
    opt_bool,
    opt_dict,
    opt_str,
    raw_model_field,
    read_json,
)
from .logs import log
from .state import STATE, SimState
from .store import ModelRecord

MISSING_MANIFEST = "pull model manifest: file does not exist"
MISSING_PREFIX = "nonexistent"  # models whose base name starts with this do not exist in the "registry"

Step = dict[str, Any]


@dataclass(frozen=True)
class Layer:
    digest: str  # "sha256:<hex>"
    size: int
    steps: int  # progress lines after the first (completed 0)


def layers_of(record: ModelRecord) -> list[Layer]:
    """Made-up layers whose sizes add up to the model's size: weights, template, license, params."""

    def digest(kind: str) -> str:
        return "sha256:" + hashlib.sha256(f"{record.digest}:{kind}".encode()).hexdigest()

    small = {"template": 1_429, "license": 11_357, "params": 91}
    weights = Layer(digest("weights"), record.size - sum(small.values()), steps=4)
    return [weights, *(Layer(digest(kind), size, steps=1) for kind, size in small.items())]


def layer_steps(verb: str, layer: Layer) -> list[Step]:
    """`pulling 1a2b3c4d5e6f` lines with `completed` growing to `total`."""
    status = f"{verb} {layer.digest[7:19]}"
    return [
        {
            "status": status,
            "digest": layer.digest,
            "total": layer.size,
            "completed": layer.size * k // layer.steps,
        }
        for k in range(layer.steps + 1)
    ]


async def _progress(
    request: web.Request,
    state: SimState,
    stream: bool,
    steps: list[Step],
    commit: Callable[[], None],
    failure: str | None = None,
) -> web.StreamResponse:
    """Play `steps`, then fail with `failure` or run `commit` and report success."""
    delay = state.settings.faults.pull_delay
    if not stream:
        for _ in steps:
            await asyncio.sleep(delay)
        if failure:
            raise ApiError(500, failure)
        commit()
        return web.json_response({"status": "success"}, dumps=dumps)
    out = NdjsonStream(request)
    await out.open()
    try:
        for step in steps:
            await out.send(step)
            await asyncio.sleep(delay)
        if failure:
            await out.send({"error": failure})
        else:
            commit()
            await out.send({"status": "success"})
        await out.close()
    except ClientGone:
        log.info("client disconnected, %s cancelled", request.path)
    return out.response


async def pull(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    name = model_name(raw_model_field(body))
    stream = opt_bool(body, "stream", True)
    if name.base.startswith(MISSING_PREFIX):
        return await _progress(
            request, state, stream, [{"status": "pulling manifest"}], lambda: None, MISSING_MANIFEST
        )
    existing = state.store.get(name.full)
    record = ModelRecord.fresh(name.full)
    if existing is not None:  # a pull refreshes the model but keeps what create gave it
        record = dataclasses.replace(existing, modified_at=record.modified_at)
    steps: list[Step] = [{"status": "pulling manifest"}]
    for layer in layers_of(record):
        steps += layer_steps("pulling", layer)
    steps += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}]
    return await _progress(request, state, stream, steps, lambda: state.store.put(record))


async def push(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    raw = raw_model_field(body)
    record = state.store.get(model_name(raw).full)
    if record is None:
        raise ApiError(404, f'model "{raw}" not found')
    steps: list[Step] = [{"status": "retrieving manifest"}]
    for layer in layers_of(record):
        steps += layer_steps("pushing", layer)
    steps.append({"status": "pushing manifest"})
    return await _progress(request, state, opt_bool(body, "stream", True), steps, lambda: None)


@dataclass(frozen=True)
class CreatePlan:
    record: ModelRecord
    steps: list[Step]


def _from_model(state: SimState, source: str, target: ModelName) -> CreatePlan:
    parent = state.store.get(model_name(source).full)
    if parent is None:
        raise ApiError(404, f'model "{source}" not found')
    record = ModelRecord.fresh(
        target.full,
        details={**parent.details, "parent_model": parent.name},
        system=parent.system,
        template=parent.template,
        parameters=dict(parent.parameters),
    )
    steps = [{"status": f"using existing layer {layer.digest}"} for layer in layers_of(parent)]
    return CreatePlan(record, steps)


def _from_files(state: SimState, files: dict[str, Any], target: ModelName) -> CreatePlan:
    steps: list[Step] = [{"status": "parsing GGUF"}]
    for filename, digest in files.items():
        hex_digest = parse_digest(digest) if isinstance(digest, str) else None
        if hex_digest is None:
            raise ApiError(400, f"invalid digest for file {filename!r}")
        if not state.blobs.exists(hex_digest):
            raise ApiError(400, f"blob sha256:{hex_digest} not found; upload it to /api/blobs first")
        steps.append({"status": f"using existing layer sha256:{hex_digest}"})
    return CreatePlan(ModelRecord.fresh(target.full), steps)


def _from_path(target: ModelName, path: str) -> CreatePlan:
    return CreatePlan(
        ModelRecord.fresh(target.full), [{"status": f"using file {path}"}, {"status": "parsing GGUF"}]
    )


def _source_plan(
    state: SimState, body: dict[str, Any], target: ModelName
) -> tuple[CreatePlan, dict[str, Any]]:
    """The base of the new model, and the overrides (system, template, parameters) asked for."""
    overrides: dict[str, Any] = {
        "system": opt_str(body, "system") or None,
        "template": opt_str(body, "template") or None,
        "parameters": opt_dict(body, "parameters") or None,
    }
    if source := opt_str(body, "from"):
        return _from_model(state, source, target), overrides
    if files := opt_dict(body, "files"):
        return _from_files(state, files, target), overrides
    if text := opt_str(body, "modelfile"):
        modelfile = parse_modelfile(text)
        overrides = {
            "system": overrides["system"] or modelfile.system,
            "template": overrides["template"] or modelfile.template,
            "parameters": overrides["parameters"] or modelfile.parameters or None,
        }
        if not modelfile.source:
            raise ApiError(400, "no FROM line in the modelfile")
        if not names_model(modelfile.source):
            return _from_path(target, modelfile.source), overrides
        return _from_model(state, modelfile.source, target), overrides
    raise ApiError(400, "neither 'from' or 'files' was specified")


async def create(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    target = model_name(raw_model_field(body))
    plan, overrides = _source_plan(state, body, target)
    steps = list(plan.steps)
    changes = {key: value for key, value in overrides.items() if value is not None}
    if changes:
        digest = hashlib.sha256(dumps(changes).encode()).hexdigest()
        steps.append({"status": f"creating new layer sha256:{digest}"})
    if quantize := opt_str(body, "quantize"):
        level = plan.record.details.get("quantization_level", "F16")
        steps.append({"status": f"quantizing {level} model to {quantize}"})
        changes["details"] = {**plan.record.details, "quantization_level": quantize.upper()}
    record = dataclasses.replace(plan.record, **changes)
    steps.append({"status": "writing manifest"})
    return await _progress(
        request, state, opt_bool(body, "stream", True), steps, lambda: state.store.put(record)
    )
