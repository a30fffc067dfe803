"""`llmfleet-agent db setup`: the database's roles, made once with the administrator's credential (RDS:
the master user), which is used for this and nothing else and never stored on a host.

- the owner role (LOGIN) owns the database and its schema, and runs the migrations (`db upgrade`);
- the agent role (LOGIN) is a member of `llmfleet_agent_access`, the role the migrations grant what an
  agent does (migrations.py), and may connect; nothing more;
- PUBLIC may neither connect to the database nor create in its schema.

Passwords are set when a role is created (or with reset_passwords), sent as SCRAM-SHA-256 verifiers made
here, so no password is in a statement the server may log (log_statement, pg_stat_statements). Names are
checked against a plain identifier rule, and every statement is built with format(%I, %L) by the server,
never by string pasting. The agent role's sessions have lock, idle-transaction and statement timeouts, so
a host cannot hold a lock that stalls the fleet.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

import asyncpg

from .migrations import AGENT_ACCESS_ROLE

_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
SCRAM_ITERATIONS = 4096  # PostgreSQL's own default (scram_iterations)
# the agent role's session settings (ALTER ROLE ... SET)
AGENT_ROLE_SETTINGS = {
    "lock_timeout": "5s",
    "idle_in_transaction_session_timeout": "30s",
    "statement_timeout": "60s",
}


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802/7677, as libpq's
    PQencryptPasswordConn makes it): CREATE ROLE ... PASSWORD '<verifier>' never carries the password."""
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


@dataclass(frozen=True)
class Credential:
    user: str
    password: str


def check_name(what: str, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{what}: {name!r} is not a role name (lower-case letters, digits, _; at most 63)")
    return name


async def _run(conn: asyncpg.Connection, template: str, *args: str) -> None:
    """Execute a statement the server builds with format() from `template` and `args` (%I, %L)."""
    statement = await conn.fetchval("SELECT format($1, VARIADIC $2::text[])", template, list(args))
    await conn.execute(statement)


async def _role_exists(conn: asyncpg.Connection, name: str) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", name))


async def _ensure_login(conn: asyncpg.Connection, cred: Credential, reset: bool, changed: list[str]) -> None:
    if not await _role_exists(conn, cred.user):
        await _run(conn, "CREATE ROLE %I LOGIN PASSWORD %L", cred.user, scram_verifier(cred.password))
        changed.append(f"role {cred.user}")
    elif reset:
        await _run(conn, "ALTER ROLE %I LOGIN PASSWORD %L", cred.user, scram_verifier(cred.password))
        changed.append(f"password of {cred.user}")


async def setup_roles(
    admin_conn: asyncpg.Connection,
    database: str,
    owner: Credential,
    agent: Credential,
    reset_passwords: bool = False,
) -> list[str]:
    """Make the roles and the database's ownership and privileges; what changed (empty: nothing)."""
    check_name("owner user", owner.user)
    check_name("agent user", agent.user)
    if owner.user == agent.user:
        raise ValueError("the owner and the agent must be different roles")
    changed: list[str] = []
    await _ensure_login(admin_conn, owner, reset_passwords, changed)
    await _ensure_login(admin_conn, agent, reset_passwords, changed)
    if not await _role_exists(admin_conn, AGENT_ACCESS_ROLE):
        await _run(admin_conn, "CREATE ROLE %I NOLOGIN", AGENT_ACCESS_ROLE)
        changed.append(f"role {AGENT_ACCESS_ROLE}")
    config = await admin_conn.fetchval("SELECT rolconfig FROM pg_roles WHERE rolname = $1", agent.user) or []
    for setting, value in AGENT_ROLE_SETTINGS.items():
        if f"{setting}={value}" not in config:
            await _run(admin_conn, "ALTER ROLE %I SET " + setting + " = %L", agent.user, value)
            changed.append(f"{agent.user}: {setting} = {value}")
    member = await admin_conn.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", agent.user, AGENT_ACCESS_ROLE)
    if not member:
        await _run(admin_conn, "GRANT %I TO %I", AGENT_ACCESS_ROLE, agent.user)
        changed.append(f"{agent.user} in {AGENT_ACCESS_ROLE}")
    # RDS's master is no superuser: to hand the database to the owner it must be a member of that role
    admin = await admin_conn.fetchval("SELECT current_user")
    is_super = await admin_conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    if not is_super and not await admin_conn.fetchval("SELECT pg_has_role($1, 'MEMBER')", owner.user):
        await _run(admin_conn, "GRANT %I TO %I", owner.user, admin)
        changed.append(f"{admin} in {owner.user}")
    db_owner = await admin_conn.fetchval(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", database
    )
    if db_owner is None:
        raise ValueError(f"no database {database!r} on the server (RDS makes it: database_name)")
    if db_owner != owner.user:
        await _run(admin_conn, "ALTER DATABASE %I OWNER TO %I", database, owner.user)
        changed.append(f"database {database} owned by {owner.user}")
    public_connect = await admin_conn.fetchval(
        "SELECT has_database_privilege('public', $1, 'CONNECT')", database
    )
    if public_connect:
        await _run(admin_conn, "REVOKE ALL ON DATABASE %I FROM PUBLIC", database)
        changed.append(f"PUBLIC may not connect to {database}")
    if not await admin_conn.fetchval(
        "SELECT has_database_privilege($1, $2, 'CONNECT')", AGENT_ACCESS_ROLE, database
    ):
        await _run(admin_conn, "GRANT CONNECT ON DATABASE %I TO %I", database, AGENT_ACCESS_ROLE)
        changed.append(f"{AGENT_ACCESS_ROLE} may connect to {database}")
    return changed


async def setup_schema(admin_conn: asyncpg.Connection, owner: str) -> list[str]:
    """In the application database: the owner owns the public schema, PUBLIC may not create in it."""
    changed: list[str] = []
    schema_owner = await admin_conn.fetchval(
        "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'public'"
    )
    if schema_owner not in (owner, "pg_database_owner"):
        await _run(admin_conn, "ALTER SCHEMA public OWNER TO %I", owner)
        changed.append(f"schema public owned by {owner}")
    if await admin_conn.fetchval("SELECT has_schema_privilege('public', 'public', 'CREATE')"):
        await admin_conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        changed.append("PUBLIC may not create in schema public")
    return changed
