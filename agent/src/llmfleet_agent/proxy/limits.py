"""Per-key limits: requests at once and requests per minute (a sliding window)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

WINDOW = 60.0


@dataclass(frozen=True)
class Refusal:
    message: str
    retry_after: float


class KeyLimiter:
    def __init__(
        self,
        default_concurrent: int | None,
        default_rpm: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default_concurrent = default_concurrent
        self.default_rpm = default_rpm
        self._clock = clock
        self._inflight: dict[str, int] = {}
        self._recent: dict[str, deque[float]] = {}

    def acquire(self, key_id: str, max_concurrent: int | None, rpm: int | None) -> Refusal | None:
        """Admit one request of the key (then `release` it once) or say why not and when to retry."""
        concurrent = max_concurrent if max_concurrent is not None else self.default_concurrent
        per_minute = rpm if rpm is not None else self.default_rpm
        inflight = self._inflight.get(key_id, 0)
        if concurrent is not None and inflight >= concurrent:
            return Refusal(f"key {key_id} has {inflight} requests in flight (limit {concurrent})", 1.0)
        if per_minute is not None:
            now = self._clock()
            recent = self._recent.setdefault(key_id, deque())
            while recent and now - recent[0] >= WINDOW:
                recent.popleft()
            if len(recent) >= per_minute:
                wait = max(0.0, WINDOW - (now - recent[0]))
                return Refusal(
                    f"key {key_id} made {len(recent)} requests in the last minute (limit {per_minute})", wait
                )
            recent.append(now)
        self._inflight[key_id] = inflight + 1
        return None

    def release(self, key_id: str) -> None:
        left = self._inflight.get(key_id, 0) - 1
        if left > 0:
            self._inflight[key_id] = left
        else:
            self._inflight.pop(key_id, None)
