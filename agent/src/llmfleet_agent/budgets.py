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
# a person's directory groups ((DN, name) pairs), or None when the directory does not know them; raises
# GroupsUnknown when it cannot say (away, or too many look-ups under way)
GroupLookup = Callable[[str], Awaitable[Groups | None]]


class GroupsUnknown(Exception):
    """The directory cannot say now which groups a person is in."""


@dataclass(frozen=True)
class Budget:
    day: int | None
    month: int | None
    source: str  # where it comes from, for messages: `user alice@...`, `group llmfleet-users`, `default`

    def limit(self, period: str) -> int | None:
        return self.day if period == "day" else self.month


def _has_own_entry(person: str, cfg: BudgetsConfig) -> bool:
    folded = person_key(person)
    return any(person_key(name) == folded for name in cfg.users)


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


def strictest(cfg: BudgetsConfig) -> Budget | None:
    """The smallest budget of any group (and the default), period by period: for a person whose groups
    the directory cannot tell now."""
    limits = [*cfg.groups.values(), *([cfg.default] if cfg.default is not None else [])]
    days = [m.day for m in limits if m.day is not None]
    months = [m.month for m in limits if m.month is not None]
    limit = BudgetLimit(day=min(days) if days else None, month=min(months) if months else None)
    return _budget(limit, "the smallest group budget: the directory cannot tell this person's groups now")


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
        self._running: dict[str, int] = {}

    async def budget(self, person: str) -> Budget | None:
        if self._groups is None or not self.cfg.groups or _has_own_entry(person, self.cfg):
            return budget_for(person, None, self.cfg)
        try:
            groups = await self._groups(person)
        except GroupsUnknown:
            return strictest(self.cfg)
        return budget_for(person, groups, self.cfg)

    async def admit(self, person: str, now: float | None = None) -> Overrun | None:
        """Let one request of `person` start (then `release` it once), or say why not and for how long: a
        spent budget (until the last spent period resets), or budgets.max_concurrent_per_person requests
        already running (what a spent budget can still overrun by)."""
        budget = await self.budget(person)
        if budget is None:
            return None
        now = time.time() if now is None else now
        used = self.ledger.used(person, now)
        spent = [
            (period, limit, use)
            for period, use in zip(PERIODS, used, strict=True)
            if (limit := budget.limit(period)) is not None and use >= limit
        ]
        if spent:
            ends = max(periods.end(period, now) for period, _, _ in spent)
            period, limit, use = spent[0]
            word = "daily" if period == "day" else "monthly"
            return Overrun(
                f"{person}: the {word} budget of {limit} tokens ({budget.source}) is spent"
                f" ({use} used); try again at {periods.iso(ends)}",
                ends - now,
            )
        key = person_key(person)
        running = self._running.get(key, 0)
        if running >= self.cfg.max_concurrent_per_person:
            return Overrun(
                f"{person} has {running} requests running, the most a person with a budget may"
                " (budgets.max_concurrent_per_person)",
                1.0,
            )
        self._running[key] = running + 1
        return None

    def release(self, person: str) -> None:
        key = person_key(person)
        left = self._running.get(key, 0) - 1
        if left > 0:
            self._running[key] = left
        else:
            self._running.pop(key, None)

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
