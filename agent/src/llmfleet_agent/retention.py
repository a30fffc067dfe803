"""Old records go: audit and usage rows older than `store.audit_retention` and `store.usage_retention` are
deleted at start and then hourly (a PostgreSQL store applies the fleet's settings in the database
instead). A store that fails is logged and tried again the next hour."""

from __future__ import annotations

import asyncio
import logging
import time

from .config import StoreConfig
from .logs import event
from .store import Store
from .tasks import cancel

log = logging.getLogger("llmfleet.retention")

PRUNE_INTERVAL = 3600.0


def _before(now: float, retention: float | None) -> float | None:
    return None if retention is None else now - retention


class Pruner:
    def __init__(self, store: Store, cfg: StoreConfig, interval: float = PRUNE_INTERVAL) -> None:
        self._store = store
        self._cfg = cfg
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    async def prune(self) -> None:
        now = time.time()
        try:
            audit, usage = await self._store.prune(
                _before(now, self._cfg.audit_retention), _before(now, self._cfg.usage_retention)
            )
        except Exception as exc:  # a store hiccup must not end the task
            event(log, logging.WARNING, "could not prune old records; trying again later", error=repr(exc))
            return
        if audit or usage:
            event(log, logging.INFO, "pruned old records", audit=audit, usage=usage)

    async def _loop(self) -> None:
        while True:
            await self.prune()
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        local = self._cfg.sqlite_path is not None  # a shared store's retention is the database's setting
        if local and self._cfg.audit_retention is None and self._cfg.usage_retention is None:
            return  # everything is kept for ever
        self._task = asyncio.create_task(self._loop(), name="prune-records")

    async def stop(self) -> None:
        await cancel(self._task)
