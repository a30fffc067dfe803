"""The one rule for a loopback address: a listener or a server there may go without TLS (nothing crosses a
network). Used for the agent's own listener (config.py) and the store's server (store/urls.py)."""

from __future__ import annotations

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS
