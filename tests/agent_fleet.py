"""Real agents (the simulator behind each) on loopback for the collection's tests.

Every agent of a fleet accepts the same operator key, as the agents of one deployment do (the agent role
declares one key on every host), so the idle-shutdown playbooks can use one `llmfleet_operator_key`.
The agent's own test helpers (agent/tests/agents.py, support.py) do the process work.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent" / "tests"))

from agents import AGENT, AgentHandle, deep_merge, new_agent
from support import Proc, bearer, free_port, http, wait_until

__all__ = [
    "AgentHandle",
    "Fleet",
    "bearer",
    "fleet",
    "free_port",
    "http",
    "https",
    "self_signed_certificate",
    "wait_until",
]

# the simulator answers at once unless asked to stream slowly (the in-flight tests do)
FAST_SIM = {"ollama": {"env": {"LLMFLEET_SIM_TOKEN_DELAY": "0"}}}


def self_signed_certificate(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for `host` (CN and IP SAN) and its key under `directory`: (cert, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "tls.crt", directory / "tls.key"
    argv = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={host}"]
    argv += ["-addext", f"subjectAltName=IP:{host}", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        argv,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def https(
    method: str,
    url: str,
    cafile: Path,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, Any]:
    """support.http for an agent with TLS, verifying its certificate against `cafile`: (status, body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    context = ssl.create_default_context(cafile=str(cafile))
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def store_path(handle: AgentHandle) -> Path:
    """The agent's SQLite store (its config's store.url, sqlite:///<path>)."""
    url = handle.config["store"]["url"]
    assert url.startswith("sqlite:///"), url
    return Path(url.removeprefix("sqlite:///"))


def copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database (the backup API: WAL contents included)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        contextlib.closing(sqlite3.connect(source)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)


class Fleet:
    """Agents started in parallel under one directory, all with the same operator and user keys."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.operator_key = "llmf_" + secrets.token_urlsafe(32)
        self.user_key = "llmf_" + secrets.token_urlsafe(32)
        self.agents: dict[str, AgentHandle] = {}
        # the store of the first agent, with the fleet's keys, copied for the others
        self._template = directory / "keys-template.db"
        self._template_lock = threading.Lock()
        # name -> the self-signed certificate of an agent that listens with TLS (its url is https://)
        self.certificates: dict[str, Path] = {}

    def add(self, name: str, overrides: dict[str, Any] | None = None, tls: bool = False) -> AgentHandle:
        """An agent (not started yet); with `tls`, it listens with a self-signed certificate for 127.0.0.1."""
        overrides = deep_merge(FAST_SIM, overrides or {})
        if tls:
            cert, key = self_signed_certificate(self.directory / name)
            overrides = deep_merge(overrides, {"listen": {"tls": {"cert": str(cert), "key": str(key)}}})
        handle = new_agent(self.directory / name, overrides)
        if tls:
            handle.url = handle.url.replace("http://", "https://", 1)
            self.certificates[name] = cert
        self._store_keys(handle)
        handle.keys.update(operator=self.operator_key, user=self.user_key)
        self.agents[name] = handle
        return handle

    def _store_keys(self, handle: AgentHandle) -> None:
        """The fleet's keys into the agent's store: made once with the agent's CLI (hashed, as on a host),
        then a copy of that store for each further agent (a CLI run per key and agent costs seconds)."""
        with self._template_lock:
            if not self._template.exists():
                for role, secret in (("operator", self.operator_key), ("user", self.user_key)):
                    argv = ["keys", "create", "--name", f"fleet-{role}", "--role", role, "--from-stdin"]
                    res = handle.cli(*argv, stdin=secret)
                    assert res.returncode == 0, res.stderr
                copy_sqlite(store_path(handle), self._template)
                return
        copy_sqlite(self._template, store_path(handle))

    def add_many(self, names: list[str], overrides: dict[str, Any] | None = None) -> None:
        """Add agents alike, their keys stored in parallel (a store is opened per key)."""
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda name: self.add(name, overrides), names))

    def start(self, names: list[str] | None = None) -> None:
        """Start the named agents (all by default) at once and wait until each is ready."""
        chosen = names or list(self.agents)

        def up(name: str) -> None:
            handle = self.agents[name]
            if name not in self.certificates:
                handle.start(timeout=120).wait_ready(timeout=120)
                return
            # the handle's own helpers speak plain HTTP
            assert handle.proc is None or not handle.proc.alive()
            handle.proc = Proc(
                [AGENT, "serve", "--config", str(handle.config_path)], handle.dir / "agent.log"
            )
            wait_until(
                lambda: self.request(name, "GET", "/readyz")[0] == 200, 120, f"{handle.url} to be ready"
            )

        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(up, chosen))

    def request(
        self, name: str, method: str, path: str, body: Any = None, key: str | None = None
    ) -> tuple[int, Any]:
        """One request to an agent of the fleet, over TLS for one with a certificate: (status, body)."""
        handle = self.agents[name]
        headers = bearer(key) if key else None
        if name in self.certificates:
            return https(method, handle.url + path, self.certificates[name], body, headers)
        code, answer, _headers = http(method, handle.url + path, body, headers)
        return code, answer

    def inference_records(self, name: str) -> int:
        """How many inference requests the agent recorded in the last hour (its usage report by model)."""
        code, report = self.request(name, "GET", "/agent/usage?by=model&since=1h", key=self.operator_key)
        assert code == 200, report
        return sum(r["requests"] for r in report["rows"] if r["group"] != "-")

    def idle(self, name: str) -> dict[str, Any]:
        code, body = self.request(name, "GET", "/agent/idle", key=self.operator_key)
        assert code == 200, body
        return body

    def stop(self) -> None:
        """Stop every agent, all at once (each stops its simulator first)."""
        running = [h.proc for h in self.agents.values() if h.proc is not None]
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda proc: proc.stop(), running))


@contextmanager
def fleet(directory: Path) -> Iterator[Fleet]:
    made = Fleet(directory)
    try:
        yield made
    finally:
        made.stop()
