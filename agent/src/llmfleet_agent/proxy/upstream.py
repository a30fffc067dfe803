"""Where a proxied request goes: the host's Ollama (the agent), or one of the fleet's agents (the gateway,
gateway/routing.py). A target is tried in order; one that refuses the connection (nothing was sent) makes
way for the next."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web


@dataclass
class Target:
    name: str  # for messages: "ollama", or a host's id
    base_url: str
    headers: dict[str, str] = field(default_factory=dict)  # added to the forwarded request
    # the target writes the usage record of a request it answers as its own (an agent behind the gateway:
    # its answer carries our X-Request-Id); this process records every other outcome
    records: bool = False
    on_attempt: Callable[[], None] | None = None
    on_connected: Callable[[], None] | None = None
    on_failed: Callable[[str], None] | None = None

    def attempt(self) -> None:
        if self.on_attempt is not None:
            self.on_attempt()

    def connected(self) -> None:
        if self.on_connected is not None:
            self.on_connected()

    def failed(self, error: str) -> None:
        if self.on_failed is not None:
            self.on_failed(error)


Forward = Callable[[list[Target]], Awaitable[web.StreamResponse]]


class Upstream(Protocol):
    async def forward(self, request: web.Request, ex: object, send: Forward) -> web.StreamResponse:
        """Choose the targets for the request and `send` it to them (raising the handler's Refused when
        there are none)."""
