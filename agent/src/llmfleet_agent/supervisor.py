"""The Ollama child as an explicit state machine.

    STOPPED -> STARTING -> RUNNING
    RUNNING/STARTING -> BACKOFF -> STARTING   after an unexpected exit or a failed start; the delay doubles
                                              from `initial_delay` up to `max_delay`, and the failure count
                                              is reset after a run that lasted `reset_after` seconds
    BACKOFF -> FATAL                          after `max_failures` failures in a row, or at once when the
                                              command cannot be run at all (not found, not executable)
    any -> STOPPING -> STOPPED                on shutdown: SIGTERM to the child's process group, a grace
                                              period, then SIGKILL

Readiness is the child answering `GET /api/version`. Once it is RUNNING the configured models are pulled
(progress logged) and the child is polled for health and for the models it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .child_output import PIPE_SIZE, OutputPipe
from .config import OllamaConfig
from .logs import event
from .models import normalize_model
from .procutil import child_setup, forget_group, reap_recorded_group, record_group, signal_group

log = logging.getLogger("llmfleet.supervisor")
child_log = logging.getLogger("llmfleet.ollama")

HEALTH_FAILURES_BEFORE_RESTART = 3
PULL_RETRY_MAX = 60.0


class State(str, enum.Enum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    FATAL = "FATAL"
    STOPPING = "STOPPING"


class _Fatal(Exception):
    """A failure that retrying cannot mend."""


class _Retry(Exception):
    """A start that failed for want of something the system may have again soon: retried with backoff."""


# out of file descriptors (the process's, the system's), processes or memory: none says the command is bad
_SHORT_OF = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})


@dataclass
class PullState:
    status: str = "waiting"
    completed: int = 0
    total: int = 0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "completed": self.completed, "total": self.total, "error": self.error}


@dataclass
class ExitInfo:
    code: int | None
    at: float
    description: str


@dataclass
class _Run:
    """What belongs to one child process."""

    proc: asyncio.subprocess.Process
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    def __init__(self, cfg: OllamaConfig, state_dir: Path, session: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.base_url = f"http://127.0.0.1:{cfg.port}"
        self._session = session
        self._group_file = state_dir / "ollama.pgid"
        self.state = State.STOPPED
        self.reason = "not started"
        self.since = time.time()
        self.restarts = 0
        self.failures = 0
        self.version: str | None = None
        self.last_exit: ExitInfo | None = None
        self.models_present: set[str] | None = None  # None: not known yet
        self.pulls: dict[str, PullState] = {}
        self.wanted_models = [normalize_model(m) for m in cfg.models]
        self._run: _Run | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._listeners: list[Callable[[State], None]] = []

    # ----- public API -------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._run.proc.pid if self._run and self._run.proc.returncode is None else None

    def on_state_change(self, listener: Callable[[State], None]) -> None:
        self._listeners.append(listener)

    def missing_models(self) -> list[str]:
        present = self.models_present or set()
        return [m for m in self.wanted_models if m not in present]

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name="ollama-supervisor")

    async def stop(self) -> None:
        """Stop the child (SIGTERM, grace period, SIGKILL) and the supervision loop."""
        self._stopping = True
        self._wake.set()
        run = self._run
        if run is not None and run.proc.returncode is None:
            self._set(State.STOPPING, "agent shutting down")
            await self._terminate(run.proc)
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._set(State.STOPPED, "stopped")

    def snapshot(self) -> dict[str, Any]:
        exit_info = self.last_exit
        return {
            "state": self.state.value,
            "reason": self.reason,
            "since": self.since,
            "pid": self.pid,
            "version": self.version,
            "restarts": self.restarts,
            "consecutive_failures": self.failures,
            "last_exit": None
            if exit_info is None
            else {"code": exit_info.code, "at": exit_info.at, "description": exit_info.description},
            "url": self.base_url,
            "models": {
                "wanted": self.wanted_models,
                "present": sorted(self.models_present) if self.models_present is not None else None,
                "missing": self.missing_models(),
                "pulls": {name: p.as_dict() for name, p in self.pulls.items()},
            },
        }

    # ----- the loop ---------------------------------------------------------------------------------
    def _set(self, state: State, reason: str) -> None:
        changed = state != self.state
        self.state, self.reason = state, reason
        if changed:
            self.since = time.time()
            level = logging.ERROR if state is State.FATAL else logging.INFO
            event(log, level, f"ollama {state.value}: {reason}", state=state.value, reason=reason)
            for listener in self._listeners:
                listener(state)

    async def _supervise(self) -> None:
        killed = await asyncio.to_thread(reap_recorded_group, self._group_file)
        if killed:
            event(log, logging.WARNING, "killed processes left by an earlier run", pids=killed)
        restart = self.cfg.restart
        while not self._stopping:
            try:
                failure = await self._run_once()
            except _Fatal as exc:
                self._set(State.FATAL, str(exc))
                return
            if self._stopping:
                return
            self.failures += 1
            if self.failures >= restart.max_failures:
                self._set(State.FATAL, f"{failure}; gave up after {self.failures} failures in a row")
                return
            delay = min(restart.initial_delay * 2 ** (self.failures - 1), restart.max_delay)
            self._set(State.BACKOFF, f"{failure}; restart {self.restarts + 1} in {delay:.1f}s")
            await self._sleep(delay)
            self.restarts += 1

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    async def _run_once(self) -> str:
        """Start the child and watch it until it exits; return why it stopped being usable."""
        self._set(State.STARTING, f"starting {' '.join(self.cfg.command)}")
        try:
            in_use = await asyncio.to_thread(_port_in_use, self.cfg.port)
        except OSError as exc:  # no socket for the check (out of file descriptors): a failure to retry
            return f"cannot check port 127.0.0.1:{self.cfg.port}: {exc.strerror or exc}"
        if in_use:
            return f"port 127.0.0.1:{self.cfg.port} is already in use by another process"
        output: list[OutputPipe] = []
        try:
            try:
                for name in ("stdout", "stderr"):
                    output.append(OutputPipe(self._line_of(name)))
            except OSError as exc:  # out of file descriptors
                raise _Retry(f"cannot make a pipe for its output: {exc.strerror or exc}") from None
            proc = await self._spawn(*output)
        except BaseException as exc:
            for pipe in output:
                pipe.close()
            if isinstance(exc, _Retry):
                return str(exc)
            raise
        for pipe in output:
            pipe.start()
        run = self._run = _Run(proc)
        try:
            failure = await self._wait_ready(proc)
            if failure is None:
                running_since = time.monotonic()
                self._set(State.RUNNING, f"pid {proc.pid} answers on {self.base_url}")
                run.tasks += [
                    asyncio.create_task(self._keep_models()),
                    asyncio.create_task(self._watch_health(proc)),
                ]
                await proc.wait()
                if time.monotonic() - running_since >= self.cfg.restart.reset_after:
                    self.failures = 0
                failure = _describe_exit(proc.returncode)
            else:
                await self._kill(proc)
            for pipe in output:  # its last lines (why it exited) before the agent's word on it
                pipe.drain(PIPE_SIZE, final=True)
            self.last_exit = ExitInfo(proc.returncode, time.time(), failure)
            if not self._stopping:
                event(log, logging.WARNING, f"ollama {failure}", pid=proc.pid, code=proc.returncode)
            return failure
        finally:
            self.models_present = None
            try:
                for task in run.tasks:
                    task.cancel()
                await asyncio.gather(*run.tasks, return_exceptions=True)
            finally:  # also when cancelled again while waiting for them
                # nothing of the group may outlive the child
                signal_group(proc.pid, signal.SIGKILL)
                forget_group(self._group_file)
                for pipe in output:
                    pipe.close()
                self._run = None

    async def _spawn(self, stdout: OutputPipe, stderr: OutputPipe) -> asyncio.subprocess.Process:
        env = {**os.environ, **self.cfg.env, "OLLAMA_HOST": f"127.0.0.1:{self.cfg.port}"}
        if self.cfg.models_dir is not None:
            env["OLLAMA_MODELS"] = str(self.cfg.models_dir)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.cfg.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout.write_fd,
                stderr=stderr.write_fd,
                env=env,
                start_new_session=True,
                preexec_fn=child_setup(os.getpid()),  # only a prctl and a getppid run there
            )
        except FileNotFoundError:
            raise _Fatal(f"command not found: {self.cfg.command[0]}") from None
        except PermissionError:
            raise _Fatal(f"permission denied: cannot execute {self.cfg.command[0]}") from None
        except OSError as exc:
            if exc.errno in _SHORT_OF:  # the system's limits, not the command: a failure to retry
                raise _Retry(f"cannot start {self.cfg.command[0]}: {exc.strerror}") from None
            raise _Fatal(f"cannot start {self.cfg.command[0]}: {exc.strerror}") from None
        record_group(self._group_file, proc.pid)
        event(log, logging.INFO, "ollama spawned", pid=proc.pid, command=self.cfg.command)
        return proc

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> str | None:
        """None once the child answers /api/version; else why it never did."""
        deadline = time.monotonic() + self.cfg.start_timeout
        timeout = aiohttp.ClientTimeout(total=1.0)
        while time.monotonic() < deadline:
            if proc.returncode is not None or self._stopping:
                return f"{_describe_exit(proc.returncode)} while starting"
            try:
                async with self._session.get(f"{self.base_url}/api/version", timeout=timeout) as resp:
                    if resp.status == 200:
                        self.version = (await resp.json()).get("version")
                        return None
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                pass
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=0.1)
        return f"did not answer on {self.base_url} within {self.cfg.start_timeout:g}s"

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=self.cfg.stop_timeout)
        except asyncio.TimeoutError:
            event(log, logging.WARNING, "ollama ignored SIGTERM; sending SIGKILL", pid=proc.pid)
            await self._kill(proc)

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()

    def _line_of(self, name: str) -> Callable[[bytes], None]:
        """What is done with a line of the child's stdout or stderr (child_output.py reads them)."""
        fields = {"fields": {"stream": name}}

        def line(raw: bytes) -> None:
            # Ollama's per-request lines ("[GIN] ...") repeat the agent's own access log: debug level, so
            # they cost next to nothing unless asked for
            level = logging.DEBUG if raw.startswith(b"[GIN]") else logging.INFO
            if not child_log.isEnabledFor(level):
                return
            text = raw.decode(errors="replace").rstrip()
            if text:
                child_log.log(level, "ollama: %s", text, extra=fields)

        return line

    # ----- while RUNNING ----------------------------------------------------------------------------
    async def _watch_health(self, proc: asyncio.subprocess.Process) -> None:
        failures = 0
        while proc.returncode is None:
            await asyncio.sleep(self.cfg.health_interval)
            try:
                await self.refresh_models()
                failures = 0
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                failures += 1
                event(log, logging.WARNING, "ollama health check failed", error=repr(exc), failures=failures)
                if failures >= HEALTH_FAILURES_BEFORE_RESTART:
                    event(log, logging.ERROR, "ollama unresponsive; killing it", pid=proc.pid)
                    signal_group(proc.pid, signal.SIGKILL)
                    return

    async def refresh_models(self) -> set[str]:
        timeout = aiohttp.ClientTimeout(total=10.0)
        async with self._session.get(f"{self.base_url}/api/tags", timeout=timeout) as resp:
            resp.raise_for_status()
            body = await resp.json()
        present = {normalize_model(m["name"]) for m in body.get("models", [])}
        self.models_present = present
        return present

    async def _keep_models(self) -> None:
        delay = 5.0
        while True:
            try:
                present = await self.refresh_models()
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                await asyncio.sleep(1.0)
                continue
            missing = [m for m in self.wanted_models if m not in present]
            if not missing:
                return
            for model in missing:
                await self._pull(model)
            if not self.missing_models():
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, PULL_RETRY_MAX)

    async def _pull(self, model: str) -> None:
        state = self.pulls[model] = PullState(status="starting")
        event(log, logging.INFO, f"pulling model {model}", model=model)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
        last_logged: tuple[str, int] = ("", -1)
        try:
            async with self._session.post(
                f"{self.base_url}/api/pull", json={"model": model, "stream": True}, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    state.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                async for line in resp.content:
                    if not line.strip():
                        continue
                    chunk = json.loads(line)
                    if "error" in chunk:
                        state.error = str(chunk["error"])
                        break
                    state.status = str(chunk.get("status", ""))
                    state.total = int(chunk.get("total") or 0)
                    state.completed = int(chunk.get("completed") or 0)
                    quarter = state.completed * 4 // state.total if state.total else -1
                    if (state.status, quarter) != last_logged:
                        last_logged = (state.status, quarter)
                        event(
                            log,
                            logging.INFO,
                            f"pull {model}: {state.status}",
                            model=model,
                            completed=state.completed,
                            total=state.total,
                        )
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            state.error = f"pull interrupted: {exc!r}"
        if state.error:
            state.status = "failed"
            event(log, logging.ERROR, f"pull {model} failed: {state.error}", model=model, error=state.error)
            return
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            await self.refresh_models()
        event(log, logging.INFO, f"model {model} is present", model=model)
