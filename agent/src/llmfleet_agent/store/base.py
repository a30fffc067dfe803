"""The interface every store implements."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..keys import KeyRecord
from ..usage import UsageRecord


@dataclass(frozen=True)
class AuditRecord:
    """Something security-relevant happened: an auth failure or an admin action."""

    event: str  # auth_failed, key_created, key_revoked, drain, resume, model_pull, model_delete, ...
    key_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)


@dataclass(frozen=True)
class UsageSummary:
    group: str  # a key (with its name), a model or a day
    requests: int
    errors: int  # status >= 400
    prompt_tokens: int
    completion_tokens: int


class Store(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def put_key(self, record: KeyRecord) -> None:
        """Insert the key, or replace the record with the same id."""

    async def get_key(self, key_id: str) -> KeyRecord | None: ...
    async def list_keys(self) -> list[KeyRecord]: ...

    async def revoke_key(self, key_id: str, at: float) -> KeyRecord | None:
        """Mark the key revoked; None when there is no such key."""

    async def touch_keys(self, last_used: dict[str, float]) -> None:
        """Record when keys were last used."""

    async def add_audit(self, records: list[AuditRecord]) -> None: ...
    async def list_audit(self, limit: int = 100) -> list[AuditRecord]: ...
    async def add_usage(self, records: list[UsageRecord]) -> None: ...
    async def list_usage(self, since: float = 0.0) -> list[UsageRecord]: ...

    async def summarize_usage(self, since: float, by: str) -> list[UsageSummary]:
        """Requests, errors and tokens since `since`, grouped `by` key, model or day."""

    async def prune(self, audit_before: float | None, usage_before: float | None) -> tuple[int, int]:
        """Delete audit and usage records older than the given times (None: keep all); how many went."""
