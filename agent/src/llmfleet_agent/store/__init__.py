"""Where keys and records live. SQLite is the embedded default; PostgreSQL the fleet's shared store."""

from __future__ import annotations

from ..config import StoreConfig
from .base import USAGE_GROUPS, AuditRecord, BudgetUse, Store, UsageSummary
from .sqlite import SQLiteStore
from .urls import parse_postgres

__all__ = ["USAGE_GROUPS", "AuditRecord", "BudgetUse", "SQLiteStore", "Store", "UsageSummary", "open_store"]


def open_store(
    cfg: StoreConfig, user: str | None = None, password: str | None = None, migrate: bool = True
) -> Store:
    """The store named by `store.url` (not yet opened). For PostgreSQL, `user` and `password` replace the
    URL's user and the password file (the `--stdin-json` credentials of the CLI); `migrate`: upgrade an old
    schema at open when the credential may."""
    path = cfg.sqlite_path
    if path is not None:
        return SQLiteStore(path)
    from .postgres import PostgresStore, read_password  # asyncpg only where it is used

    url = parse_postgres(cfg.url)
    if user is not None:
        url = url.with_user(user)
    if password is None:
        if cfg.password_file is None:
            raise ValueError("store.password_file: required for a PostgreSQL store.url")
        password = read_password(cfg.password_file)
    return PostgresStore(
        url,
        password,
        pool_size=cfg.pool_size,
        connect_timeout=cfg.connect_timeout,
        statement_timeout=cfg.statement_timeout,
        migrate=migrate,
    )
