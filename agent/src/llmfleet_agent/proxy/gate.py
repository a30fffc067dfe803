"""The proxy's requests in flight, and how they end when the agent stops.

On SIGTERM aiohttp stops listening, then the gate closes: new requests on open connections are refused
(503), those in flight get `listen.shutdown_timeout` to finish, and whatever is still running then is cut:
its task is cancelled with a reason, and the proxy ends the answer in its own framing ("agent shutting
down") and records it with that status and error. One grace in all; aiohttp's own wait after it is a
short backstop.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..logs import event

log = logging.getLogger("llmfleet.proxy")

SHUTTING_DOWN = "agent shutting down"
# after the grace: how long a cut request may take to write its last line and its record
CUT_GRACE = 3.0


class Gate:
    def __init__(self) -> None:
        self.closing = False
        self._tasks: dict[asyncio.Task[object], list[str]] = {}
        self._empty = asyncio.Event()
        self._empty.set()

    def enter(self) -> list[str] | None:
        """Register the current task; None when closing. The list receives the reason if it is cut."""
        if self.closing:
            return None
        task = asyncio.current_task()
        assert task is not None
        reason: list[str] = []
        self._tasks[task] = reason
        self._empty.clear()
        return reason

    def leave(self) -> None:
        task = asyncio.current_task()
        self._tasks.pop(task, None)  # type: ignore[arg-type]
        if not self._tasks:
            self._empty.set()

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    async def close(self, grace: float) -> None:
        """Refuse new requests, wait up to `grace` for those in flight, then cut the rest."""
        self.closing = True
        started = time.monotonic()
        if self._tasks:
            event(log, logging.INFO, "stopping: waiting for requests in flight", inflight=len(self._tasks))
        try:
            await asyncio.wait_for(self._empty.wait(), timeout=grace)
            return
        except asyncio.TimeoutError:
            pass
        event(
            log,
            logging.WARNING,
            f"stopping: cutting {len(self._tasks)} request(s) still in flight after {grace:g}s",
            waited=round(time.monotonic() - started, 3),
        )
        for task, reason in list(self._tasks.items()):
            reason.append(SHUTTING_DOWN)
            task.cancel(SHUTTING_DOWN)
        try:
            await asyncio.wait_for(self._empty.wait(), timeout=CUT_GRACE)
        except asyncio.TimeoutError:
            event(log, logging.ERROR, "stopping: requests did not end after the cut", left=len(self._tasks))
