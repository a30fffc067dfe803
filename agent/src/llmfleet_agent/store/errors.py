"""The store's own error (no driver import, so the CLI and the app can catch it cheaply)."""

from __future__ import annotations


class StoreError(Exception):
    """The store cannot be used as configured (schema too old for this credential, no password, ...)."""
