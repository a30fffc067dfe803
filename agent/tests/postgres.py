"""A real PostgreSQL server for tests: its own cluster in a temporary directory, on a free loopback port,
with password logins (scram-sha-256) and TLS (a test CA; the server's certificate names 127.0.0.1 and
localhost), as RDS has both.

`PostgresServer(dir).start()`; `.url(user, database, tls=False)` gives a `store.url`; `.admin_dsn()` an
asyncpg DSN for the superuser; `.stop()` / `.start()` again simulate an outage (same data, same port).
With CI=true a missing server fails the test instead of skipping it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from support import free_port

SUPERUSER = "postgres"


def _bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
    return versions[0].parent if versions else None


def require_postgres() -> Path:
    """The server's bin directory; skip (fail with CI=true) when PostgreSQL is not installed."""
    bindir = _bindir()
    if bindir is None:
        message = "PostgreSQL is not installed (make system-deps installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return bindir


def _run(argv: list[str], user: str | None, **kwargs: object) -> subprocess.CompletedProcess[str]:
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def make_ca_and_cert(
    directory: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> tuple[Path, Path, Path]:
    """A CA and a server certificate signed by it for `names`: (ca.pem, server.crt, server.key)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    _run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=test RDS CA",
            "-keyout",
            str(ca_key),
            "-out",
            str(ca),
        ],
        None,
    )
    _run(
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={names[0]}",
            "-keyout",
            str(key),
            "-out",
            str(csr),
        ],
        None,
    )
    sans = ",".join(("IP:" if n[0].isdigit() else "DNS:") + n for n in names)
    ext = directory / "san.ext"
    ext.write_text(f"subjectAltName={sans}\n")
    _run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(ext),
            "-out",
            str(cert),
        ],
        None,
    )
    return ca, cert, key


class PostgresServer:
    def __init__(self, directory: Path, durable: bool = False) -> None:
        """`durable`: keep PostgreSQL's crash-safe defaults (fsync, synchronous_commit, full_page_writes on),
        for measurements (bench/bench_store.py); a test server turns them off for speed."""
        self.bindir = require_postgres()
        self.durable = durable
        # as root the server runs as the postgres user, who cannot enter a test's private temporary
        # directory (0700): then the cluster lives in a directory of its own, removed by stop()
        self._own_dir = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="llmfleet-pg-")) if self._own_dir else directory
        self.data = self.dir / "data"
        self.port = free_port()
        self.password = secrets.token_urlsafe(18)
        self.ca: Path | None = None
        # initdb and the server refuse to run as root: as the postgres user, which must own the files
        self._user = "postgres" if os.geteuid() == 0 else None
        self._initialised = False

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _init(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self._chown(self.dir)
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._chown(pwfile)
        _run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=scram-sha-256",
                "--pwfile",
                str(pwfile),
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
            self._user,
        )
        pwfile.unlink()
        tls = self.dir / "tls"
        self.ca, cert, key = make_ca_and_cert(tls)
        for path in (tls, cert, key):
            self._chown(path)
        key.chmod(0o600)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.dir}'\n"
                f"ssl = on\nssl_cert_file = '{cert}'\nssl_key_file = '{key}'\n"
                "max_connections = 200\nshared_buffers = 128MB\n"
            )
            if not self.durable:  # a test server: speed
                conf.write("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        (self.data / "pg_hba.conf").write_text(
            "local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        self._initialised = True

    def start(self) -> PostgresServer:
        if not self._initialised:
            self._init()
        _run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.dir / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ],
            self._user,
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (start() brings it back with its data)."""
        with contextlib.suppress(subprocess.CalledProcessError):
            _run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"], self._user)

    def destroy(self) -> None:
        """Stop the server for good and remove its files."""
        self.stop("immediate")
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, user: str, database: str, tls: bool = False, host: str = "127.0.0.1") -> str:
        """A store.url for `user` on `database` (the password goes in store.password_file)."""
        base = f"postgresql://{user}@{host}:{self.port}/{database}"
        return f"{base}?sslmode=verify-full&sslrootcert={self.ca}" if tls else f"{base}?sslmode=disable"

    def admin_dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser; the output (unaligned, tuples only)."""
        env = {**os.environ, "PGPASSWORD": self.password}
        result = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        return result.stdout.strip()

    def create_database(self, name: str) -> None:
        self.psql(f'CREATE DATABASE "{name}"')

    def password_file(self, directory: Path) -> Path:
        """The superuser's password in a file only its owner reads (a store.password_file)."""
        path = directory / "pg-password"
        path.write_text(self.password + "\n")
        path.chmod(0o600)
        return path
