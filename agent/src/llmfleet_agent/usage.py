"""Usage records: one per proxied request, written off the request path."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class UsageRecord:
    ts: float  # Unix time the request arrived
    request_id: str
    key_id: str | None
    method: str
    route: str  # the route's template, e.g. /api/chat or /v1/models/{model}
    model: str | None
    status: int  # the HTTP status the client got; 499: the client went away; 502: Ollama failed mid-answer
    stream: bool
    prompt_tokens: int | None
    completion_tokens: int | None
    ttfb_ms: float | None
    duration_ms: float
    error: str | None
    # the host that served it (`host_id`), and the person behind the key when known (issue 13: directory
    # users, a frontend's end user); reports group by either
    host: str | None = None
    user: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


USAGE_COLUMNS = tuple(UsageRecord.__dataclass_fields__)
