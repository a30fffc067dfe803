"""Every route the proxy forwards, with the role it needs and where its model name is found."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..roles import Role


class Kind(str, enum.Enum):
    INFERENCE = "inference"  # generates or embeds: counted for usage tokens
    READ = "read"  # lists, shows, version
    MANAGE = "manage"  # changes the models on the host (admin)

    @property
    def counts_as_use(self) -> bool:
        """In flight and moving `last_activity` (so the host is not idle), and refused while draining.

        Reads are what frontends, load balancers and dashboards poll: were they use, a polled host would
        never sleep, and a draining host can still answer them. Management counts: a pull is work
        someone waits for, and the host must not stop under it.
        """
        return self is not Kind.READ


class Filter(str, enum.Enum):
    NONE = "none"
    TAGS = "tags"  # /api/tags, /api/ps: {"models": [{"name": ...}]}
    OPENAI_MODELS = "openai_models"  # /v1/models: {"data": [{"id": ...}]}


@dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str
    role: Role
    kind: Kind
    # JSON body fields through which Ollama resolves models (read as Go reads them: any case, the last
    # one winning); the key must be allowed every model they name, and the first present one is "the
    # model" of the request's record; empty: no model in the body
    model_fields: tuple[str, ...] = ()
    model_required: bool = False
    json_body: bool = True
    openai: bool = False
    filter: Filter = Filter.NONE
    audit: str | None = None  # admin actions leave an audit record under this event name
    streams_body: bool = False  # the request body is streamed through, not parsed (blobs)
    modelfile: bool = False  # an older `modelfile` field's FROM lines name models too (create)


U, A = Role.USER, Role.ADMIN
INF, READ, MANAGE = Kind.INFERENCE, Kind.READ, Kind.MANAGE

ROUTES: tuple[RouteSpec, ...] = (
    # Ollama's native API
    RouteSpec("POST", "/api/generate", U, INF, ("model",), True),
    RouteSpec("POST", "/api/chat", U, INF, ("model",), True),
    RouteSpec("POST", "/api/embed", U, INF, ("model",), True),
    RouteSpec("POST", "/api/embeddings", U, INF, ("model",), True),
    RouteSpec("POST", "/api/show", U, READ, ("model", "name"), True),
    RouteSpec("GET", "/api/tags", U, READ, json_body=False, filter=Filter.TAGS),
    RouteSpec("GET", "/api/ps", U, READ, json_body=False, filter=Filter.TAGS),
    RouteSpec("GET", "/api/version", U, READ, json_body=False),
    # model management
    RouteSpec("POST", "/api/pull", A, MANAGE, ("model", "name"), True, audit="model_pull"),
    RouteSpec("POST", "/api/push", A, MANAGE, ("model", "name"), True, audit="model_push"),
    RouteSpec(
        "POST",
        "/api/create",
        A,
        MANAGE,
        ("model", "name", "from"),
        True,
        modelfile=True,
        audit="model_create",
    ),
    RouteSpec("POST", "/api/copy", A, MANAGE, ("source", "destination"), True, audit="model_copy"),
    RouteSpec("DELETE", "/api/delete", A, MANAGE, ("model", "name"), True, audit="model_delete"),
    RouteSpec("HEAD", "/api/blobs/{digest}", A, MANAGE, json_body=False),
    RouteSpec(
        "POST", "/api/blobs/{digest}", A, MANAGE, json_body=False, audit="blob_upload", streams_body=True
    ),
    # the OpenAI-compatible API (Ollama serves it)
    RouteSpec("POST", "/v1/chat/completions", U, INF, ("model",), True, openai=True),
    RouteSpec("POST", "/v1/completions", U, INF, ("model",), True, openai=True),
    RouteSpec("POST", "/v1/embeddings", U, INF, ("model",), True, openai=True),
    RouteSpec("GET", "/v1/models", U, READ, json_body=False, openai=True, filter=Filter.OPENAI_MODELS),
    RouteSpec("GET", "/v1/models/{model}", U, READ, json_body=False, openai=True),
)
