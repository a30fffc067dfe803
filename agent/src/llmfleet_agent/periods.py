"""Budget periods: the UTC day and the calendar month (UTC). The store's daily roll-ups use the same days."""

from __future__ import annotations

import calendar
from datetime import datetime, timezone

DAY = 86400.0
PERIODS = ("day", "month")


def day_of(at: float) -> int:
    """The UTC day that holds `at`, as days since 1970-01-01."""
    return int(at // DAY)


def month_of(at: float) -> tuple[int, int]:
    moment = datetime.fromtimestamp(at, timezone.utc)
    return moment.year, moment.month


def start(period: str, at: float) -> float:
    """When the period (`day` or `month`) that holds `at` began."""
    if period == "day":
        return day_of(at) * DAY
    year, month = month_of(at)
    return datetime(year, month, 1, tzinfo=timezone.utc).timestamp()


def end(period: str, at: float) -> float:
    """When the period that holds `at` ends (the next one starts)."""
    if period == "day":
        return (day_of(at) + 1) * DAY
    year, month = month_of(at)
    return start("month", at) + calendar.monthrange(year, month)[1] * DAY


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
