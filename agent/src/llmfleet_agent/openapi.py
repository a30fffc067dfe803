"""The agent's API as an OpenAPI 3.0.3 document, built from the routes the application serves.

Every path, method and role comes from the router (the role from `@requires`/`@public` on the handler),
a proxied route's body and answers from its RouteSpec: a route added to either table is in the document
without more work. Only what a control route's code says in prose (its summary, a body it reads, an
answer other than 200) is written here, in `_CONTROL`.
"""

from __future__ import annotations

import json
import re
import weakref
from typing import Any

from aiohttp import web

from . import __version__
from .access_control import PUBLIC, SELF_SERVICE, role_of
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .proxy.handler import ROUTE_SPEC
from .proxy.routes import Kind, RouteSpec
from .reports import TIME_FORMS
from .roles import Role
from .store.base import USAGE_GROUPS

# proxied routes by their handler's name (proxy/handler.py `make_handler`)

_JSON = "application/json"
_ANY_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}
_ERROR = {"$ref": "#/components/schemas/Error"}
_OPENAI_ERROR = {"$ref": "#/components/schemas/OpenAIError"}
_V1_ERROR = {"$ref": "#/components/schemas/V1Error"}

COMPONENTS: dict[str, Any] = {
    "securitySchemes": {
        "bearer": {"type": "http", "scheme": "bearer", "description": "an agent key (`llmfleet-agent keys`)"},
        "basic": {
            "type": "http",
            "scheme": "basic",
            "description": "directory credentials (with `auth.ldap`: personal keys only)",
        },
    },
    "schemas": {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
            "additionalProperties": True,
        },
        "OpenAIError": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message"],
                    "properties": {"message": {"type": "string"}, "type": {"type": "string"}},
                    "additionalProperties": True,
                }
            },
            "additionalProperties": True,
        },
        "V1Error": {
            "description": "under /v1 the agent's own refusals are Error, Ollama's answers OpenAIError",
            "anyOf": [_ERROR, _OPENAI_ERROR],
        },
        "IdleFigures": {
            "type": "object",
            "required": ["idle_seconds", "inflight", "last_activity", "draining"],
            "properties": {
                "idle_seconds": {"type": "number"},
                "inflight": {"type": "integer"},
                "last_activity": {"type": "number"},
                "draining": {"type": "boolean"},
            },
            "additionalProperties": True,
        },
        "UsageReport": {
            "type": "object",
            "required": ["since", "until", "by", "rows"],
            "properties": {
                "since": {"type": "string", "format": "date-time"},
                "until": {"type": "string", "format": "date-time"},
                "by": {"type": "string", "enum": list(USAGE_GROUPS)},
                "rows": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["group", "requests", "errors", "prompt_tokens", "completion_tokens"],
                        "properties": {
                            "group": {"type": "string"},
                            "requests": {"type": "integer"},
                            "errors": {"type": "integer"},
                            "prompt_tokens": {"type": "integer"},
                            "completion_tokens": {"type": "integer"},
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    },
}

_AGENT_ERRORS = {
    400: (
        "the body is not JSON, not an object, lacks the model, or a field the agent reads is wrong; "
        "a query parameter is unknown or wrong (`parameter` names it)"
    ),
    401: "no valid key",
    403: "the key's role or model patterns do not allow this request",
    404: "no such resource (a personal key that is not the caller's)",
    408: "the body did not arrive within `limits.body_timeout`",
    409: "not drained: requests in flight, or not idle long enough",
    413: "the body is larger than `limits.max_body_bytes`",
    429: (
        "the key's concurrency or requests-per-minute limit is reached, or the person's token budget is"
        " spent (see `Retry-After`)"
    ),
    502: "Ollama failed before answering",
    503: "Ollama is not running, or the agent is draining or stopping (see `Retry-After`)",
    504: "Ollama sent nothing for `proxy.read_timeout` seconds",
}
_FIGURES = {"$ref": "#/components/schemas/IdleFigures"}

# what the control routes' code says: a summary, a body it reads, answers other than 200 application/json
_CONTROL: dict[str, dict[str, Any]] = {
    "mint": {
        "summary": "Mint a personal key with directory credentials (shown once; the owner's group rights)",
        "body": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "expires": {"type": "string"}},
        },
        "responses": {"201": {"description": "the key (`key`, shown once) and its fields"}},
        "errors": (400, 409, 503),
    },
    "list_personal": {"summary": "The caller's personal keys (an admin: everyone's)", "errors": (503,)},
    "revoke": {"summary": "Revoke a personal key of the caller's (an admin: anyone's)", "errors": (404, 503)},
    "keys_me": {
        "summary": (
            "The caller: the key (none for a directory login), the person behind it, and their token budget"
            " (use this UTC day and month fleet-wide, the limit, what is left, when it resets)"
        ),
    },
    "healthz": {"summary": "Liveness: 200 while the agent serves"},
    "readyz": {
        "summary": (
            "Readiness: Ollama running, the configured models present, a GPU visible when "
            "`probes.require_gpu`, not draining"
        ),
        "responses": {
            "503": {
                "description": "not ready; the reasons joined by `; `",
                "content": {
                    _JSON: {
                        "schema": {
                            "type": "object",
                            "required": ["ready", "reason"],
                            "properties": {"ready": {"type": "boolean"}, "reason": {"type": "string"}},
                        }
                    }
                },
            }
        },
    },
    "status": {
        "summary": (
            "The agent, readiness, Ollama's supervisor, idle figures, host probes, and the store: whether it"
            " takes writes, records waiting in memory and in the spool"
        )
    },
    "idle": {"summary": "Idle figures", "ok": _FIGURES},
    "drain": {
        "summary": "Refuse new inference (only if idle for `if_idle_for` seconds, when given)",
        "body": {
            "type": "object",
            "properties": {"if_idle_for": {"type": "number", "minimum": 0, "nullable": True}},
            "additionalProperties": False,
        },
        "ok": _FIGURES,
        "errors": (400, 409, 413),
    },
    "resume": {"summary": "Accept inference again", "ok": _FIGURES},
    "metrics": {
        "summary": "Prometheus text exposition",
        "content": {METRICS_CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
    },
    "openapi_document": {"summary": "This document"},
    "agent_usage": {
        "summary": (
            "Usage report: requests, errors and tokens in [since, until), grouped by key, user, model, host "
            "or day; from the store, so fleet-wide when the fleet shares one. CSV with `Accept: text/csv`"
        ),
        "parameters": [
            {
                "name": "since",
                "in": "query",
                "required": False,
                "description": f"the window's start, included (default 7d): {TIME_FORMS}",
                "schema": {"type": "string"},
            },
            {
                "name": "until",
                "in": "query",
                "required": False,
                "description": f"the window's end, excluded (default now): {TIME_FORMS}",
                "schema": {"type": "string"},
            },
            {
                "name": "by",
                "in": "query",
                "required": False,
                "description": "the grouping (default key)",
                "schema": {"type": "string", "enum": list(USAGE_GROUPS)},
            },
        ],
        "content": {
            _JSON: {"schema": {"$ref": "#/components/schemas/UsageReport"}},
            "text/csv": {
                "schema": {
                    "type": "string",
                    "description": (
                        "a header line `group,requests,errors,prompt_tokens,completion_tokens`, then one "
                        "line per group (RFC 4180); a group that starts with = + - @ is prefixed with `'`"
                    ),
                }
            },
        },
        "errors": (400,),
    },
}


def build_openapi(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document of every route `app` serves to some role."""
    paths: dict[str, dict[str, Any]] = {}
    get_handlers = {route.handler for route in app.router.routes() if route.method == "GET"}
    for route in app.router.routes():
        if route.resource is None or (route.method == "HEAD" and route.handler in get_handlers):
            continue  # aiohttp's own HEAD beside a GET
        role = role_of(route.handler)
        if role not in (PUBLIC, SELF_SERVICE) and not isinstance(role, Role):
            continue  # open to no role
        path, method = route.resource.canonical, route.method
        spec: RouteSpec | None = getattr(route.handler, ROUTE_SPEC, None)
        operation = _proxy_operation(spec) if spec else _control_operation(route.handler.__name__)
        operation["operationId"] = _operation_id(method, path)
        if role == PUBLIC:
            operation["security"] = []
        elif role == SELF_SERVICE:
            operation["security"] = [{"basic": []}, {"bearer": []}]
            operation["x-llmfleet-role"] = "directory user"
            operation["description"] = (
                "Directory credentials, or a personal key (an admin's key: everyone's)."
            )
            for status in (401, 403):
                operation["responses"][str(status)] = _error(status, spec)
        else:
            operation["x-llmfleet-role"] = role.value
            operation["description"] = f"Needs a key with role {role.value} or above."
            for status in (401, 403):
                operation["responses"][str(status)] = _error(status, spec)
        parameters = re.findall(r"{(\w+)}", path)
        if parameters:
            operation["parameters"] = [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in parameters
            ]
        operation["responses"] = dict(sorted(operation["responses"].items()))
        paths.setdefault(path, {})[method.lower()] = dict(sorted(operation.items()))
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "llmfleet-agent",
            "version": __version__,
            "description": (
                "The llmfleet agent's own routes and its authenticated proxy for Ollama's native and "
                'OpenAI-compatible APIs. Every error the agent answers is JSON `{"error": "..."}`; '
                "an unknown route is 401 without a valid key, else 404; a wrong method 405."
            ),
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {**COMPONENTS, "responses": _error_responses()},
    }


_CACHE: weakref.WeakKeyDictionary[web.Application, bytes] = weakref.WeakKeyDictionary()


def openapi_json(app: web.Application) -> bytes:
    """`build_openapi(app)` as JSON, built once per application (its routes are fixed once it runs)."""
    if app not in _CACHE:
        _CACHE[app] = dumps(build_openapi(app)).encode()
    return _CACHE[app]


def dumps(document: dict[str, Any]) -> str:
    """The document as docs/openapi.json holds it."""
    return json.dumps(document, indent=2) + "\n"


def _operation_id(method: str, path: str) -> str:
    return method.lower() + re.sub(r"[^A-Za-z0-9]+", "_", path).rstrip("_")


def _error(status: int, spec: RouteSpec | None) -> dict[str, Any]:
    return {"$ref": f"#/components/responses/{'V1' if spec and spec.openai else ''}Error{status}"}


def _error_responses() -> dict[str, Any]:
    return {
        f"{prefix}Error{status}": {"description": text, "content": {_JSON: {"schema": schema}}}
        for prefix, schema in (("", _ERROR), ("V1", _V1_ERROR))
        for status, text in _AGENT_ERRORS.items()
    }


def _control_operation(name: str) -> dict[str, Any]:
    doc = _CONTROL.get(name, {})
    content = doc.get("content", {_JSON: {"schema": doc.get("ok", _ANY_OBJECT)}})
    operation: dict[str, Any] = {
        "summary": doc.get("summary", name),
        "tags": ["agent"],
        "responses": {"200": {"description": "OK", "content": content}, **doc.get("responses", {})},
    }
    for status in doc.get("errors", ()):
        operation["responses"][str(status)] = _error(status, None)
    if "parameters" in doc:
        operation["parameters"] = doc["parameters"]
    if "body" in doc:
        operation["requestBody"] = {"required": False, "content": {_JSON: {"schema": doc["body"]}}}
    return operation


def _proxy_operation(spec: RouteSpec) -> dict[str, Any]:
    api = "OpenAI-compatible" if spec.openai else "Ollama"
    operation: dict[str, Any] = {
        "summary": f"Forwarded to Ollama ({api} API)",
        "tags": ["openai" if spec.openai else "ollama"],
        "responses": {
            "200": {"description": "Ollama's answer", **_success_content(spec)},
            "default": {
                "description": "Ollama's own answer, passed through unchanged (201 for a new blob, 404 "
                "for an unknown model, ...)",
                "content": {_JSON: {"schema": _V1_ERROR if spec.openai else _ERROR}},
            },
        },
    }
    errors = [429, 502, 503, 504]
    if spec.json_body:
        errors += [400, 408, 413]
        operation["requestBody"] = {"required": True, "content": {_JSON: {"schema": _body_schema(spec)}}}
    elif spec.streams_body:
        errors += [408, 413]
        binary = {"type": "string", "format": "binary"}
        operation["requestBody"] = {
            "required": True,
            "content": {"application/octet-stream": {"schema": binary}},
        }
    for status in sorted(errors):
        operation["responses"][str(status)] = _error(status, spec)
    return operation


def _success_content(spec: RouteSpec) -> dict[str, Any]:
    if spec.method == "HEAD" or not (spec.json_body or spec.kind is Kind.READ):
        return {}
    content: dict[str, Any] = {_JSON: {"schema": _ANY_OBJECT}}
    if spec.kind is not Kind.READ:  # generations and progress are streamed unless `stream` is false
        content["text/event-stream" if spec.openai else "application/x-ndjson"] = {
            "schema": {"type": "string"}
        }
    return {"content": content}


def _body_schema(spec: RouteSpec) -> dict[str, Any]:
    """A JSON object: the model fields the agent checks, the fields it reads, anything else for Ollama."""
    properties: dict[str, Any] = {name: {"type": "string", "minLength": 1} for name in spec.model_fields}
    if spec.modelfile:
        properties["modelfile"] = {"type": "string"}
    if spec.kind is Kind.INFERENCE:
        properties["stream"] = {"type": "boolean"}
        if spec.openai:
            properties["stream_options"] = {
                "type": "object",
                "properties": {"include_usage": {"type": "boolean"}},
                "additionalProperties": True,
            }
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": True}
    if spec.model_required and len(spec.model_fields) == 1:
        schema["required"] = list(spec.model_fields)
    elif spec.model_required:  # any one of them names the model
        schema["anyOf"] = [{"required": [name]} for name in spec.model_fields]
    return schema
