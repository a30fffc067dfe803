"""Wake on request: a request for a model that no ready host serves, when a host that serves it is stopped
(or starting, or stopping), starts that host (EC2 StartInstances) and is held until its agent is ready with
the model, then routed as any other.

One wake per model: the requests for that model during the wake wait for the same host (at most
`gateway.wake.queue` of them; one more is answered 503). A host that AWS has no capacity for
(InsufficientInstanceCapacity) makes way for the next stopped host with the model; when none is left the
held requests get 503 naming what was tried. A request waits at most `gateway.wake.timeout`. A host that is
stopping (the idle sweep stopped it) is started again once it has stopped. Starting a host that another
gateway started already is harmless: AWS answers that it is pending or running.

Held requests have been sent nothing (a streamed answer starts when the host answers), so a client's own
timeout is the only other limit: docs/gateway.md says how long a start takes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..config import WakeConfig
from ..logs import clip, event
from ..proxy.handler import Refused
from .ec2 import StartRefused
from .fleet import Fleet, Host, model_key

log = logging.getLogger("llmfleet.gateway")
RETRY_AFTER = 30  # seconds: a start takes minutes, a client asking again sooner only adds load
HISTORY = 20  # finished wakes kept for /gateway/status

STARTING, BOOTING, LOADING, READY, FAILED = "starting", "booting", "loading model", "ready", "failed"


@dataclass
class Wake:
    model: str  # as the first request named it
    key: str  # model_key
    since: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    host: str | None = None
    phase: str = STARTING
    waiting: int = 0
    served: int = 0  # requests released to the host
    tried: list[str] = field(default_factory=list)
    error: str | None = None
    ended: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def view(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "host": self.host,
            "since": self.since,
            "phase": self.phase,
            "seconds": round((self.ended or time.monotonic()) - self.started, 1),
            "waiting": self.waiting,
            "served": self.served,
            "tried": list(self.tried),
            "error": self.error,
        }


def phase_of(host: Host, key: str) -> str:
    """Where a starting host is: EC2 starting it, its system booting (its agent not answering yet), its
    agent loading the model, or ready."""
    if host.state != "running":
        return STARTING
    if host.checked_at is None or any(r.startswith("not reachable") for r in host.reasons[:1]):
        return BOOTING
    if host.usable(time.monotonic()) and key in host.models:
        return READY
    return LOADING


class Waker:
    def __init__(self, fleet: Fleet, cfg: WakeConfig) -> None:
        self._fleet = fleet
        self.cfg = cfg
        self._wakes: dict[str, Wake] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.history: deque[Wake] = deque(maxlen=HISTORY)

    def status(self) -> list[dict[str, Any]]:
        """The wakes under way, then the last ones that ended, newest first."""
        return [w.view() for w in self._wakes.values()] + [w.view() for w in reversed(self.history)]

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def hold(self, model: str) -> None:
        """Start a host with `model` if none is starting, and wait until one is ready (Refused: 503 with
        Retry-After when the queue is full, the wake failed, or it took longer than the timeout)."""
        key = model_key(model) or model
        wake = self._wakes.get(key)
        if wake is None:
            wake = Wake(model, key)
            self._wakes[key] = wake
            task = asyncio.create_task(self._run(wake), name=f"gateway-wake-{key}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            event(log, logging.INFO, "waking a host", model=model)
        if wake.waiting >= self.cfg.queue:
            raise self._refused(
                wake, f"{self.cfg.queue} requests already wait for it", reason="wake_queue_full"
            )
        wake.waiting += 1
        try:
            await asyncio.wait_for(wake.done.wait(), self.cfg.timeout)
        except asyncio.TimeoutError:  # not builtins.TimeoutError before Python 3.11 (the gateways' 3.10)
            raise self._refused(wake, f"not ready within {self.cfg.timeout:g}s", "wake_timeout") from None
        finally:
            wake.waiting -= 1
        if wake.error is not None:
            raise Refused(503, wake.error, self._retry(), reason="wake_failed")
        wake.served += 1

    def _retry(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER)}

    def _refused(self, wake: Wake, why: str, reason: str) -> Refused:
        host = f"host {wake.host}" if wake.host else "a host"
        seconds = math.floor(time.monotonic() - wake.started)
        message = (
            f"model {wake.model!r}: {host} with it is starting ({wake.phase}, for {seconds}s) and {why};"
            f" retry in {RETRY_AFTER}s"
        )
        return Refused(503, message, self._retry(), reason=reason)

    # --- the wake ---------------------------------------------------------------------------------------
    async def _run(self, wake: Wake) -> None:
        deadline = wake.started + self.cfg.timeout
        try:
            wake.error = await self._wake(wake, deadline)
        except asyncio.CancelledError:
            wake.error = f"model {wake.model!r}: the gateway is stopping; retry later"
            raise
        except Exception as exc:  # an EC2 or programming error: the held requests must hear of it
            wake.error = clip(f"model {wake.model!r}: waking a host failed: {type(exc).__name__}: {exc}")
        finally:
            wake.phase = READY if wake.error is None else FAILED
            wake.ended = time.monotonic()
            self._wakes.pop(wake.key, None)
            self.history.append(wake)
            wake.done.set()
            fields = {"model": wake.model, "host": wake.host, "seconds": round(wake.ended - wake.started, 1)}
            if wake.error is None:
                event(log, logging.INFO, "woke a host", **fields)
            else:
                event(log, logging.WARNING, "could not wake a host", error=wake.error, **fields)

    async def _wake(self, wake: Wake, deadline: float) -> str | None:
        """None once a host with the model is ready; else why not (the held requests' 503)."""
        given_up: set[str] = set()
        while time.monotonic() < deadline:
            host = self._pick(wake.key, given_up)
            if host is None:
                tried = "; ".join(wake.tried) or "no host of the fleet has it"
                return f"model {wake.model!r}: no host with it could be started ({tried}); retry later"
            wake.host = host.id
            why = await self._bring_up(wake, host.id, deadline)
            if why is None:
                return None
            wake.tried.append(f"{host.id}: {why}")
            given_up.add(host.id)
        return (
            f"model {wake.model!r}: host {wake.host} is starting ({wake.phase}) and was not ready within"
            f" {self.cfg.timeout:g}s; retry later"
        )

    def _pick(self, key: str, given_up: set[str]) -> Host | None:
        """The host to wake for the model: one that is coming up already, else a stopped one, else one that
        is stopping (started again once stopped)."""
        order = {"running": 0, "pending": 1, "stopped": 2, "stopping": 3}
        hosts = [
            h
            for h in self._fleet.hosts.values()
            if h.id not in given_up and h.state in order and (key in h.models or key in h.declared)
        ]
        hosts.sort(key=lambda h: (order[h.state], h.id))
        return hosts[0] if hosts else None

    async def _bring_up(self, wake: Wake, host_id: str, deadline: float) -> str | None:
        """Start the host if it needs it and wait until it is ready with the model: None, or why not.

        A host this wake did not start (running already: another gateway woke it, or it is broken) is waited
        for only `boot_grace` after the gateway first saw it running: a crashed agent or a host that cannot
        get ready must not hold the requests for the whole timeout while a stopped host could be started.
        After a start, only a look at the fleet that saw the host come up counts when it is stopped again
        (a look begun before the start still says stopped)."""
        started = came_up = False
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            host = self._fleet.hosts.get(host_id)
            if host is None:
                return "it is gone (terminated)"
            if host.state in ("pending", "running"):
                came_up = True
            if host.state == "stopped" and started and (came_up or host.reason.startswith("Server.")):
                return f"AWS stopped it again ({host.reason or 'no reason given'})"
            if host.state == "stopped" and not started:
                wake.phase = STARTING
                try:
                    now = await loop.run_in_executor(None, self._fleet.ec2.start, host_id)
                except StartRefused as exc:
                    if exc.code != "IncorrectInstanceState":
                        return clip(str(exc)) or exc.code
                    wake.phase = "waiting for it to stop"  # stopping after all: wait for it to stop
                else:
                    started = True
                    host.state = now  # pending: this gateway's look must not take the start back
                    event(log, logging.INFO, "started a host", host=host_id, model=wake.model)
            elif host.state == "stopping":
                wake.phase = "waiting for it to stop"
            elif host.state in ("pending", "running"):
                wake.phase = phase_of(host, wake.key)
                if wake.phase == READY:
                    return None
                if host.ready and wake.key not in host.models:
                    return "its agent is ready but does not have the model"
                if "draining" in host.reasons:  # an idle sweep stops it: started again once stopped
                    wake.phase = "waiting for it to stop"
                    waited = 0.0
                else:
                    waited = time.monotonic() - (host.up_since or time.monotonic())
                if not started and waited > self.cfg.boot_grace:
                    return f"its agent is not ready {waited:.0f}s after it was seen running ({wake.phase})"
            await asyncio.sleep(self.cfg.poll_interval)
            await self._fleet.refresh()
        return f"not ready within {self.cfg.timeout:g}s ({wake.phase})"
