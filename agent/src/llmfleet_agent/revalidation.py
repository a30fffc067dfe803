"""Revalidation: personal keys follow their owner's account.

Every `auth.ldap.revalidate_interval` one agent of the fleet (whichever holds the store's lease
`ldap-revalidate`) looks up the owner of every active personal key by objectGUID, with the service account:

- gone from the directory, disabled, locked out, expired, or in none of the mapped groups: the owner's keys
  are suspended with that reason (401 saying why, on every agent within `auth.refresh_interval`);
- otherwise a key keeps what it had, narrowed to the owner's current grant (a promotion never widens old
  keys; a key left with no model is suspended), any suspension is lifted, and `checked` records the
  confirmation.

When the directory does not answer nothing changes: the keys keep working until `checked` is older than
`auth.ldap.max_stale` (auth.py refuses them then). Every suspension and lifting is audited.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from .batching import BatchWriter
from .config import LdapConfig
from .directory import Directory, DirectoryUnavailable, DirectoryUser
from .entitlements import Grant, grant_for, narrowed
from .keys import KeyRecord
from .logs import event
from .store import AuditRecord, Store
from .tasks import cancel

log = logging.getLogger("llmfleet.revalidation")
LEASE = "ldap-revalidate"


class Revalidator:
    def __init__(
        self,
        store: Store,
        directory: Directory,
        cfg: LdapConfig,
        audit: BatchWriter[AuditRecord],
        holder: str,
    ) -> None:
        self._store = store
        self._directory = directory
        self._cfg = cfg
        self._audit = audit
        self._holder = holder
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="ldap-revalidate")

    async def stop(self) -> None:
        await cancel(self._task)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.revalidate_interval)
            try:
                # held a little longer than the interval, so the holder keeps it while it is alive
                if await self._store.take_lease(LEASE, self._holder, self._cfg.revalidate_interval * 1.5):
                    await self.run_once()
            except Exception as exc:  # a store or directory hiccup must not end the loop
                event(log, logging.WARNING, "revalidation of personal keys failed", error=repr(exc))

    async def run_once(self) -> int:
        """Look up every owner of an active personal key once; the number of keys changed."""
        now = time.time()
        owners: dict[str, list[KeyRecord]] = {}
        for key in await self._store.list_keys():
            if key.personal and key.revoked is None and (key.expires is None or key.expires > now):
                owners.setdefault(key.owner_id or "", []).append(key)
        order = list(owners)
        random.shuffle(order)  # a run cut short by an outage does not always leave the same owners behind
        changed = 0
        for owner_id in order:
            try:
                user = await self._directory.lookup(owner_id)
            except DirectoryUnavailable as exc:
                event(
                    log,
                    logging.WARNING,
                    "directory unreachable: personal keys not revalidated",
                    error=str(exc),
                )
                return changed
            grant = None if user is None or user.unusable else grant_for(user.groups, self._cfg.groups)
            for key in owners[owner_id]:
                try:
                    changed += await self._apply(key, user, grant)
                except Exception as exc:  # one key's trouble does not stop the others'
                    event(
                        log,
                        logging.WARNING,
                        "could not revalidate a personal key",
                        key_id=key.id,
                        error=repr(exc),
                    )
        return changed

    async def _apply(self, key: KeyRecord, user: DirectoryUser | None, grant: Grant | None) -> int:
        current = Grant(key.role, key.models)
        kept = narrowed(current, grant) if grant is not None else None
        if user is None:
            reason: str | None = "its owner's account no longer exists in the directory"
        elif user.unusable:
            reason = f"its owner's account: {user.unusable}"
        elif grant is None:
            reason = "its owner is no longer in a group that may use this service"
        elif kept is None:
            reason = "its owner may no longer use any of its models"
        else:
            reason = None
        after = kept or current
        await self._store.set_key_grant(
            key.id, after.role, after.models, reason, None if reason else time.time()
        )
        if reason == key.suspended and after == current:
            return 0
        detail = {
            "owner": key.owner or "",
            "suspended": reason,
            "role": after.role.value,
            "models": list(after.models),
        }
        self._audit.add(AuditRecord("key_revalidated", key.id, detail))
        return 1
