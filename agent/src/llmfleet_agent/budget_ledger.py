"""How many tokens each person used this UTC day and month, fleet-wide.

Two sources, added up:
- the other agents' use, read from the shared store every `budgets.refresh_interval` (their records reach
  the store within their usage writer's interval, one second: batching.py);
- this agent's own use, counted here as each request ends (exact, at once), on top of what the store held
  for this host when the agent started. The store's figure for this host is used instead when it is larger
  (records of an earlier run that reach the store from the spool).

So a person can overspend by what the fleet's other agents serve them in one writer interval plus one
refresh interval (2 s by default), plus the answers already running when the budget is reached; this agent
itself stops them at once. With the store away the last figures are kept and own use still counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

from .logs import event
from .periods import day_of as _day
from .periods import month_of as _month
from .periods import start
from .store import BudgetUse, Store

log = logging.getLogger("llmfleet.budgets")


def person_key(person: str) -> str:
    """People are counted without regard to case or surrounding space (a UPN, an e-mail)."""
    return person.strip().lower()


class _Figures:
    """The store's figures for one day and month, per person: (own day, own month, others' day, others')."""

    def __init__(self, at: float, rows: list[BudgetUse]) -> None:
        self.day = _day(at)
        self.month = _month(at)
        self.rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        for row in rows:
            sums = self.rows[person_key(row.user)]
            for i, value in enumerate((row.own_day, row.own_month, row.other_day, row.other_month)):
                sums[i] += value

    def get(self, person: str, now: float) -> tuple[int, int, int, int]:
        sums = self.rows.get(person)
        if sums is None:
            return 0, 0, 0, 0
        same_day = self.day == _day(now)
        same_month = self.month == _month(now)
        return (
            sums[0] if same_day else 0,
            sums[1] if same_month else 0,
            sums[2] if same_day else 0,
            sums[3] if same_month else 0,
        )


class Ledger:
    def __init__(self, store: Store, host: str, refresh_interval: float, read_timeout: float = 10.0) -> None:
        self._store = store
        self._host = host
        self._interval = refresh_interval
        self._timeout = read_timeout
        self._base: _Figures | None = None  # this host's use in the store when the agent started
        self._figures: _Figures | None = None  # the latest read
        self._day: dict[tuple[str, int], int] = defaultdict(
            int
        )  # (person, UTC day) -> own tokens since start
        self._month: dict[tuple[str, tuple[int, int]], int] = defaultdict(int)
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self.read_at: float | None = None  # when the fleet's figures were last read

    async def start(self) -> None:
        """Read the store once before the agent serves (so this host's earlier use counts), then keep
        reading. A store that does not answer now is read later; this host's earlier use then counts
        only once the store's figure for it passes the agent's own count."""
        if await self.refresh():
            self._base = self._figures
        self._task = asyncio.create_task(self._loop(), name="budget-ledger")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

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
        key = person_key(person)
        own_day, own_month = self._day.get((key, _day(now)), 0), self._month.get((key, _month(now)), 0)
        base = self._base.get(key, now) if self._base is not None else (0, 0, 0, 0)
        stored = self._figures.get(key, now) if self._figures is not None else (0, 0, 0, 0)
        day = max(stored[0], base[0] + own_day) + stored[2]
        month = max(stored[1], base[1] + own_month) + stored[3]
        return day, month

    async def refresh(self) -> bool:
        now = time.time()
        try:
            rows = await asyncio.wait_for(
                self._store.budget_use(start("day", now), start("month", now), self._host), self._timeout
            )
        except Exception as exc:
            if not self._failing:
                event(log, logging.WARNING, "could not read the fleet's use for budgets", error=repr(exc))
                self._failing = True
            return False
        if self._failing:
            event(log, logging.INFO, "the fleet's use for budgets is read again")
            self._failing = False
        self._figures = _Figures(now, rows)
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
