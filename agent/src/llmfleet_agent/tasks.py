"""Background tasks of the agent's long-lived parts (refresh loops, sweeps, flushes): how one ends."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has ended; its cancellation is no error. Whoever stops a part may be
    cancelled itself (aiohttp runs the cleanup of SIGTERM's shutdown in its cancelled main task), and the
    part's stop must still run to its end: the caller's cancellation is not told apart."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
