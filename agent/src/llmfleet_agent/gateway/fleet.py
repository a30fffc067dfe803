"""The fleet as the gateway sees it: which hosts there are (a fixed list, or EC2 instances tagged with the
deployment), and for each running one whether its agent is ready, which models it has, and its model
lists, asked every `gateway.refresh_interval` with the gateway's key (reads: they never count as use on
a host, so polling keeps no host awake). A host whose connections fail `eject_after` times in a row gets
no traffic for `eject_for` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ..config import GatewayConfig
from ..logs import clip, event
from ..models import InvalidName, parse_name
from ..tasks import cancel
from .ec2 import Ec2, Instance

log = logging.getLogger("llmfleet.gateway")
POLL_TIMEOUT = 3.0
LISTS_REFRESH = 600.0


def model_key(name: str) -> str | None:
    """A model's name as Ollama finds it (`name:tag`, default registry dropped, case ignored)."""
    try:
        return parse_name(name).full.lower()
    except InvalidName:
        return None


@dataclass
class Host:
    id: str
    url: str
    state: str = "running"  # the instance's state (EC2), or running for a fixed host
    ready: bool = False
    reasons: list[str] = field(default_factory=list)
    models: set[str] = field(default_factory=set)  # model_key of each model present
    declared: set[str] = field(default_factory=set)  # model_key of each model its tag names (when stopped)
    reason: str = ""  # its instance's state reason code
    instance_type: str = ""
    instance_tags: dict[str, str] = field(default_factory=dict)
    up_since: float | None = None  # when this gateway first saw it pending or running (monotonic)
    tags: list[dict[str, Any]] = field(default_factory=list)  # its /api/tags entries
    openai_models: list[dict[str, Any]] = field(default_factory=list)  # its /v1/models entries
    inflight: int = 0  # what the agent last said
    routed: int = 0  # the gateway's requests on it now
    failures: int = 0
    ejected_until: float = 0.0
    last_error: str | None = None
    checked_at: float | None = None
    lists_at: float | None = None  # when its model lists were last read (monotonic)

    def usable(self, now: float) -> bool:
        return self.state == "running" and self.ready and self.ejected_until <= now

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "state": self.state,
            "ready": self.ready,
            "reasons": self.reasons,
            "models": sorted(self.models),
            "declared": sorted(self.declared),
            "inflight": self.inflight,
            "routed": self.routed,
            "ejected_for": max(0.0, round(self.ejected_until - now, 1)) or None,
            "last_error": self.last_error,
            "checked_at": self.checked_at,
        }


class Fleet:
    def __init__(self, cfg: GatewayConfig, key: str, tls: ssl.SSLContext) -> None:
        self.cfg = cfg
        # polling has connections of its own: a pool full of long answers never starves it
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=32, ssl=tls), auto_decompress=True
        )
        self._key = key
        self.ec2 = Ec2(cfg)
        self.hosts: dict[str, Host] = {}
        self.refreshed_at: float | None = None
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="gateway-fleet")

    async def stop(self) -> None:
        await cancel(self._task)
        await self._session.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.refresh_interval)
            await self.refresh()

    # --- discovery -----------------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Discover the hosts and ask the running ones; one look at a time (a wake asking for one while the
        interval's is under way waits for that one)."""
        if self._refreshing is None:
            self._refreshing = asyncio.create_task(self._refresh(), name="gateway-fleet-refresh")
            self._refreshing.add_done_callback(self._refreshed)
        await asyncio.shield(self._refreshing)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        if self._refreshing is task:
            self._refreshing = None

    async def _refresh(self) -> None:
        try:
            found = await self._discover()
        except Exception as exc:  # EC2 away: keep the hosts last known, poll them
            self.last_error = clip(f"discovery: {exc!r}")
            event(log, logging.WARNING, "could not discover the fleet's hosts", error=self.last_error)
            found = [
                Instance(h.id, h.url, h.state, sorted(h.declared), h.reason, h.instance_type, h.instance_tags)
                for h in self.hosts.values()
            ]
        else:
            self.last_error = None
        hosts = {}
        for seen in found:
            host = self.hosts.get(seen.id) or Host(seen.id, seen.url)
            up = ("pending", "running")
            if seen.state not in up:
                host.up_since = None
            elif host.up_since is None or host.state not in up:
                host.up_since = time.monotonic()
            host.url, host.state, host.reason = seen.url, seen.state, seen.reason
            host.instance_type, host.instance_tags = seen.instance_type, seen.tags
            host.declared = {k for k in (model_key(m) for m in seen.declared) if k}
            hosts[seen.id] = host
        self.hosts = hosts
        await asyncio.gather(*(self._poll(h) for h in hosts.values() if h.state == "running"))
        for host in hosts.values():
            if host.state != "running":
                host.ready, host.reasons = False, [f"the instance is {host.state}"]
        self.refreshed_at = time.time()

    async def _discover(self) -> list[Instance]:
        if self.cfg.hosts:
            return [Instance(h.id, h.url, "running") for h in self.cfg.hosts]
        return await asyncio.get_running_loop().run_in_executor(None, self.ec2.describe)

    # --- asking a host ---------------------------------------------------------------------------------
    async def _get(self, host: Host, path: str, auth: bool) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self._key}"} if auth else {}
        timeout = aiohttp.ClientTimeout(total=POLL_TIMEOUT)
        async with self._session.get(
            host.url + path, headers=headers, timeout=timeout, allow_redirects=False
        ) as answer:
            return answer.status, await answer.json(content_type=None)

    async def call(self, host: Host, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One control request to a host's agent with the gateway's key (the idle sweep's drain and resume):
        (status, JSON body). aiohttp's errors when it does not answer."""
        headers = {"Authorization": f"Bearer {self._key}"}
        timeout = aiohttp.ClientTimeout(total=POLL_TIMEOUT)
        async with self._session.request(
            method, host.url + path, json=body, headers=headers, timeout=timeout, allow_redirects=False
        ) as answer:
            return answer.status, await answer.json(content_type=None)

    def unreachable(self, exc: BaseException) -> str:
        """An error's text without the gateway's key (an error's text may carry the request's headers)."""
        return f"{type(exc).__name__}: {exc}".replace(self._key, "***")

    async def _poll(self, host: Host) -> None:
        try:
            status, body = await self._get(host, "/agent/status", auth=True)
            if status != 200:
                raise RuntimeError(f"/agent/status answered {status}: {clip(str(body))}")
            host.ready = bool(body["ready"]["ready"])
            host.reasons = list(body["ready"]["reasons"])
            present = body["ollama"]["models"]["present"] or []
            models = {k for k in (model_key(m) for m in present) if k}
            changed = models != host.models or host.lists_at is None
            host.models = models
            host.inflight = int(body["idle"]["inflight"])
            # the model lists when the models changed (or every LISTS_REFRESH): each is a request the host
            # records, and polling must not fill the usage records
            stale = host.lists_at is None or time.monotonic() - host.lists_at >= LISTS_REFRESH
            if host.ready and (changed or stale):
                tags_status, tags = await self._get(host, "/api/tags", auth=True)
                models_status, models = await self._get(host, "/v1/models", auth=True)
                if tags_status == 200:
                    host.tags = list(tags.get("models", []))
                if models_status == 200:
                    host.openai_models = list(models.get("data", []))
                host.lists_at = time.monotonic()
        except Exception as exc:
            host.ready = False
            # an error's text may carry the request's headers: never the gateway's key
            error = self.unreachable(exc)
            host.reasons = [clip(f"not reachable: {error}") or "not reachable"]
            host.last_error = host.reasons[0]
        host.checked_at = time.time()

    # --- routing feedback ----------------------------------------------------------------------------------
    def connected(self, host: Host) -> None:
        host.failures = 0

    def failed(self, host: Host, error: str) -> None:
        host.failures += 1
        host.last_error = clip(error)
        if host.failures >= self.cfg.eject_after:
            host.ejected_until = time.monotonic() + self.cfg.eject_for
            host.failures = 0
            event(
                log,
                logging.WARNING,
                "host taken out of rotation",
                host=host.id,
                seconds=self.cfg.eject_for,
                error=host.last_error,
            )

    def candidates(self, model: str | None) -> tuple[list[Host], list[Host]]:
        """(the usable hosts for `model`, fewest requests first; every host that has it at all: that had it
        when last asked, or whose llmfleet:models tag names it)."""
        now = time.monotonic()
        key = model_key(model) if model else None
        having = [h for h in self.hosts.values() if key is None or key in h.models or key in h.declared]
        # routed to only when its agent has the model (a tag may name one the host has not pulled)
        usable = [h for h in having if (key is None or key in h.models) and h.usable(now)]
        usable.sort(key=lambda h: (h.routed, h.inflight))
        return usable, having
