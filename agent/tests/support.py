"""Helpers for tests that run real processes: free ports, waiting on conditions, child processes."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

BIN = Path(sys.executable).parent


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections (Linux: 32768 unless changed)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _listen_ports() -> range:
    """This test process's share of the ports for listening.

    They come from below the ephemeral range: a port the kernel picks (bind to 0) can be handed out again
    as soon as it is closed, or taken by an outgoing connection, before the server binds it. The agent's
    tests and each pytest-xdist worker of the collection's tests run side by side in `make test`, so each
    gets its own share: a port one of them picked is never picked by another before its server binds it.
    """
    low, high = 10000, min(_ephemeral_low(), 65536)
    shares = 8
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    suite = 0 if Path.cwd().name == "agent" else 1
    slot = (suite * shares // 2 + (int(worker) if worker.isdigit() else 0)) % shares
    size = max((high - low) // shares, 0)
    return range(low + slot * size, low + (slot + 1) * size)


# never handed out: ports with a fixed use here (the demo's agent and Ollama, Ollama's default port);
# molecule's scenarios use fixed ports below 10000
_PORTS_GIVEN: set[int] = {8443, 11434, 21434}
_PORTS_LOCK = threading.Lock()
_LISTEN_PORTS = _listen_ports()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and that this process has not handed out before."""
    with _PORTS_LOCK:
        for _attempt in range(2000):
            port = random.choice(_LISTEN_PORTS) if _LISTEN_PORTS else 0
            if port in _PORTS_GIVEN:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                port = int(sock.getsockname()[1])
            _PORTS_GIVEN.add(port)
            return port
    raise RuntimeError(f"no free TCP port on 127.0.0.1 in {_LISTEN_PORTS}")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> T:
    """Poll `predicate` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the condition may raise while the thing is still coming up
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})"
            )
        time.sleep(interval)


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, Any, Mapping[str, str]]:
    """One HTTP request with the standard library; returns (status, decoded JSON or text, headers)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status, hdrs = resp.read(), resp.status, resp.headers
    except urllib.error.HTTPError as err:
        raw, status, hdrs = err.read(), err.code, err.headers
    text = raw.decode()
    try:
        return status, json.loads(text), hdrs
    except ValueError:
        return status, text, hdrs


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Proc:
    """A child process whose output goes to a log file, stopped for sure at the end of a test."""

    def __init__(self, args: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        full_env = {**os.environ, **(env or {})}
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            args, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        # whatever the process group left behind goes too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._log.close()


@contextlib.contextmanager
def running(args: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> Iterator[Proc]:
    proc = Proc(args, log_path, env)
    try:
        yield proc
    finally:
        proc.stop()


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with Path(f"/proc/{pid}/stat").open() as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Stream:
    """A streamed HTTP request read line by line (http.client), closable mid-answer like a client that
    goes away."""

    def __init__(
        self,
        url: str,
        path: str,
        body: Any,
        key: str | None = None,
        timeout: float = 30,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        import http.client
        import urllib.parse

        parts = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        headers = {"Content-Type": "application/json", **(bearer(key) if key else {}), **(headers or {})}
        self.conn.request("POST", path, body=json.dumps(body), headers=headers)
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = self.response.headers

    def lines(self) -> Iterator[bytes]:
        while line := self.response.readline():
            if line.strip():
                yield line.rstrip(b"\n")

    def close(self) -> None:
        self.conn.close()
