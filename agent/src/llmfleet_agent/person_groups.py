"""The directory groups of the people behind requests (for their budgets), cached.

A person is looked up by the name the usage record gives them (a UPN, or a frontend user's e-mail) once
per `auth.ldap.revalidate_interval`: the first request of a person waits for the look-up, later ones use
the cached groups while a fresh look-up runs in the background. The directory away: the groups last seen
are kept; for a person never seen the groups are unknown (GroupsUnknown: budgets.py then applies the
smallest group budget) until it answers, asked again after RETRY_AWAY seconds. At most MAX_PEOPLE people
are cached (the least recently used go), at most MAX_LOOKUPS looked up at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from .budget_ledger import person_key
from .budgets import GroupsUnknown
from .directory import Directory, DirectoryUnavailable
from .logs import event

log = logging.getLogger("llmfleet.directory")
Groups = tuple[tuple[str, str], ...]
MAX_PEOPLE = 10_000
RETRY_AWAY = 30.0
# look-ups under way at most; a new person beyond them is not waited for (GroupsUnknown)
MAX_LOOKUPS = 64


_UNKNOWN = object()  # cached: the directory could not be asked, and nothing was known before


class PersonGroups:
    def __init__(self, directory: Directory, ttl: float) -> None:
        self._directory = directory
        self._ttl = ttl
        self._cache: OrderedDict[str, tuple[float, Groups | object | None]] = OrderedDict()
        self._running: dict[str, asyncio.Task[Groups | object | None]] = {}

    async def __call__(self, person: str) -> Groups | None:
        key = person_key(person)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            if cached[0] <= time.monotonic() and key not in self._running:
                self._start(key)  # stale: refreshed in the background, served meanwhile
            if cached[1] is _UNKNOWN:
                raise GroupsUnknown("the directory was unreachable")
            return cached[1]  # type: ignore[return-value]
        task = self._running.get(key)
        if task is None:
            if len(self._running) >= MAX_LOOKUPS:
                raise GroupsUnknown(f"{MAX_LOOKUPS} people are being looked up in the directory")
            task = self._start(key)
        groups = await asyncio.shield(task)
        if groups is _UNKNOWN:
            raise GroupsUnknown("the directory is unreachable")
        return groups  # type: ignore[return-value]

    def _start(self, key: str) -> asyncio.Task[Groups | object | None]:
        task = asyncio.create_task(self._look_up(key), name="directory-person")
        self._running[key] = task
        task.add_done_callback(lambda _: self._running.pop(key, None))
        return task

    async def _look_up(self, key: str) -> Groups | object | None:
        try:
            user = await self._directory.find(key)
        except DirectoryUnavailable as exc:
            event(
                log, logging.WARNING, "directory unreachable: a person's groups not looked up", error=str(exc)
            )
            cached = self._cache.get(key)
            groups = cached[1] if cached is not None else _UNKNOWN
            self._put(key, groups, RETRY_AWAY)
            return groups
        groups = None if user is None or user.unusable else user.groups
        self._put(key, groups, self._ttl)
        return groups

    def _put(self, key: str, groups: Groups | object | None, ttl: float) -> None:
        self._cache[key] = (time.monotonic() + ttl, groups)
        self._cache.move_to_end(key)
        while len(self._cache) > MAX_PEOPLE:
            self._cache.popitem(last=False)
