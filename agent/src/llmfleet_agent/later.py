"""Bookkeeping put off until the event loop has a moment: one timer for many items.

A request's log line and its metrics are done after its answer has gone out; done at once, they delay the
next request that arrived meanwhile (a client's next request often comes before the bookkeeping of the last
one is over). Put off by at most `delay`, they are done while the agent waits on Ollama or on a client, and
many at a time: nginx's buffered access log (`buffer=`, `flush=`) does the same.

`Later.put_off()` says whether the work was put off: it is when it is called on a thread with a running
event loop; elsewhere (a command-line tool, another thread) the caller does the work at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

DELAY = 0.1  # seconds: what a reader of the log or of /metrics can wait for


class Later:
    def __init__(self, run: Callable[[], None], delay: float = DELAY) -> None:
        self._run = run
        self._delay = delay
        # the loop whose timer will run the work; None when none is set. A timer on a loop that closed
        # before it ran (tests run loop after loop) is not waited for: the next loop sets its own.
        self._loop: asyncio.AbstractEventLoop | None = None

    def put_off(self) -> bool:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if self._loop is not loop:
            self._loop = loop
            loop.call_later(self._delay, self._due)
        return True

    def _due(self) -> None:
        self._loop = None
        self._run()
