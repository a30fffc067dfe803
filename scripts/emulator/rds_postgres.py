"""RDS PostgreSQL instances backed by a real PostgreSQL server (LLMFLEET_EMULATOR_RDS_POSTGRES).

On AWS, CreateDBInstance makes a server that answers at the instance's endpoint, with the master user
(a member of rds_superuser: CREATEROLE and CREATEDB, not a superuser) and the database named by DBName
owned by it. moto makes only the description. With LLMFLEET_EMULATOR_RDS_POSTGRES set to a superuser's
URL of a real server (postgresql://postgres:PASSWORD@127.0.0.1:PORT/postgres), a new postgres instance
is that server: the emulator makes the master role (NOSUPERUSER CREATEROLE CREATEDB, the given password)
and the database, and describes the instance's endpoint address as the server's host. The port is the
instance's own Port (give the server's port as the instance's port, as a deployment would give RDS its
port). Without the setting the emulator describes instances as moto does and nothing answers there.

This is what the database stage's bootstrap (`llmfleet-agent db setup` with the master credential, then
`db upgrade` with the owner's) and every agent then talk to in the tests: a master that is no superuser,
as on RDS, so a step that would need one fails here as it would there.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any
from urllib.parse import urlsplit

from moto.rds import models as rds

SETTING = "LLMFLEET_EMULATOR_RDS_POSTGRES"


def backing_server() -> str | None:
    """The superuser URL of the real server behind postgres instances, or None."""
    return os.environ.get(SETTING) or None


async def _make_master(url: str, master: str, password: str, database: str) -> None:
    import asyncpg  # the agent's driver, in the same venv as the emulator

    conn = await asyncpg.connect(url, ssl=False, timeout=10)
    try:

        async def run(template: str, *args: str) -> None:
            statement = await conn.fetchval("SELECT format($1, VARIADIC $2::text[])", template, list(args))
            await conn.execute(statement)

        if await conn.fetchval("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", master):
            await run("ALTER ROLE %I LOGIN NOSUPERUSER CREATEROLE CREATEDB PASSWORD %L", master, password)
        else:
            await run("CREATE ROLE %I LOGIN NOSUPERUSER CREATEROLE CREATEDB PASSWORD %L", master, password)
        if not await conn.fetchval("SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)", database):
            await run("CREATE DATABASE %I OWNER %I", database, master)
    finally:
        await conn.close()


def _create_db_instance(original: Any) -> Any:
    def create(self: Any, db_kwargs: dict[str, Any]) -> Any:
        instance = original(self, db_kwargs)
        url = backing_server()
        if url and (instance.engine or "").startswith("postgres"):
            asyncio.run(
                _make_master(
                    url,
                    instance.master_username,
                    # moto keeps it, but refuses to hand it out (as AWS: "not retrievable")
                    instance._master_user_password or "",
                    instance.db_name or "postgres",
                )
            )
        return instance

    return create


def _address(original: property) -> property:
    def address(self: Any) -> str:
        url = backing_server()
        if url and (self.engine or "").startswith("postgres"):
            return urlsplit(url).hostname or "127.0.0.1"
        return original.fget(self)  # type: ignore[misc]

    return property(address)


def apply() -> None:
    rds.RDSBackend.create_db_instance = _create_db_instance(rds.RDSBackend.create_db_instance)  # type: ignore[method-assign]
    rds.DBInstance.address = _address(rds.DBInstance.address)  # type: ignore[method-assign,assignment]
