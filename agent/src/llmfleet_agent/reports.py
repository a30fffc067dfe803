"""The usage report: one query for `GET /agent/usage` and `llmfleet-agent usage`.

Both parse their parameters here, ask the store the same question (`usage_report`) and render the answer
here, so the route and the command give the same rows for the same window. The store answers for the
whole fleet when the fleet shares one (PostgreSQL), so any agent answers for all of them.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from .access_control import requires
from .appkeys import STORE
from .durations import NEVER, parse_duration
from .http_errors import json_error
from .logs import clip, event
from .roles import Role
from .store import Store, UsageSummary
from .store.base import USAGE_GROUPS

log = logging.getLogger("llmfleet.reports")

routes = web.RouteTableDef()

PARAMETERS = ("since", "until", "by")
DEFAULT_SINCE = "7d"
DEFAULT_BY = "key"
TIME_FORMS = (
    "an RFC 3339 time with a zone (2024-05-01T00:00:00Z), a Unix time in seconds (1714521600), "
    "or a duration meaning that long ago (30m, 12h, 7d, 2w)"
)
CSV_HEADER = ("group", "requests", "errors", "prompt_tokens", "completion_tokens")
CSV_CONTENT_TYPE = "text/csv; charset=utf-8"
# the last second an RFC 3339 time can name (9999-12-31T23:59:59Z); a time beyond it cannot be shown
LATEST = 253402300799.0

_UNIX = re.compile(r"[0-9]+(?:\.[0-9]+)?")  # a bare number: a Unix time, never a duration
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
# an offset whose `+` a query string decoded as a space (`?since=2024-05-01T02:00:00+02:00` unencoded)
_PLUS_AS_SPACE = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?) ([0-9]{2}:[0-9]{2})"
)
# longer than any time in TIME_FORMS: refused before any pattern looks at it
_LONGEST = 64
# what a spreadsheet reads as the start of a formula (=1+1, +1, -1, @SUM(...)), or a tab or carriage
# return before one
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class ReportError(ValueError):
    """A parameter of the report is wrong: which one, and why."""

    def __init__(self, parameter: str, reason: str) -> None:
        super().__init__(f"{parameter}: {reason}")
        self.parameter = parameter
        self.reason = reason


@dataclass(frozen=True)
class ReportQuery:
    since: float  # Unix time, included
    until: float  # Unix time, excluded
    by: str  # one of USAGE_GROUPS


def _shown(text: str) -> str:
    return repr(clip(text))


def parse_time(parameter: str, text: str, now: float) -> float:
    """A time given as TIME_FORMS says; ReportError naming `parameter` otherwise. A bare number is a Unix
    time, a number with a unit a duration; a duration reaching back before 1970 means from 1970."""
    value = text.strip()
    if len(value) > _LONGEST:
        raise ReportError(parameter, f"{_shown(text)} is not a time; give {TIME_FORMS}")
    plus = _PLUS_AS_SPACE.fullmatch(value)
    if plus:
        value = f"{plus[1]}+{plus[2]}"
    if _UNIX.fullmatch(value):
        ts = float(value)
    elif _RFC3339.fullmatch(value):
        try:
            ts = datetime.fromisoformat(value.upper().replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError) as exc:
            raise ReportError(parameter, f"{_shown(text)} is not a valid time: {exc}") from None
    else:
        if value.lower() in NEVER:
            raise ReportError(
                parameter, f"{_shown(text)} has no {'start' if parameter == 'since' else 'end'}"
            )
        try:
            ago = parse_duration(value)
        except ValueError:
            raise ReportError(parameter, f"{_shown(text)} is not a time; give {TIME_FORMS}") from None
        assert ago is not None
        return max(0.0, now - ago)  # a duration longer than the Unix era: from its start
    if not 0 <= ts <= LATEST:
        raise ReportError(parameter, f"{_shown(text)} is outside 1970-01-01 to 9999-12-31")
    return ts


def _grouping(by: str) -> str:
    if by not in USAGE_GROUPS:
        raise ReportError("by", f"{_shown(by)} is not a grouping; give one of {', '.join(USAGE_GROUPS)}")
    return by


def parse_query(
    since: str | None = None, until: str | None = None, by: str | None = None, now: float | None = None
) -> ReportQuery:
    """The report's window and grouping from its parameters (None: the default); ReportError naming the
    first one that is wrong. Defaults: since 7 days ago, until now, by key."""
    now = time.time() if now is None else now
    start = parse_time("since", DEFAULT_SINCE if since is None else since, now)
    end = now if until is None else parse_time("until", until, now)
    by = _grouping(DEFAULT_BY if by is None else by)
    if not start < end:
        raise ReportError("since", f"must be before until (since {rfc3339(start)}, until {rfc3339(end)})")
    return ReportQuery(start, end, by)


async def usage_report(store: Store, since: float, until: float | None, by: str) -> list[UsageSummary]:
    """Requests, errors and tokens in [since, until), one row per group `by`, ordered by the group."""
    return await store.summarize_usage(since, until, _grouping(by))


def rfc3339(ts: float) -> str:
    """`ts` in UTC as RFC 3339: whole seconds when it is one, else microseconds."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def report_json(query: ReportQuery, rows: list[UsageSummary]) -> dict[str, Any]:
    return {
        "since": rfc3339(query.since),
        "until": rfc3339(query.until),
        "by": query.by,
        "rows": [asdict(row) for row in rows],
    }


def csv_cell(text: str) -> str:
    """A text cell that a spreadsheet shows as text, never runs as a formula: one that starts with = + - @
    (or a tab or carriage return) gets a leading `'`. The plain `-` (no key, user, model or host) is left
    as it is: alone it is no formula."""
    if text != "-" and text.startswith(_FORMULA_START):
        return "'" + text
    return text


def report_csv(rows: list[UsageSummary]) -> str:
    """The rows as CSV (RFC 4180: CRLF line ends, quoted where needed), with a header line."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    for row in rows:
        writer.writerow(
            (csv_cell(row.group), row.requests, row.errors, row.prompt_tokens, row.completion_tokens)
        )
    return out.getvalue()


def wants_csv(accept: str) -> bool:
    """Whether an Accept header prefers text/csv to application/json (JSON on a tie, and by default)."""
    ranges: list[tuple[str, float]] = []
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media:
            ranges.append((media.lower(), q if math.isfinite(q) else 0.0))

    def quality(media_type: str) -> float:
        kind = media_type.split("/")[0]
        best, specific = 0.0, -1
        for media, q in ranges:
            rank = 2 if media == media_type else 1 if media == f"{kind}/*" else 0 if media == "*/*" else -1
            if rank > specific:
                best, specific = q, rank
        return best

    return quality("text/csv") > quality("application/json")


@routes.get("/agent/usage")
@requires(Role.OPERATOR)
async def agent_usage(request: web.Request) -> web.Response:
    query = request.query
    unknown = sorted(set(query) - set(PARAMETERS))
    if unknown:
        names = ", ".join(_shown(name) for name in unknown[:10])
        return json_error(
            400,
            f"unknown parameter(s) {names}; this route takes since, until and by",
            parameter=clip(unknown[0]),
        )
    for name in PARAMETERS:
        if len(query.getall(name, [])) > 1:
            return json_error(400, f"{name}: given more than once", parameter=name)
    try:
        report = parse_query(query.get("since"), query.get("until"), query.get("by"))
    except ReportError as exc:
        return json_error(400, str(exc)[:1000], parameter=exc.parameter)
    try:
        rows = await usage_report(request.app[STORE], report.since, report.until, report.by)
    except Exception as exc:  # the store away or slow: the report cannot be made now
        event(log, logging.WARNING, "usage report failed: the store did not answer", error=repr(exc))
        return json_error(
            503, "the store did not answer; the usage report cannot be made now", {"Retry-After": "5"}
        )
    if wants_csv(request.headers.get("Accept", "")):
        return web.Response(
            text=report_csv(rows), headers={"Content-Type": CSV_CONTENT_TYPE, "Vary": "Accept"}
        )
    return web.json_response(report_json(report, rows), headers={"Vary": "Accept"})
