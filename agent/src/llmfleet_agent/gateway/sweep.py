"""The idle sweep, run by the gateway inside the VPC, where the agents' private addresses answer.

Every `gateway.sweep.interval`, the same sweep as playbooks/idle_shutdown.yml, by the same rules
(idle_rules.py: one file for both): each running GPU host's agent is asked to drain if it has been idle
past its host's threshold (tag llmfleet:idle-after; the agent decides and refuses new work in one step, so
nothing slips in between, and a stream in flight makes it busy); the instances whose agent drained are
stopped (EC2 StopInstances; the gateway's role may stop only this deployment's GPU hosts); an agent whose
stop failed is resumed. A drained host gets no more of the gateway's requests from that moment, and a
request for its model afterwards wakes it again (wake.py). The summary (each host's outcome, what the
stopped hosts save) is written as JSON and shown in `GET /gateway/status`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from .. import idle_rules
from ..config import SweepConfig
from ..logs import clip, event
from ..tasks import cancel
from .ec2 import StopRefused
from .fleet import Fleet, Host

log = logging.getLogger("llmfleet.gateway")
DRAIN_PATH, IDLE_PATH, RESUME_PATH = "/agent/drain", "/agent/idle", "/agent/resume"
STOP_BACKOFF = 10  # sweeps a host whose stop failed is left out of


class Sweeper:
    def __init__(self, fleet: Fleet, cfg: SweepConfig, deployment: str, summary_file: Path) -> None:
        self._fleet = fleet
        self.cfg = cfg
        self.deployment = deployment
        self.summary_file = summary_file
        self.last: dict[str, Any] | None = None
        self.last_stopped: dict[str, Any] | None = None  # the last sweep that stopped a host (or failed to)
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        # hosts whose stop failed (stop protection, a missing grant): left alone for STOP_BACKOFF sweeps, or
        # each sweep would drain, fail to stop and resume them again, refusing their requests every time
        self._stop_failed: dict[str, float] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="gateway-sweep")

    async def stop(self) -> None:
        await cancel(self._task)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval)
            try:
                if await self.sweep() is not None:
                    self.last_error = None
            except Exception as exc:  # EC2 or the disk: the next sweep tries again
                self.last_error = clip(f"{type(exc).__name__}: {exc}")
                event(log, logging.WARNING, "the idle sweep failed", error=self.last_error)

    async def sweep(self) -> dict[str, Any] | None:
        """One sweep: its summary (idle_rules.idle_summary's); None when EC2 could not be asked (the hosts
        last known may be stale, and a host drained now could not be stopped: nothing is drained)."""
        await self._fleet.refresh()
        if self._fleet.last_error is not None:
            self.last_error = f"not swept: {self._fleet.last_error}"
            return None
        now = time.monotonic()
        backoff = STOP_BACKOFF * self.cfg.interval
        self._stop_failed = {i: t for i, t in self._stop_failed.items() if now - t < backoff}
        hosts = {
            h.id: h
            for h in self._fleet.hosts.values()
            if h.state == "running" and h.id not in self._stop_failed
        }
        instances = [
            {
                "instance_id": h.id,
                "instance_type": h.instance_type,
                "tags": {**h.instance_tags, idle_rules.AGENT_URL_TAG: h.url},  # the address the gateway uses
            }
            for h in hosts.values()
        ]
        plan = idle_rules.idle_sweep_plan(instances, self.cfg.default_idle_after)
        asked = list(
            await asyncio.gather(*(self._ask(hosts[a["id"]], a["drain_if_idle_for"]) for a in plan["agents"]))
        )
        drained = [a["id"] for a in asked if a.get("drained")]
        failures = dict(zip(drained, await asyncio.gather(*(self._stop(i) for i in drained)), strict=True))
        stopped = [i for i, failure in failures.items() if failure is None]
        failed = [i for i, failure in failures.items() if failure is not None]
        self._stop_failed.update(dict.fromkeys(failed, time.monotonic()))
        resumed = list(await asyncio.gather(*(self._resume(hosts[i]) for i in failed)))
        stops = {"stop_success": stopped, "msg": "; ".join(f"{i}: {failures[i]}" for i in failed)}
        results = idle_rules.idle_outcomes(plan, {"agents": asked}, stops, {"agents": resumed})
        prices = {name: price.model_dump() for name, price in self.cfg.prices.items()}
        summary = idle_rules.idle_summary(results, prices, deployment=self.deployment)
        self.last = summary
        if drained:  # the file and the status keep the last sweep that stopped (or failed to stop) a host
            self.last_stopped = summary
            self._write(summary)
        if drained or failed:
            for line in idle_rules.idle_report(summary):
                event(log, logging.INFO, "idle sweep", line=line.strip())
        return summary

    async def _ask(self, host: Host, threshold: float | None) -> dict[str, Any]:
        """The agent's answer as agent_idle_batch gives it: drained (or not, and why) when it has a threshold,
        its figures only when it is always on."""
        result: dict[str, Any] = {"id": host.id, "url": host.url, "changed": False}
        try:
            if threshold is None:
                status, body = await self._fleet.call(host, "GET", IDLE_PATH)
                return self._answered(result, status, body, (200,))
            status, body = await self._fleet.call(host, "POST", DRAIN_PATH, {"if_idle_for": threshold})
            drained = status == 200
            if drained:  # none of this gateway's requests from this moment: the agent refuses them now
                host.ready, host.reasons, host.state = False, ["draining"], "stopping"
            overrides = {"drained": drained, "would_drain": drained, "changed": drained}
            if not drained and isinstance(body, dict):
                overrides["reason"] = str(body.get("error") or "")
            return self._answered(result, status, body, (200, 409), **overrides)
        except Exception as exc:  # no answer: kept, as the playbook keeps it
            message = f"cannot reach the llmfleet agent at {host.url}: {self._fleet.unreachable(exc)}"
            return {**result, "answered": False, "agent_unreachable": True, "msg": clip(message)}

    def _answered(
        self, result: dict[str, Any], status: int, body: Any, expected: tuple[int, ...], **overrides: Any
    ) -> dict[str, Any]:
        figures = idle_rules.idle_figures(body)
        if status not in expected or figures is None:
            message = f"the llmfleet agent at {result['url']} answered HTTP {status}: {clip(str(body))}"
            return {**result, "answered": False, "agent_unreachable": False, "status": status, "msg": message}
        return {**result, "answered": True, **idle_rules.agent_result(status, figures, **overrides)}

    async def _stop(self, instance_id: str) -> str | None:
        """None when the stop was taken; else why not (AWS's error, or no answer from EC2: the agent is then
        resumed all the same, never left draining on a running host)."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._fleet.ec2.stop, instance_id)
        except StopRefused as exc:
            return clip(str(exc)) or exc.code
        except Exception as exc:  # botocore's own: credentials, the endpoint, a timeout
            return clip(f"{type(exc).__name__}: {exc}") or type(exc).__name__
        event(log, logging.INFO, "stopped an idle host", host=instance_id)
        return None

    async def _resume(self, host: Host) -> dict[str, Any]:
        result: dict[str, Any] = {"id": host.id, "url": host.url, "changed": False}
        try:
            status, body = await self._fleet.call(host, "POST", RESUME_PATH, {})
        except Exception as exc:
            message = f"cannot reach the llmfleet agent at {host.url}: {self._fleet.unreachable(exc)}"
            return {**result, "answered": False, "agent_unreachable": True, "msg": clip(message)}
        answered = self._answered(result, status, body, (200,), changed=True, resumed=True)
        if answered["answered"]:
            host.state = "running"  # it did not stop: the next look at the fleet sees it ready again
        return answered

    def _write(self, summary: dict[str, Any]) -> None:
        """The summary as JSON, replaced whole (a reader never sees half of one)."""
        self.summary_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.summary_file.with_name(self.summary_file.name + ".partial")
        partial.write_text(json.dumps(summary, indent=2) + "\n")
        partial.replace(self.summary_file)

    def status(self) -> dict[str, Any]:
        return {
            "interval": self.cfg.interval,
            "last_error": self.last_error,
            "last": self.last,
            "last_stopped": self.last_stopped,
        }
