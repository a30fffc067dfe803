"""Writes records off the request path: buffered in memory, flushed in batches, retried while the store
is down, and flushed once more on shutdown so a clean stop loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from .logs import event

log = logging.getLogger("llmfleet.batching")

T = TypeVar("T")
# what a store raises for a record it can never take (as opposed to being away)
_DATA_ERRORS = (ValueError, TypeError)


class BatchWriter(Generic[T]):
    def __init__(
        self,
        name: str,
        write: Callable[[list[T]], Awaitable[None]],
        interval: float = 1.0,
        batch_size: int = 500,
    ) -> None:
        self.name = name
        self._write = write
        self.interval = interval
        self.batch_size = batch_size
        self._pending: list[T] = []
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.written = 0
        self.dropped = 0

    def add(self, record: T) -> None:
        """Never blocks and never fails: the record is kept until the store takes it."""
        self._pending.append(record)
        if len(self._pending) >= self.batch_size:
            self._kick.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> bool:
        """Write what is pending; False (records kept) when the store refused."""
        while self._pending:
            batch = self._pending[: self.batch_size]
            try:
                await self._write(batch)
            except _DATA_ERRORS:
                # a record the store cannot take (bad text, say) must not hold back the others for ever
                if not await self._write_one_by_one(batch):
                    return False
                continue
            except Exception as exc:
                self._failed(exc)
                return False
            self._written(len(batch))
        return True

    async def _write_one_by_one(self, batch: list[T]) -> bool:
        for record in batch:
            try:
                await self._write([record])
            except _DATA_ERRORS as exc:
                self.dropped += 1
                message = f"{self.name}: a record the store refused is dropped"
                event(log, logging.ERROR, message, error=repr(exc))
                del self._pending[0]
                continue
            except Exception as exc:
                self._failed(exc)
                return False
            self._written(1)
        return True

    def _written(self, count: int) -> None:
        del self._pending[:count]
        self.written += count
        if self._failing:
            event(log, logging.INFO, f"{self.name}: store writes work again")
            self._failing = False

    def _failed(self, exc: Exception) -> None:
        if not self._failing:
            event(
                log,
                logging.ERROR,
                f"{self.name}: store write failed; keeping records",
                pending=len(self._pending),
                error=repr(exc),
            )
        self._failing = True

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout=self.interval)
            self._kick.clear()
            await self.flush()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batch-writer-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not await self.flush():
            event(
                log, logging.ERROR, f"{self.name}: records not written at shutdown", lost=len(self._pending)
            )
