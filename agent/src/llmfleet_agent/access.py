"""Access log: one JSON line per request, with the key id (never the key); what the client sent is cut."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .logs import clip, event_later

REQUEST_KEY_ID = "llmfleet_key_id"
_log = logging.getLogger("llmfleet.access")


class AccessLogger(AbstractAccessLogger):
    @property
    def enabled(self) -> bool:
        """aiohttp does not call `log` when the access log's level is off."""
        return _log.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        method, path = clip(request.method), clip(request.path)
        event_later(
            _log,
            logging.INFO,
            f"{method} {path} {response.status}",
            method=method,
            path=path,
            status=response.status,
            duration_ms=round(time * 1000, 3),
            remote=clip(request.remote),
            key_id=request.get(REQUEST_KEY_ID),
        )
