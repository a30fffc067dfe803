"""Auth failures, aggregated: however many an anonymous client sends, each (source address, reason) makes
one audit row and at most two log lines per window, and what the client sent is cut (`logs.clip`).

The first failure of a (remote, reason) in a window is logged at once; the rest are counted. When the
window closes (a timer, or `flush()` at shutdown) each pair's count goes to the audit, and to the log when
there was more than one. Pairs are capped per window: beyond the cap, failures share one overflow bucket.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .logs import clip, event
from .store import AuditRecord

log = logging.getLogger("llmfleet.auth")

OVERFLOW = "*"  # the overflow bucket's remote and reason (never an address)
_OVERFLOW_KEY: tuple[str | None, str] = (OVERFLOW, OVERFLOW)


@dataclass
class _Bucket:
    remote: str | None
    reason: str
    key_id: str | None
    method: str | None  # of the window's first failure
    path: str | None
    first: float
    last: float
    count: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "remote": self.remote,
            "reason": self.reason,
            "count": self.count,
            "first_ts": self.first,
            "last_ts": self.last,
        }

    def audit(self) -> AuditRecord:
        detail = {**self.summary(), "method": self.method, "path": self.path}
        return AuditRecord("auth_failed", self.key_id, detail, ts=self.first)


class AuthFailures:
    def __init__(
        self, write: Callable[[AuditRecord], None], window: float = 60.0, max_buckets: int = 1000
    ) -> None:
        self._write = write
        self._window = window
        self._max_buckets = max_buckets
        self._buckets: dict[tuple[str | None, str], _Bucket] = {}
        self._timer: asyncio.TimerHandle | None = None

    @property
    def buckets(self) -> int:
        return len(self._buckets)

    def record(
        self, remote: str | None, reason: str, key_id: str | None, method: str | None, path: str | None
    ) -> None:
        """Count one failure; log it when it is the first of its (remote, reason) in this window."""
        now = time.time()
        key = (clip(remote), clip(reason) or "")
        if key not in self._buckets and self._full():
            key = _OVERFLOW_KEY
        bucket = self._buckets.get(key) or self._open(key, key_id, clip(method), clip(path), now)
        bucket.count += 1
        bucket.last = now

    def _full(self) -> bool:
        return len(self._buckets) - (_OVERFLOW_KEY in self._buckets) >= self._max_buckets

    def _open(
        self,
        key: tuple[str | None, str],
        key_id: str | None,
        method: str | None,
        path: str | None,
        now: float,
    ) -> _Bucket:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._window, self.flush)
        remote, reason = key
        if key == _OVERFLOW_KEY:
            key_id = None
            event(
                log,
                logging.WARNING,
                f"authentication failures from more than {self._max_buckets} (address, reason) pairs;"
                " counting the rest of the window together",
                window=self._window,
            )
        else:
            event(
                log,
                logging.WARNING,
                "authentication failed",
                key_id=key_id,
                path=path,
                method=method,
                remote=remote,
                reason=reason,
            )
        bucket = _Bucket(remote, reason, key_id, method, path, now, now)
        self._buckets[key] = bucket
        return bucket

    def flush(self) -> None:
        """Close the window: one audit row per bucket, one log line per bucket that counted more than one."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        buckets, self._buckets = self._buckets, {}
        for bucket in buckets.values():
            self._write(bucket.audit())
            if bucket.count > 1:
                summary = bucket.summary()
                event(
                    log, logging.WARNING, "repeated authentication failures", key_id=bucket.key_id, **summary
                )
