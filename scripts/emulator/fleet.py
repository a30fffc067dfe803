"""GPU instances whose state drives real processes: the fleet emulator (issue 15).

An instance registered here runs a command (a real agent, with the simulator behind it) while it is
`running`, as a GPU host runs its agent between boot and shutdown:

- `running` (launched, or started): the command starts `boot_seconds` later (the host boots, systemd starts
  the agent), if the instance is still running then.
- StopInstances: the instance is `stopping` until its command has exited (SIGTERM, then SIGKILL after
  `stop_grace` seconds: the agent ends its streams and its Ollama, as at a host's shutdown), then `stopped`.
  A start while it is `stopping` is refused as AWS refuses it (IncorrectInstanceState).
- StartInstances: `pending` for `pending_seconds` (AWS finds the capacity and boots), then `running`.
- TerminateInstances ends the command too.

Each instance's time in `running` is kept, as AWS bills it (from `running` until `stopping` begins):
`billed_seconds`, with its intervals, is what the bill benchmark reads. Instances that are not registered
behave as before (moto's: at once `running` or `stopped`).

The control, beside /llmfleet-emulator/capacity (JSON in and out; /moto-api/reset stops every command and
forgets them):

    GET  /llmfleet-emulator/fleet
    POST /llmfleet-emulator/fleet  {"instances": {"i-0123...": {"argv": ["llmfleet-agent", "serve", ...],
                                     "env": {...}, "log": "/path/agent.log", "boot_seconds": 2,
                                     "pending_seconds": 0, "stop_grace": 15}, "i-4567...": null}}
         registers (or replaces) the instances given, null forgets one (its command is stopped); an
         instance running when registered boots its command as if it had just started.

The emulator listens on loopback only and runs what its caller asks: it is a test and demo tool.
"""

from __future__ import annotations

import copy
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import launch as launching  # scripts/emulator/launch.py: the control's dispatch
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models import instances as ec2_instances
from moto.moto_api._internal.models import MotoAPIBackend

RUNNING, PENDING, STOPPING, STOPPED = ("running", 16), ("pending", 0), ("stopping", 64), ("stopped", 80)
_FIELDS = {"argv", "env", "log", "boot_seconds", "pending_seconds", "stop_grace"}


@dataclass
class Spec:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log: str | None = None
    boot_seconds: float = 0.0
    pending_seconds: float = 0.0
    stop_grace: float = 15.0


def parse_spec(instance_id: str, raw: Any) -> Spec:
    """A registration, or ValueError naming the instance and what is wrong."""
    if not isinstance(raw, dict) or set(raw) - _FIELDS:
        raise ValueError(f"{instance_id}: expected an object with {sorted(_FIELDS)}, got {raw!r}")
    argv = raw.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv):
        raise ValueError(f"{instance_id}: argv is a non-empty list of strings")
    env = raw.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ValueError(f"{instance_id}: env maps names to strings")
    log = raw.get("log")
    if log is not None and not (isinstance(log, str) and Path(log).is_absolute()):
        raise ValueError(f"{instance_id}: log is an absolute path")
    numbers = {}
    for name, default in (("boot_seconds", 0.0), ("pending_seconds", 0.0), ("stop_grace", 15.0)):
        value = raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3600:
            raise ValueError(f"{instance_id}: {name}={value!r} is not a number of seconds from 0 to 3600")
        numbers[name] = float(value)
    return Spec(argv=list(argv), env=dict(env), log=log, **numbers)


@dataclass
class Machine:
    """One registered instance: its command, and its time in `running`."""

    instance_id: str
    spec: Spec
    proc: subprocess.Popen[bytes] | None = None
    boot: threading.Timer | None = None
    running_since: float | None = None
    billed: float = 0.0
    intervals: list[list[float | None]] = field(default_factory=list)
    boots: int = 0
    exits: list[int] = field(default_factory=list)

    def view(self, instance: Any) -> dict[str, Any]:
        now = time.time()
        running = self.running_since is not None
        alive = self.proc is not None and self.proc.poll() is None
        return {
            "state": instance.state if instance is not None else "gone",
            "process": "running" if alive else ("booting" if self.boot is not None else "none"),
            "pid": self.proc.pid if alive and self.proc is not None else None,
            "boots": self.boots,
            "exits": list(self.exits),
            "billed_seconds": round(self.billed + (now - self.running_since if running else 0.0), 3),
            "intervals": [list(i) for i in self.intervals],
        }


_lock = threading.RLock()
_machines: dict[str, Machine] = {}
_instances: dict[str, Any] = {}  # instance id -> moto's Instance, for state changes from timers


def _set_state(instance: Any, state: tuple[str, int]) -> None:
    instance._state.name, instance._state.code = state


def _entered_running(machine: Machine, instance: Any) -> None:
    """Billing starts; the command boots after boot_seconds if the instance is still running then."""
    now = time.time()
    if machine.running_since is None:
        machine.running_since = now
        machine.intervals.append([now, None])
    if machine.boot is not None or (machine.proc is not None and machine.proc.poll() is None):
        return

    def boot() -> None:
        with _lock:
            machine.boot = None
            if instance.state != "running" or _machines.get(machine.instance_id) is not machine:
                return
            machine.boots += 1
            log = open(machine.spec.log, "ab") if machine.spec.log else subprocess.DEVNULL  # noqa: SIM115
            try:
                machine.proc = subprocess.Popen(
                    machine.spec.argv,
                    env={**os.environ, **machine.spec.env},
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            finally:
                if log is not subprocess.DEVNULL:
                    log.close()

    machine.boot = threading.Timer(machine.spec.boot_seconds, boot)
    machine.boot.daemon = True
    machine.boot.start()


def _left_running(machine: Machine) -> None:
    """Billing stops (AWS stops billing when `stopping` begins); a boot not done yet is called off."""
    if machine.running_since is not None:
        now = time.time()
        machine.billed += now - machine.running_since
        machine.intervals[-1][1] = now
        machine.running_since = None
    if machine.boot is not None:
        machine.boot.cancel()
        machine.boot = None


def _end_command(machine: Machine, then: Callable[[], None] | None = None) -> None:
    """SIGTERM the command, SIGKILL after stop_grace, in the background; `then` once it has exited."""
    proc = machine.proc

    def end() -> None:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(machine.spec.stop_grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None:
            with _lock:
                machine.exits.append(proc.returncode)
                if machine.proc is proc:
                    machine.proc = None
        if then is not None:
            then()

    threading.Thread(target=end, name=f"fleet-stop-{machine.instance_id}", daemon=True).start()


# ----- moto's instances -----------------------------------------------------------------------------------
def _start_instances(original: Callable[..., Any]) -> Callable[..., Any]:
    def start(self: Any, instance_ids: list[str]) -> Any:
        with _lock:
            for instance in self.get_multi_instances_by_id(instance_ids):
                if instance.id in _machines and instance.state == "stopping":
                    raise EC2ClientError(
                        "IncorrectInstanceState",
                        f"The instance '{instance.id}' is not in a state from which it can be started.",
                    )
        return original(self, instance_ids)

    return start


def _instance_start(original: Callable[..., Any]) -> Callable[..., Any]:
    def start(self: Any) -> Any:
        with _lock:
            machine = _machines.get(self.id)
            if machine is not None and self.state in ("running", "pending"):
                return copy.copy(self._state)  # AWS: a start of a started instance changes nothing
            previous = original(self)
            if machine is None or self.state != "running":
                return previous
            _instances[self.id] = self
            if machine.spec.pending_seconds <= 0:
                _entered_running(machine, self)
                return previous
            _set_state(self, PENDING)

            def running() -> None:
                with _lock:
                    if self.state == "pending" and _machines.get(self.id) is machine:
                        _set_state(self, RUNNING)
                        _entered_running(machine, self)

            timer = threading.Timer(machine.spec.pending_seconds, running)
            timer.daemon = True
            timer.start()
            return previous

    return start


def _instance_stop(original: Callable[..., Any]) -> Callable[..., Any]:
    def stop(self: Any) -> Any:
        with _lock:
            previous = original(self)
            machine = _machines.get(self.id)
            if machine is None:
                return previous
            _left_running(machine)
            if machine.proc is None or machine.proc.poll() is not None:
                return previous
            _set_state(self, STOPPING)  # until the host has shut down

            def stopped() -> None:
                with _lock:
                    if self.state == "stopping":
                        _set_state(self, STOPPED)

            _end_command(machine, stopped)
            return previous

    return stop


def _instance_terminate(original: Callable[..., Any]) -> Callable[..., Any]:
    def terminate(self: Any) -> Any:
        with _lock:
            previous = original(self)
            machine = _machines.get(self.id)
            if machine is not None:
                _left_running(machine)
                _end_command(machine)
            return previous

    return terminate


def _reset(original: Callable[..., Any]) -> Callable[..., Any]:
    def reset_all(self: Any) -> None:
        forget_all()
        original(self)

    return reset_all


def forget_all() -> None:
    with _lock:
        machines = list(_machines.values())
        _machines.clear()
        _instances.clear()
    for machine in machines:
        _left_running(machine)
        _end_command(machine)


# ----- the control ----------------------------------------------------------------------------------------
def _find_instance(instance_id: str) -> Any:
    from moto.backends import get_backend

    for account in get_backend("ec2").values():
        for backend in account.values():
            for reservation in backend.reservations.values():
                for instance in reservation.instances:
                    if instance.id == instance_id:
                        return instance
    return None


def register(body: Any) -> None:
    """POST: the instances given are registered (null: forgotten). ValueError naming what is wrong."""
    instances = body.get("instances") if isinstance(body, dict) and set(body) == {"instances"} else None
    if not isinstance(instances, dict):
        raise ValueError('expected {"instances": {"<instance id>": {"argv": [...], ...} or null}}')
    parsed: dict[str, Spec | None] = {}
    found: dict[str, Any] = {}
    for instance_id, raw in instances.items():
        found[instance_id] = _find_instance(instance_id)
        if found[instance_id] is None:
            raise ValueError(f"{instance_id}: no such instance")
        parsed[instance_id] = None if raw is None else parse_spec(instance_id, raw)
    with _lock:
        for instance_id, spec in parsed.items():
            old = _machines.pop(instance_id, None)
            if old is not None:
                _left_running(old)
                _end_command(old)
            if spec is None:
                continue
            machine = Machine(instance_id, spec)
            _machines[instance_id] = machine
            _instances[instance_id] = found[instance_id]
            if found[instance_id].state == "running":
                _entered_running(machine, found[instance_id])


def state() -> dict[str, Any]:
    with _lock:
        return {"instances": {i: m.view(_instances.get(i)) for i, m in sorted(_machines.items())}}


def apply() -> None:
    backend = ec2_instances.InstanceBackend
    backend.start_instances = _start_instances(backend.start_instances)  # type: ignore[method-assign]
    instance = ec2_instances.Instance
    instance.start = _instance_start(instance.start)  # type: ignore[method-assign]
    instance.stop = _instance_stop(instance.stop)  # type: ignore[method-assign]
    instance.terminate = _instance_terminate(instance.terminate)  # type: ignore[method-assign]
    MotoAPIBackend.reset = _reset(MotoAPIBackend.reset)  # type: ignore[method-assign]
    launching.CONTROLS["fleet"] = (state, register)
