"""The one rule for `store.url`: which URLs name a store, and what a PostgreSQL URL must say.

- `sqlite:////absolute/path/agent.db`: one host's own file.
- `postgresql://user@host:port/dbname?sslmode=verify-full&sslrootcert=/path/ca.pem`: the fleet's shared
  store. TLS with the server's certificate verified against a CA file is required (RDS forces TLS and
  publishes its CA bundle); without `sslmode` the URL means verify-full. Only a server on this machine
  (loopback, or a Unix socket) may be reached without TLS (`sslmode=disable`), for a lab or a test. The
  password never goes in the URL (it would be in the configuration file and in logs): `store.password_file`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..loopback import is_loopback

SQLITE_FORM = "sqlite:////absolute/path/agent.db"
POSTGRES_FORM = "postgresql://user@host:5432/dbname?sslmode=verify-full&sslrootcert=/path/ca.pem"
POSTGRES_SCHEMES = ("postgresql", "postgres")
# the chain and the name: verify-ca (the chain only) is refused, since one RDS CA bundle signs every
# instance of a region, so any of them, anyone's, would pass
VERIFIED = ("verify-full",)
_PARAMETERS = {"sslmode", "sslrootcert"}


@dataclass(frozen=True)
class PostgresURL:
    host: str  # a name, an address, or a Unix socket directory
    port: int
    user: str
    database: str
    sslmode: str  # verify-full or disable
    sslrootcert: Path | None

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host) or self.host.startswith("/")

    def with_user(self, user: str) -> PostgresURL:
        return dataclasses.replace(self, user=user)

    def display(self) -> str:
        """The URL without anything secret (there is nothing secret in it), for logs and errors."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}?sslmode={self.sslmode}"


def parse_postgres(url: str) -> PostgresURL:
    """The parts of a PostgreSQL URL; ValueError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in POSTGRES_SCHEMES:
        raise ValueError(f"{url!r}: not a PostgreSQL URL ({POSTGRES_FORM})")
    if parts.password is not None:
        raise ValueError("a password in store.url is refused: put it in the file store.password_file names")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - _PARAMETERS)
    if unknown:
        raise ValueError(f"{url!r}: unknown parameter {unknown[0]!r} (only sslmode and sslrootcert)")
    host = unquote(parts.hostname or "") or query.get("host", [""])[0]
    if not host:
        raise ValueError(f"{url!r}: no host ({POSTGRES_FORM})")
    if not parts.username:
        raise ValueError(f"{url!r}: no user ({POSTGRES_FORM})")
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ValueError(f"{url!r}: no database name ({POSTGRES_FORM})")
    try:
        port = parts.port or 5432
    except ValueError:
        raise ValueError(f"{url!r}: the port is not a number from 1 to 65535") from None
    sslmode = query.get("sslmode", ["verify-full"])[-1]
    root = query.get("sslrootcert", [""])[-1]
    parsed = PostgresURL(host, port, unquote(parts.username), database, sslmode, Path(root) if root else None)
    if sslmode == "disable":
        if not parsed.loopback:
            raise ValueError(
                f"{url!r}: sslmode=disable is allowed only for a server on this machine; use"
                " sslmode=verify-full with sslrootcert (RDS: its CA bundle)"
            )
    elif sslmode not in VERIFIED:
        raise ValueError(
            f"{url!r}: sslmode={sslmode} does not verify the server's name; use verify-full with sslrootcert"
        )
    if parsed.sslrootcert is not None and not parsed.sslrootcert.is_absolute():
        raise ValueError(f"{url!r}: sslrootcert must be an absolute path")
    return parsed


def url_problem(url: str) -> str | None:
    """None when `url` names a store the agent can use, else why not."""
    if url.startswith("sqlite:"):
        if url.startswith("sqlite:////") and len(url) > len("sqlite:////"):
            return None
        return f"{url!r}: use {SQLITE_FORM}"
    if urlsplit(url).scheme in POSTGRES_SCHEMES:
        try:
            parse_postgres(url)
        except ValueError as exc:
            return str(exc)
        return None
    return f"{url!r}: use {SQLITE_FORM} or {POSTGRES_FORM}"
