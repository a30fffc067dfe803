"""Writes records off the request path: buffered in memory, written to the store in batches.

With a spool (spool.py), no record waits in memory for long: a batch the store does not take (away, or
slower than `write_timeout`) goes to the spool on local disk, and while the spool holds records every new
batch goes there too, behind them, so the store gets the records in the order they came. Each pass
replays the spool first (oldest first), then writes what is in memory; once the spool is empty the writer
writes directly again. A clean stop writes what is left to the store, else to the spool, which the next
start replays. Without a spool records wait in memory and are retried (the earlier behaviour).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from .logs import clip, event
from .spool import Spool
from .tasks import cancel

log = logging.getLogger("llmfleet.batching")

T = TypeVar("T")
R = TypeVar("R")
# what a store raises for a record it can never take (as opposed to being away)
_DATA_ERRORS = (ValueError, TypeError)


class BatchWriter(Generic[T]):
    def __init__(
        self,
        name: str,
        write: Callable[[list[T]], Awaitable[None]],
        interval: float = 1.0,
        batch_size: int = 500,
        spool: Spool[T] | None = None,
        write_timeout: float | None = None,
        close_timeout: float = 5.0,
    ) -> None:
        self.name = name
        self._write = write
        self.interval = interval
        self.batch_size = batch_size
        # a write that takes longer counts as the store being away (its records go to the spool)
        self.write_timeout = write_timeout
        # at a clean stop, how long the store gets for what is left before it goes to the spool
        self.close_timeout = close_timeout
        self.spool = spool
        self._executor: ThreadPoolExecutor | None = None  # the spool's file work, in order, off the loop
        self._pending: list[T] = []
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self._loop_error: str | None = None
        self.written = 0
        self.dropped = 0  # records the store refused for good (a data error)

    def add(self, record: T) -> None:
        """Never blocks and never fails: the record is kept until the store (or the spool) takes it."""
        self._pending.append(record)
        if len(self._pending) >= self.batch_size:
            self._kick.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def _failing(self) -> bool:
        return self.failing_since is not None

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The writer's figures for /agent/status."""
        out: dict[str, Any] = {
            "pending": self.pending,
            "written": self.written,
            "refused": self.dropped,
            "last_write_ok": not self._failing,
            "failing_since": self.failing_since,
            "last_error": self.last_error,
        }
        if self.spool is not None:
            out["spool"] = self.spool.snapshot(now)
        return out

    # ----- one pass -----
    async def flush(self) -> bool:
        """One pass: the spool's records (oldest first), then what is in memory. True when all of it is in
        the store; else what is left is in the spool (without one: kept in memory)."""
        if self.spool is not None:
            try:
                replayed = await self._replay()
            except Exception:  # the spool cannot be read: memory still goes to it, behind
                await self._to_spool()
                raise
            if not replayed:
                await self._to_spool()
                return False
        while self._pending:
            batch = self._pending[: self.batch_size]
            handled, ok = await self._store(batch)
            del self._pending[:handled]
            if not ok:
                await self._to_spool()
                return False
        return True

    async def _replay(self) -> bool:
        """Write the spool's records to the store; True once it is empty."""
        spool = self.spool
        assert spool is not None
        while not spool.empty:
            chunk = await self._io(spool.read, self.batch_size)
            if chunk is None:
                break
            if chunk.records:
                _, ok = await self._store(chunk.records)
                if not ok:
                    return False  # the chunk stays; records the store took of it are skipped next time
            await self._io(spool.commit, chunk)
            if len(self._pending) >= self.batch_size:
                await self._to_spool()  # a long replay: newer records wait behind the older, on disk
        return True

    async def _to_spool(self) -> None:
        """Move what is in memory to the spool, in order, behind what it holds. A batch leaves memory once
        the spool has it (or dropped it: full); cancelled halfway, it stays and may be spooled twice, which
        the store's idempotent inserts absorb."""
        if self.spool is None:
            return
        while self._pending:
            batch = self._pending[: self.batch_size]
            await self._io(self.spool.append, batch)
            del self._pending[: len(batch)]

    async def _store(self, batch: list[T]) -> tuple[int, bool]:
        """Write the batch: (how many of its first records are done with, whether the store took all). A
        record the store can never take is dropped, so it does not hold back the others for ever."""
        try:
            await self._timed_write(batch)
        except _DATA_ERRORS:
            pass  # find the record, one by one
        except Exception as exc:
            self._failed(exc)
            return 0, False
        else:
            self._written(len(batch))
            return len(batch), True
        for index, record in enumerate(batch):
            try:
                await self._timed_write([record])
            except _DATA_ERRORS as exc:
                self.dropped += 1
                message = f"{self.name}: a record the store refused is dropped"
                event(log, logging.ERROR, message, error=repr(exc))
            except Exception as exc:
                self._failed(exc)
                return index, False
            else:
                self._written(1)
        return len(batch), True

    async def _timed_write(self, batch: list[T]) -> None:
        if self.write_timeout is None:
            await self._write(batch)
            return
        try:
            await asyncio.wait_for(self._write(batch), self.write_timeout)
        except asyncio.TimeoutError:  # not builtins.TimeoutError before Python 3.11
            raise TimeoutError(f"the store took more than {self.write_timeout:g}s") from None

    async def _io(self, fn: Callable[..., R], *args: Any) -> R:
        assert self._executor is not None, "the writer with a spool is not open"
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _written(self, count: int) -> None:
        self.written += count
        if self._failing:
            down = time.time() - (self.failing_since or 0.0)
            event(log, logging.INFO, f"{self.name}: store writes work again", failed_for=round(down, 1))
            self.failing_since = None

    def _failed(self, exc: Exception) -> None:
        self.last_error = clip(repr(exc))
        if not self._failing:
            where = "in the spool" if self.spool is not None else "in memory"
            event(
                log,
                logging.ERROR,
                f"{self.name}: store write failed; records wait {where}",
                pending=len(self._pending),
                error=self.last_error,
            )
            self.failing_since = time.time()

    # ----- the loop -----
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        last_try = loop.time()
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout=self.interval)
            self._kick.clear()
            try:
                if self._failing and self.spool is not None and loop.time() - last_try < self.interval:
                    # a full batch while the store is away: to disk; the store is tried once an interval
                    await self._to_spool()
                else:
                    last_try = loop.time()
                    await self.flush()
            except Exception as exc:  # the spool's disk, say: logged once, tried again next interval
                if repr(exc) != self._loop_error:
                    self._loop_error = repr(exc)
                    event(log, logging.ERROR, f"{self.name}: writer pass failed", error=repr(exc))
            else:
                self._loop_error = None

    async def open(self) -> None:
        """Open the spool (what an earlier run left is replayed first) and start writing."""
        if self.spool is not None and self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"spool-{self.name}")
            await self._io(self.spool.open)
            if not self.spool.empty:
                event(
                    log,
                    logging.WARNING,
                    f"{self.name}: records an earlier run spooled are written first",
                    records=self.spool.records,
                    bytes=self.spool.bytes,
                )
                self._kick.set()
        self.start()

    def start(self) -> None:
        assert self.spool is None or self._executor is not None, "a writer with a spool starts with open()"
        self._task = asyncio.create_task(self._loop(), name=f"batch-writer-{self.name}")

    async def close(self) -> None:
        """Stop the loop; write what is left to the store, else to the spool (for the next start)."""
        await cancel(self._task)
        if self.spool is None:
            if not await self.flush():
                event(
                    log,
                    logging.ERROR,
                    f"{self.name}: records not written at shutdown",
                    lost=len(self._pending),
                )
            return
        if self._executor is None:
            return  # never opened
        if not self._failing:  # the store worked last time: it gets a short last chance
            try:
                await asyncio.wait_for(self.flush(), self.close_timeout)
            except Exception as exc:  # a timeout, or the spool's disk
                event(log, logging.WARNING, f"{self.name}: last write at shutdown failed", error=repr(exc))
        try:
            await self._to_spool()
        except Exception as exc:
            event(
                log,
                logging.ERROR,
                f"{self.name}: records not spooled at shutdown",
                lost=self.pending,
                error=repr(exc),
            )
        if not self.spool.empty:
            event(
                log,
                logging.WARNING,
                f"{self.name}: records wait in the spool for the next start",
                records=self.spool.records,
                spool=str(self.spool.directory),
            )
        await self._io(self.spool.close)
        self._executor.shutdown(wait=True)
        self._executor = None
