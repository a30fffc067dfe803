"""Where keys and records live. SQLite is the embedded default."""

from __future__ import annotations

from ..config import StoreConfig
from .base import AuditRecord, Store, UsageSummary
from .sqlite import SQLiteStore

__all__ = ["AuditRecord", "SQLiteStore", "Store", "UsageSummary", "open_store"]


def open_store(cfg: StoreConfig) -> Store:
    """The store named by `store.url` (not yet opened)."""
    path = cfg.sqlite_path
    if path is None:  # config validation admits only sqlite URLs today
        raise ValueError(f"store.url: unsupported store {cfg.url!r}")
    return SQLiteStore(path)
