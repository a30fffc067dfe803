"""A child's output read in batches: its lines reach the log within `delay`, without a wakeup per line.

Ollama writes a line per request (`[GIN] ...`) to its stderr, after the answer has gone out. Read as it
came, every such line woke the agent on its own, with cold caches: about 30 us of the agent's CPU a request
at concurrency 1 (docs/performance.md). Here the pipe is watched for its first byte only; once something
is there it is read `delay` later, all of it at once, and then watched again: a busy child costs the agent
at most a few wakeups a second, an idle one none.

The pipe is enlarged (1 MiB where the system allows it) so that a child writing fast never waits on it for
long, and `drain(final=True)` (when the child has exited) and `close()` read whatever is left, so that a
child's last lines (why it exited) reach the log. A read takes at most `BATCH` bytes at a time: a child
(or a grandchild) that writes faster than the agent logs never holds the event loop for more than one
batch; the rest is read on the loop's next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable

DELAY = 0.1  # seconds a line may wait before it is logged
PIPE_SIZE = 1 << 20  # Linux's default cap for an unprivileged process (/proc/sys/fs/pipe-max-size)
MAX_LINE = 1 << 16  # a longer line is passed on in pieces of this size
BATCH = 1 << 18  # bytes read and passed on in one go, at most (about 20 ms of logging)
_READ = 1 << 16


class OutputPipe:
    """One pipe for a child's stdout or stderr: give `write_fd` to the child, then `start()`."""

    def __init__(self, on_line: Callable[[bytes], None], delay: float = DELAY) -> None:
        # both ends are close-on-exec (PEP 446): the child gets the write end only as its stdout or stderr
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)  # the read end's own flag: the child's end stays blocking
        with contextlib.suppress(OSError):  # above the system's cap: the default size (64 KiB) stays
            fcntl.fcntl(self.read_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self._on_line = on_line
        self._delay = delay
        self._partial = b""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.Handle | None = None  # the next read, set while the pipe is not watched
        self._watched = False
        self._ended = False  # the pipe's end was read: every writer has closed it
        self._closed = False

    def start(self) -> None:
        """Once the child has its end: close ours (or the pipe would never end) and watch for output."""
        self._close_write_end()
        self._loop = asyncio.get_running_loop()
        self._watch()

    def drain(self, limit: int = BATCH, final: bool = False) -> bool:
        """Pass on the lines in the pipe now, at most `limit` bytes of them; whether it may hold more.

        `final`: the child has exited, and a last line without its end is passed on too (a grandchild
        that still holds the pipe could keep it from ending)."""
        if self._closed or self._ended:
            return False
        taken = 0
        while taken < limit:
            try:
                data = os.read(self.read_fd, min(_READ, limit - taken))
            except BlockingIOError:
                if final:
                    self._pass_partial()
                return False
            if not data:
                self._end()
                return False
            taken += len(data)
            self._feed(data)
        return True

    def close(self) -> None:
        """What is left (a pipe's worth at most) passed on, the pipe closed. Idempotent."""
        if self._closed:
            return
        self.drain(PIPE_SIZE, final=True)
        self._end()
        self._closed = True
        self._close_write_end()
        os.close(self.read_fd)

    # ----- internals ---------------------------------------------------------------------------------
    def _watch(self) -> None:
        assert self._loop is not None
        self._loop.add_reader(self.read_fd, self._readable)
        self._watched = True

    def _unwatch(self) -> None:
        if self._watched and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.read_fd)
        self._watched = False

    def _readable(self) -> None:
        """Something arrived: read it, with whatever follows, `delay` later."""
        assert self._loop is not None
        self._unwatch()
        self._timer = self._loop.call_later(self._delay, self._due)

    def _due(self) -> None:
        assert self._loop is not None
        self._timer = None
        more = False
        try:
            more = self.drain()
        finally:  # whatever happened to a line, the pipe is read on: a full one would stop the child
            if not self._ended and not self._closed:
                if more:  # the rest on the loop's next turn, after what else is waiting
                    self._timer = self._loop.call_soon(self._due)
                else:
                    self._watch()

    def _feed(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._on_line(line)
        while len(self._partial) > MAX_LINE:  # a line without an end is not held without bound
            self._on_line(self._partial[:MAX_LINE])
            self._partial = self._partial[MAX_LINE:]

    def _end(self) -> None:
        self._ended = True
        self._unwatch()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pass_partial()

    def _pass_partial(self) -> None:
        if self._partial:
            partial, self._partial = self._partial, b""
            self._on_line(partial)

    def _close_write_end(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1
