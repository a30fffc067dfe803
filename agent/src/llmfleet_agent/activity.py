"""Activity: what is in flight, when the host was last used, and draining.

`idle_seconds` is 0 while anything is in flight, else the seconds since the last request finished, since
the agent started, or since the last resume, whichever is latest. Only requests that are use of the host
(inference and model management, `proxy.routes.Kind.counts_as_use`) begin here; model lists and metadata
do not, nor are they refused while draining. The event loop runs one step at a time, so `drain()` decides
and refuses new work in one step: no request can slip in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class IdleFigures:
    idle_seconds: float
    inflight: int
    last_activity: float  # Unix time
    draining: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "idle_seconds": round(self.idle_seconds, 3),
            "inflight": self.inflight,
            "last_activity": self.last_activity,
            "draining": self.draining,
        }


class Activity:
    def __init__(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._monotonic = monotonic
        self._wall = wall
        self.inflight = 0
        self.draining = False
        self.drained_at: float | None = None
        self._last_mono = monotonic()
        self._last_wall = wall()

    def touch(self) -> None:
        """Something happened that counts as use of the host."""
        self._last_mono = self._monotonic()
        self._last_wall = self._wall()

    def try_begin(self) -> bool:
        """Admit one request unless draining; the caller must call `end()` exactly once if admitted."""
        if self.draining:
            return False
        self.inflight += 1
        self.touch()
        return True

    def end(self) -> None:
        self.inflight -= 1
        self.touch()

    def idle_seconds(self) -> float:
        if self.inflight:
            return 0.0
        return max(0.0, self._monotonic() - self._last_mono)

    def figures(self) -> IdleFigures:
        return IdleFigures(self.idle_seconds(), self.inflight, self._last_wall, self.draining)

    def drain(self, if_idle_for: float | None = None) -> tuple[bool, IdleFigures]:
        """Enter draining, unconditionally or only if nothing is in flight and idle >= `if_idle_for`."""
        if if_idle_for is not None and (self.inflight or self.idle_seconds() < if_idle_for):
            return False, self.figures()
        if not self.draining:
            self.draining = True
            self.drained_at = self._wall()
        return True, self.figures()

    def resume(self) -> IdleFigures:
        """Leave draining; idle time counts again from now."""
        self.draining = False
        self.drained_at = None
        self.touch()
        return self.figures()
