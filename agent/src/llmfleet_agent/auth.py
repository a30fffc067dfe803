"""Who is asking: API keys from `Authorization: Bearer <key>`, checked against a cache of the store.

The cache is reloaded every `auth.refresh_interval` seconds (so revocations made with the CLI take effect
within that time); a key not in the cache is looked up in the store at once (so a new key works at once).
Failures are logged and audited per (address, reason) and `auth.failure_window` (`failures`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from aiohttp import web

from .batching import BatchWriter
from .failures import AuthFailures
from .keys import KeyRecord, key_id_for
from .logs import event
from .store import AuditRecord, Store

log = logging.getLogger("llmfleet.auth")


@dataclass(frozen=True)
class AuthFailure:
    status: int  # 401
    message: str
    key_id: str | None  # set when the key is one we know (revoked, expired)


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class KeyRing:
    def __init__(
        self,
        store: Store,
        refresh_interval: float,
        audit: BatchWriter[AuditRecord],
        failure_window: float = 60.0,
    ) -> None:
        self._store = store
        self._interval = refresh_interval
        self._failures = AuthFailures(audit.add, failure_window)
        self._keys: dict[str, KeyRecord] = {}
        self._used: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.reload()
        self._task = asyncio.create_task(self._loop(), name="key-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._failures.flush()
        await self._flush_used()

    async def reload(self) -> None:
        self._keys = {k.id: k for k in await self._store.list_keys()}

    async def _flush_used(self) -> None:
        used, self._used = self._used, {}
        try:
            await self._store.touch_keys(used)
        except Exception as exc:
            self._used = {**used, **self._used}
            event(log, logging.WARNING, "could not record key use", error=repr(exc))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._flush_used()
                await self.reload()
            except Exception as exc:  # a store hiccup must not end the refresh loop
                event(log, logging.WARNING, "key refresh failed; keeping cached keys", error=repr(exc))

    async def authenticate(self, request: web.Request) -> KeyRecord | AuthFailure:
        secret = bearer_token(request)
        if secret is None:
            return self._fail(request, "missing credential: send Authorization: Bearer <key>", None)
        key_id = key_id_for(secret)
        record = self._keys.get(key_id)
        if record is None:
            record = await self._store.get_key(key_id)
            if record is not None:
                self._keys[key_id] = record
        if record is None or not record.matches(secret):
            return self._fail(request, "invalid credential", None)
        refusal = record.refusal()
        if refusal is not None:
            return self._fail(request, refusal, record.id)
        self._used[record.id] = time.time()
        return record

    def _fail(self, request: web.Request, message: str, key_id: str | None) -> AuthFailure:
        self._failures.record(request.remote, message, key_id, request.method, request.path)
        return AuthFailure(401, message, key_id)
