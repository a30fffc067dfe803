"""Access log: one JSON line per request, with the key id (never the key)."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .logs import event

REQUEST_KEY_ID = "llmfleet_key_id"


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        event(
            logging.getLogger("llmfleet.access"),
            logging.INFO,
            f"{request.method} {request.path} {response.status}",
            method=request.method,
            path=request.path,
            status=response.status,
            duration_ms=round(time * 1000, 3),
            remote=request.remote,
            key_id=request.get(REQUEST_KEY_ID),
        )
