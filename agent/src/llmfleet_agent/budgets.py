"""Token budgets per person (docs/budgets.md): which budget a person has, and whether it is spent.

A person is who a usage record names (frontend.py): a personal key's owner (UPN), a directory login, or a
frontend's end user. Keys that name no person (the operators' service keys) have no budget; their limits
are per key (`limits`). A person's budget: their entry in `budgets.users`, else the most generous of their
directory groups' in `budgets.groups` (per period; a group that sets no limit for a period gives none),
else `budgets.default`. Periods are the UTC day and the calendar month (UTC); a spent budget answers 429
with `Retry-After` until the period resets. Use is counted fleet-wide (budget_ledger.py).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from . import periods
from .budget_ledger import Ledger, person_key
from .config import BudgetLimit, BudgetsConfig
from .entitlements import in_group
from .periods import PERIODS

Groups = tuple[tuple[str, str], ...]
# a person's directory groups ((DN, name) pairs), or None when the directory does not know them
GroupLookup = Callable[[str], Awaitable[Groups | None]]


@dataclass(frozen=True)
class Budget:
    day: int | None
    month: int | None
    source: str  # where it comes from, for messages: `user alice@...`, `group llmfleet-users`, `default`

    def limit(self, period: str) -> int | None:
        return self.day if period == "day" else self.month


def budget_for(person: str, groups: Groups | None, cfg: BudgetsConfig) -> Budget | None:
    """The budget of `person` in `groups` (None: they have no limit)."""
    folded = person_key(person)
    for name, limit in cfg.users.items():
        if person_key(name) == folded:
            return _budget(limit, f"user {name}")
    matching = [(name, limit) for name, limit in cfg.groups.items() if groups and in_group(name, groups)]
    if matching:
        day = None if any(m.day is None for _, m in matching) else max(m.day or 0 for _, m in matching)
        month = None if any(m.month is None for _, m in matching) else max(m.month or 0 for _, m in matching)
        names = ", ".join(name for name, _ in matching)
        return _budget(BudgetLimit(day=day, month=month), f"group{'s' if len(matching) > 1 else ''} {names}")
    if cfg.default is not None:
        return _budget(cfg.default, "budgets.default")
    return None


def _budget(limit: BudgetLimit, source: str) -> Budget | None:
    if limit.day is None and limit.month is None:
        return None
    return Budget(limit.day, limit.month, source)


@dataclass(frozen=True)
class Overrun:
    """A spent budget: the answer is 429 with Retry-After until the period resets."""

    message: str
    retry_after: float


class Budgets:
    """Budgets of the people behind requests: resolved (with their groups) and checked against the ledger."""

    def __init__(self, cfg: BudgetsConfig, ledger: Ledger, groups: GroupLookup | None = None) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self._groups = groups

    async def budget(self, person: str) -> Budget | None:
        groups = await self._groups(person) if self._groups is not None and self.cfg.groups else None
        return budget_for(person, groups, self.cfg)

    async def check(self, person: str, now: float | None = None) -> Overrun | None:
        """Why `person` may not start another request now, or None."""
        budget = await self.budget(person)
        if budget is None:
            return None
        now = time.time() if now is None else now
        used = self.ledger.used(person, now)
        for period, spent in zip(PERIODS, used, strict=True):
            limit = budget.limit(period)
            if limit is not None and spent >= limit:
                ends = periods.end(period, now)
                word = "daily" if period == "day" else "monthly"
                return Overrun(
                    f"{person}: the {word} budget of {limit} tokens ({budget.source}) is spent"
                    f" ({spent} used); it resets at {periods.iso(ends)}",
                    ends - now,
                )
        return None

    async def status(self, person: str, now: float | None = None) -> dict[str, Any]:
        """What `person` used and has left, per period (GET /agent/keys/me)."""
        now = time.time() if now is None else now
        budget = await self.budget(person)
        used = self.ledger.used(person, now)
        out: dict[str, Any] = {"user": person, "source": budget.source if budget else None}
        for period, spent in zip(PERIODS, used, strict=True):
            limit = budget.limit(period) if budget else None
            out[period] = {
                "used": spent,
                "limit": limit,
                "left": None if limit is None else max(0, limit - spent),
                "resets": periods.iso(periods.end(period, now)),
            }
        return out
