"""Logging to stderr in the shape `ollama serve` uses: key=value lines and GIN-style request lines."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("llmfleet_sim")
_access = logging.getLogger("llmfleet_sim.access")


def configure() -> None:
    """Send both loggers to stderr, once."""
    if log.handlers:
        return
    server = logging.StreamHandler(sys.stderr)
    server.setFormatter(
        logging.Formatter(
            'time=%(asctime)s.%(msecs)03d level=%(levelname)s source=sim msg="%(message)s"',
            "%Y-%m-%dT%H:%M:%S",
        )
    )
    log.addHandler(server)
    log.setLevel(logging.INFO)
    log.propagate = False
    plain = logging.StreamHandler(sys.stderr)
    plain.setFormatter(logging.Formatter("%(message)s"))
    _access.addHandler(plain)
    _access.setLevel(logging.INFO)
    _access.propagate = False


def access(status: int, elapsed_s: float, remote: str | None, method: str, path: str) -> None:
    """One line per request, like Ollama's `[GIN] 2024/05/01 - 12:00:00 | 200 | 1.2ms | ... | POST "/x"`."""
    stamp = time.strftime("%Y/%m/%d - %H:%M:%S")
    took = f"{elapsed_s * 1000:.3f}ms" if elapsed_s < 1 else f"{elapsed_s:.3f}s"
    _access.info('[GIN] %s | %3d | %12s | %15s | %-7s "%s"', stamp, status, took, remote or "-", method, path)
