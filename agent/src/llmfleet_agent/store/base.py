"""The interface every store implements."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..keys import KeyRecord
from ..roles import Role
from ..usage import UsageRecord


@dataclass(frozen=True)
class AuditRecord:
    """Something security-relevant happened: an auth failure or an admin action."""

    event: str  # auth_failed, key_created, key_revoked, drain, resume, model_pull, model_delete, ...
    key_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)
    host: str | None = None  # the agent that wrote it
    # unique: a record written twice (a replay from the spool after a crash) is stored once
    id: str = field(default_factory=lambda: os.urandom(12).hex())


# the groupings a usage report offers (`GET /agent/usage?by=`, `llmfleet-agent usage --by`)
USAGE_GROUPS = ("key", "user", "model", "host", "day")
"""The groupings of `Store.summarize_usage`, and the one rule for their labels, which every store follows
so that any agent answers the same report whichever store the fleet uses.

A text field counts as absent when it is NULL or the empty string.

- `key`: `<key_id> (<key name>)` when the key is in the store (revoked or not), `<key_id>` when it is not,
  `-` for a record without a key.
- `user`: the record's `user`, else the name of the record's key (when the key is in the store), else `-`.
- `model`: the record's `model`, else `-`.
- `host`: the record's `host`, else `-`.
- `day`: the UTC day of the record's `ts`, `YYYY-MM-DD`.

One row per label: `requests` (records), `errors` (records with status >= 400), `prompt_tokens` and
`completion_tokens` (sums, a missing count as 0); records with `since <= ts < until` (until None: no upper
bound). Rows are ordered by the label's code points (SQLite's BINARY collation on UTF-8; PostgreSQL:
`COLLATE "C"`), never by a locale.
"""


@dataclass(frozen=True)
class UsageSummary:
    group: str  # a key (with its name), a user, a model, a host or a day
    requests: int
    errors: int  # status >= 400
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class BudgetUse:
    """A person's tokens (prompt + completion) over some whole UTC days: this host's, and the rest of the
    fleet's (budget_ledger.py)."""

    user: str
    own: int
    other: int


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

    async def set_key_grant(
        self, key_id: str, role: Role, models: tuple[str, ...], suspended: str | None, checked: float | None
    ) -> None:
        """Set a personal key's role, models, suspension and the time its owner was last confirmed (keys
        with no owner are left alone)."""

    async def take_lease(self, name: str, holder: str, seconds: float) -> bool:
        """True when `holder` holds the lease `name` for `seconds` from now (one agent at a time)."""

    async def add_audit(self, records: list[AuditRecord]) -> None: ...
    async def list_audit(self, limit: int = 100) -> list[AuditRecord]: ...
    async def add_usage(self, records: list[UsageRecord]) -> None:
        """Store the records; one already stored (same request id and time) is skipped, not doubled."""

    async def list_usage(self, since: float = 0.0, until: float | None = None) -> list[UsageRecord]: ...

    async def summarize_usage(self, since: float, until: float | None, by: str) -> list[UsageSummary]:
        """Requests, errors and tokens in [since, until) (until None: up to now), grouped `by` one of
        USAGE_GROUPS, ordered by the group."""

    async def budget_use(self, since: float, until: float | None, host: str) -> list[BudgetUse]:
        """Tokens per recorded user (records that name one) in [since, until) (UTC day boundaries; until
        None: no end), split into records of `host` and of other hosts."""

    async def prune(self, audit_before: float | None, usage_before: float | None) -> tuple[int, int]:
        """Delete audit and usage records older than the given times (None: keep all); how many went."""
