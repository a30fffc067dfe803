"""Who is asking: API keys from `Authorization: Bearer <key>`, checked against a cache of the store.

The cache is reloaded every `auth.refresh_interval` seconds (so revocations made with the CLI, or on
another agent of a shared store, take effect within that time); a key not in the cache is looked up in the
store at once (so a new key works at once). Failures are logged and audited per (address, reason) and
`auth.failure_window` (`failures`).

While the store is away the agent keeps serving with the last key set it loaded: known keys keep working,
revocations apply as soon as the store answers again, and a key it has never seen gets 503 (it cannot be
checked), not 401. With a shared (remote) store the last key set is also kept in a local file (hashes only,
0600), so an agent restarted during an outage serves the keys it knew.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from aiohttp import web

from .batching import BatchWriter
from .failures import AuthFailures
from .keys import ID_LENGTH, KeyRecord, hash_secret
from .logs import event
from .roles import Role
from .store import AuditRecord, Store
from .tasks import cancel

log = logging.getLogger("llmfleet.auth")


@dataclass(frozen=True)
class AuthFailure:
    status: int  # 401; 503 when the key cannot be checked (the store is away)
    message: str
    key_id: str | None  # set when the key is one we know (revoked, expired)


STORE_AWAY = "the key store is unreachable and this key is not among the keys last loaded; try again later"
# look-ups of keys the ring does not hold: at most this many in the store at once (more: 503 at once), none
# for a second after one failed, and an id the store did not have is not asked again within the refresh
# interval (at most UNKNOWN_MAX remembered): a client sending random keys costs the store little
MAX_LOOKUPS = 8
AWAY_BACKOFF = 1.0
UNKNOWN_MAX = 10_000


def save_key_cache(path: Path, keys: list[KeyRecord]) -> None:
    """Write the key set (hashes, never secrets) atomically, readable by the owner only."""
    rows = [{**asdict(k), "role": k.role.value, "models": list(k.models)} for k in keys]
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"saved": time.time(), "keys": rows}, out)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)


def load_key_cache(path: Path) -> tuple[float, list[KeyRecord]]:
    data = json.loads(path.read_text())
    keys = [
        KeyRecord(**{**row, "role": Role(row["role"]), "models": tuple(row["models"])})
        for row in data["keys"]
    ]
    return float(data["saved"]), keys


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
        cache_path: Path | None = None,
        lookup_timeout: float = 5.0,
        personal_max_stale: float | None = None,
    ) -> None:
        self._store = store
        # personal keys whose owner the directory has not confirmed within this are refused
        self._max_stale = personal_max_stale
        # set for a shared (remote) store: it may be away, so the last key set is kept on disk
        self._cache_path = cache_path
        self._lookup_timeout = lookup_timeout
        self._lookups = 0
        self._away_until = 0.0
        self._unknown: dict[str, float] = {}
        self._refresh_failing = False
        self._interval = refresh_interval
        self._failures = AuthFailures(audit.add, failure_window)
        self._keys: dict[str, KeyRecord] = {}
        self._used: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self.reload()
        except Exception as exc:
            if self._cache_path is None:
                raise  # a local store that cannot be read is an error
            if not self._cache_path.exists():
                event(
                    log,
                    logging.ERROR,
                    "key store unreachable at start and no keys cached: every key gets 503 until it answers",
                    error=repr(exc),
                )
                self._task = asyncio.create_task(self._loop(), name="key-refresh")
                return
            saved, keys = load_key_cache(self._cache_path)
            self._keys = {k.id: k for k in keys}
            event(
                log,
                logging.ERROR,
                "key store unreachable at start; serving the keys last loaded",
                keys=len(keys),
                loaded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(saved)),
                error=repr(exc),
            )
        self._task = asyncio.create_task(self._loop(), name="key-refresh")

    async def stop(self) -> None:
        await cancel(self._task)
        self._failures.flush()
        await self._flush_used()

    async def reload(self) -> None:
        keys = await self._store.list_keys()
        fresh = {k.id: k for k in keys}
        if self._cache_path is not None and fresh != self._keys:
            try:
                save_key_cache(self._cache_path, keys)
            except OSError as exc:
                event(log, logging.WARNING, "could not save the key cache", error=repr(exc))
        self._keys = fresh

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
                if not self._refresh_failing:  # once per episode, not every interval
                    event(log, logging.WARNING, "key refresh failed; keeping cached keys", error=repr(exc))
                self._refresh_failing = True
                continue
            if self._refresh_failing:
                event(log, logging.INFO, "key refresh works again")
                self._refresh_failing = False

    async def authenticate(self, request: web.Request) -> KeyRecord | AuthFailure:
        secret = bearer_token(request)
        if secret is None:
            return self._fail(request, "missing credential: send Authorization: Bearer <key>", None)
        digest = hash_secret(secret)
        key_id = digest[:ID_LENGTH]  # key_id_for(secret), without hashing it twice
        record = self._keys.get(key_id)
        if record is None:
            looked_up = await self._look_up(request, key_id)
            if isinstance(looked_up, AuthFailure):
                return looked_up
            record = looked_up
        if record is None or not record.matches_hash(digest):
            return self._fail(request, "invalid credential", None)
        refusal = record.refusal()
        stale = (
            record.personal
            and self._max_stale is not None
            and time.time() - (record.checked or 0.0) > self._max_stale
        )
        if refusal is None and stale:
            refusal = (
                f"key {record.id}: the directory has not confirmed its owner's account for more than"
                f" {self._max_stale:g} s (auth.ldap.max_stale)"
            )
        if refusal is not None:
            return self._fail(request, refusal, record.id)
        self._used[record.id] = time.time()
        return record

    async def _look_up(self, request: web.Request, key_id: str) -> KeyRecord | AuthFailure | None:
        """A key the ring does not hold, from the store (bounded: see MAX_LOOKUPS)."""
        now = time.monotonic()
        if self._unknown.get(key_id, 0.0) > now:
            return None
        if now < self._away_until or self._lookups >= MAX_LOOKUPS:
            return self._unavailable(request)
        self._lookups += 1
        try:
            record = await asyncio.wait_for(self._store.get_key(key_id), self._lookup_timeout)
        except Exception:
            self._away_until = time.monotonic() + AWAY_BACKOFF
            return self._unavailable(request)
        finally:
            self._lookups -= 1
        if record is None:
            if len(self._unknown) >= UNKNOWN_MAX:
                self._unknown.clear()
            self._unknown[key_id] = now + self._interval
            return None
        self._keys[key_id] = record
        return record

    def _unavailable(self, request: web.Request) -> AuthFailure:
        # counted and logged like other failures: once per (address, reason) and window
        self._failures.record(request.remote, STORE_AWAY, None, request.method, request.path)
        return AuthFailure(503, STORE_AWAY, None)

    def record_failure(self, request: web.Request, message: str) -> None:
        """A failure decided elsewhere (a directory login), counted and audited like a key's."""
        self._failures.record(request.remote, message, None, request.method, request.path)

    def _fail(self, request: web.Request, message: str, key_id: str | None) -> AuthFailure:
        self._failures.record(request.remote, message, key_id, request.method, request.path)
        return AuthFailure(401, message, key_id)
