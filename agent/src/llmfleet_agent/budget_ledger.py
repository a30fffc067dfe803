"""How many tokens each person used this UTC day and month, fleet-wide.

Two sources, added up:
- the other agents' use, read from the shared store: today's every `budgets.refresh_interval` (their
  records reach the store within their usage writer's interval, one second: batching.py), the month's
  earlier days every PAST_REFRESH and when the day changes (those change only when a spool is replayed);
- this agent's own use, counted here as each request ends (exact, at once), on top of what the store held
  for this host when the agent started. The store's figure for this host is used instead when it is larger
  (records of an earlier run that reach the store from the spool).

So a person can overspend by what the fleet's other agents serve them in one writer interval plus one
refresh interval (2 s by default), plus the answers already running when the budget is reached; this agent
itself stops them at once. With the store away the last figures are kept and own use still counts. A store
of one host (SQLite) is read once, at start: there are no other agents.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from .logs import event
from .periods import day_of as _day
from .periods import month_of as _month
from .periods import start
from .store import BudgetUse, Store
from .tasks import cancel

log = logging.getLogger("llmfleet.budgets")
PAST_REFRESH = 300.0


def person_key(person: str) -> str:
    """People are counted without regard to case or surrounding space (a UPN, an e-mail)."""
    return person.strip().lower()


def _sums(rows: list[BudgetUse]) -> dict[str, tuple[int, int]]:
    """(this host's, the other hosts') tokens per person."""
    out: dict[str, tuple[int, int]] = {}
    for row in rows:
        own, other = out.get(person_key(row.user), (0, 0))
        out[person_key(row.user)] = (own + row.own, other + row.other)
    return out


@dataclass
class _Read:
    """What the store held for a span of days: `day` is the UTC day read up to (the span ends before it,
    or is that day itself for today's figures)."""

    day: int
    sums: dict[str, tuple[int, int]]
    at: float


class Ledger:
    def __init__(
        self,
        store: Store,
        host: str,
        refresh_interval: float,
        read_timeout: float = 10.0,
        shared: bool = True,
    ) -> None:
        self._store = store
        self._host = host
        self._interval = refresh_interval
        self._timeout = read_timeout
        self._shared = shared
        # this host's use in the store when the agent started: (day, that day's, that month's) per person
        self._base: dict[str, tuple[int, int]] = {}
        self._base_day: int | None = None
        self._past: _Read | None = None  # the month's days before today
        self._today: _Read | None = None
        self._day: dict[tuple[str, int], int] = defaultdict(
            int
        )  # (person, UTC day) -> own tokens since start
        self._month: dict[tuple[str, tuple[int, int]], int] = defaultdict(int)
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self.read_at: float | None = None  # when the fleet's figures were last read

    async def start(self) -> None:
        """Read the store once before the agent serves (so this host's earlier use counts), then keep
        reading today's figures (a shared store only). A store that does not answer now is read later;
        this host's earlier use then counts once the store's figure for it passes the agent's own count."""
        if await self.refresh() and self._past is not None and self._today is not None:
            self._base_day = self._today.day
            self._base = {
                p: (self._today.sums.get(p, (0, 0))[0], self._past.sums.get(p, (0, 0))[0])
                for p in {*self._past.sums, *self._today.sums}
            }
            if not self._shared:  # nobody else writes: the store's figures are the start's, in _base
                self._past = self._today = None
        if self._shared:
            self._task = asyncio.create_task(self._loop(), name="budget-ledger")

    async def stop(self) -> None:
        await cancel(self._task)

    def add(self, person: str, at: float, tokens: int) -> None:
        """A request of `person` that arrived at `at` ended, having used `tokens`."""
        if tokens <= 0:
            return
        key = person_key(person)
        self._day[(key, _day(at))] += tokens
        self._month[(key, _month(at))] += tokens

    def used(self, person: str, now: float | None = None) -> tuple[int, int]:
        """Tokens `person` used this UTC day and this month, fleet-wide, as far as this agent knows."""
        now = time.time() if now is None else now
        key, today, month = person_key(person), _day(now), _month(now)
        own_day, own_month = self._day.get((key, today), 0), self._month.get((key, month), 0)
        base_today, base_past = self._base.get(key, (0, 0)) if self._base_day is not None else (0, 0)
        if self._base_day != today:
            # the start's day is over: it belongs to the month's past now (if the same month)
            same_month = self._base_day is not None and _month(self._base_day * 86400.0) == month
            base_past, base_today = (base_past + base_today if same_month else 0), 0
        stored_today = (
            self._today.sums.get(key, (0, 0)) if self._today and self._today.day == today else (0, 0)
        )
        past = self._past
        stored_past = past.sums.get(key, (0, 0)) if past and past.day == today else (0, 0)
        day = max(stored_today[0], base_today + own_day) + stored_today[1]
        month_own = max(stored_past[0] + stored_today[0], base_past + base_today + own_month)
        return day, month_own + stored_past[1] + stored_today[1]

    async def refresh(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        today, day_start = _day(now), start("day", now)
        try:
            past = self._past
            if past is None or past.day != today or now - past.at >= PAST_REFRESH:
                rows = await asyncio.wait_for(
                    self._store.budget_use(start("month", now), day_start, self._host), self._timeout
                )
                self._past = _Read(today, _sums(rows), now)
            rows = await asyncio.wait_for(self._store.budget_use(day_start, None, self._host), self._timeout)
        except Exception as exc:
            if not self._failing:
                event(log, logging.WARNING, "could not read the fleet's use for budgets", error=repr(exc))
                self._failing = True
            return False
        if self._failing:
            event(log, logging.INFO, "the fleet's use for budgets is read again")
            self._failing = False
        self._today = _Read(today, _sums(rows), now)
        self.read_at = now
        self._forget_before(start("month", now))
        return True

    def _forget_before(self, month_start: float) -> None:
        first_day, month = _day(month_start), _month(month_start)
        for key in [k for k in self._day if k[1] < first_day]:
            del self._day[key]
        for mkey in [k for k in self._month if k[1] < month]:
            del self._month[mkey]

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.refresh()
