# Copyright: llmfleet developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The idle sweep's rules, shared by the collection and the agent: what each host's threshold is (its tag
llmfleet:idle-after), what each host's answers and stop mean (its outcome), what the sweep saves, and how
its report reads.

The collection's filters (plugins/filter/idle.py: idle_sweep_plan, idle_outcomes, idle_summary,
idle_report, wake_line) wrap these for playbooks/idle_shutdown.yml; the agent package carries this very file
as llmfleet_agent/idle_rules.py (a symbolic link: its wheel holds a copy) for the gateway's sweep. Pure
Python, standard library and durations.py only. Errors are ValueError.

The sweep: idle_sweep_plan (each running instance's agent URL, certificate and threshold, from its tags) ->
ask every agent at once to drain if idle past its threshold -> stop the instances whose agent drained ->
resume an agent whose stop failed -> idle_outcomes (each host's fate) -> idle_summary (counts and savings)
-> idle_report (the lines printed). wake_line is one line of wake's report.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .durations import parse_duration


def _whole(seconds: float | None) -> float | int | None:
    return int(seconds) if seconds is not None and float(seconds).is_integer() else seconds


# ----- an agent's answers ---------------------------------------------------------------------------------
def idle_figures(body: object) -> dict | None:
    """The idle figures of an answer, typed; None when the body is not them."""
    if not isinstance(body, dict):
        return None
    try:
        idle_seconds, inflight = body["idle_seconds"], body["inflight"]
        last_activity, draining = body["last_activity"], body["draining"]
    except KeyError:
        return None
    numbers = (int, float)
    if (
        isinstance(idle_seconds, bool)
        or not isinstance(idle_seconds, numbers)
        or isinstance(inflight, bool)
        or not isinstance(inflight, int)
        or not (
            last_activity is None
            or (isinstance(last_activity, numbers) and not isinstance(last_activity, bool))
        )
        or not isinstance(draining, bool)
    ):
        return None
    return {
        "idle_seconds": float(idle_seconds),
        "inflight": inflight,
        "last_activity": None if last_activity is None else float(last_activity),
        "draining": draining,
    }


def meets(figures: dict, threshold: float) -> bool:
    """Whether the agent would drain: nothing in flight and idle at least `threshold` seconds."""
    return figures["inflight"] == 0 and figures["idle_seconds"] >= threshold


def agent_result(status: int, figures: dict, **overrides: Any) -> dict:
    """One agent's result in a sweep (what agent_idle_batch returns per agent, and the gateway's sweep
    too): the idle figures of its last answer, and what the call did in `overrides` (changed, drained,
    would_drain, resumed, reason)."""
    result: dict = dict(
        changed=False, drained=False, reason="", resumed=False, status=status, agent_unreachable=False
    )
    result.update(figures)
    result.update(overrides)
    return result


# ----- the sweep -------------------------------------------------------------------------------------------
# every outcome of a swept host, in the order the report lists them
OUTCOMES = {
    "stopped": "stopped",
    "would_stop": "would stop",
    "stop_failed": "kept, the stop failed",
    "busy": "kept, busy",
    "not_idle": "kept, not idle long enough",
    "always_on": "kept, always on",
    "unreachable": "kept, agent unreachable",
    "error": "kept, error",
}
HOURS_A_DAY = 24
IDLE_AFTER_TAG = "llmfleet:idle-after"
AGENT_URL_TAG = "llmfleet:agent-url"
HOST_TAG = "llmfleet:host"


def _host_plan(
    instance: Mapping[str, Any], default_idle_after: Any, scheme: str, port: int, certs_dir: str, ca_path: str
) -> dict[str, Any]:
    instance_id = instance["instance_id"]
    tags = instance.get("tags") or {}
    url = tags.get(AGENT_URL_TAG) or f"{scheme}://{instance.get('private_ip_address') or ''}:{port}"
    cert = Path(certs_dir, f"{instance_id}.crt") if certs_dir else None
    host = {
        "instance_id": instance_id,
        "name": tags.get(HOST_TAG) or tags.get("Name") or instance_id,
        "instance_type": instance.get("instance_type", ""),
        "agent_url": url,
        "ca_path": str(cert) if cert and cert.is_file() else ca_path,
        "idle_after": None,
        "error": "",
    }
    try:
        host["idle_after"] = _whole(parse_duration(tags.get(IDLE_AFTER_TAG) or default_idle_after))
    except ValueError as e:
        host["error"] = f"tag {IDLE_AFTER_TAG} of {instance_id}: {e}"
    return host


def idle_sweep_plan(
    instances: Sequence[Mapping[str, Any]],
    default_idle_after: Any = "30m",
    scheme: str = "https",
    port: int = 8443,
    certs_dir: str = "",
    ca_path: str = "",
) -> dict[str, Any]:
    """What the sweep asks of the running `instances` (ec2_instance_info's): `hosts`, one per instance with
    its name, type, agent URL, certificate and threshold in seconds (None: always on) or the `error` of a bad
    llmfleet:idle-after tag; and `agents`, the options of agent_idle_batch for the hosts without an error.

    The agent URL is the tag llmfleet:agent-url, else <scheme>://<private address>:<port>; the certificate is
    <certs_dir>/<instance id>.crt when it exists, else `ca_path`.
    """
    hosts = [_host_plan(i, default_idle_after, scheme, int(port), certs_dir, ca_path) for i in instances]
    agents = []
    for host in hosts:
        if host["error"]:
            continue
        agent = {"id": host["instance_id"], "url": host["agent_url"], "drain_if_idle_for": host["idle_after"]}
        if host["ca_path"]:
            agent["ca_path"] = host["ca_path"]
        agents.append(agent)
    return {"hosts": hosts, "agents": agents}


def _stop_failure(stops: Mapping[str, Any], resumed: Mapping[str, Any] | None) -> str:
    why = f"stop failed: {stops.get('msg') or 'no answer'}; the agent "
    if resumed is not None and resumed.get("answered") and not resumed.get("draining"):
        return why + "was resumed"
    return why + "could NOT be resumed: " + str((resumed or {}).get("msg") or "no answer")


def _fate(host: Mapping[str, Any], asked: Mapping[str, Any] | None, stopped: bool, check_mode: bool) -> str:
    if host["error"]:
        return "error"
    if asked is None or not asked.get("answered"):
        return "unreachable" if asked is None or asked.get("agent_unreachable") else "error"
    if asked.get("drained"):
        return "stopped" if stopped else "stop_failed"
    if host["idle_after"] is None:
        return "always_on"
    if check_mode and asked.get("would_drain"):
        return "would_stop"
    return "busy" if int(asked.get("inflight") or 0) > 0 else "not_idle"


def idle_outcomes(
    plan: Mapping[str, Any],
    asked: Mapping[str, Any],
    stops: Mapping[str, Any] | None = None,
    resumed: Mapping[str, Any] | None = None,
    check_mode: bool = False,
) -> list[dict[str, Any]]:
    """Each host's outcome, for idle_summary: `plan` is idle_sweep_plan's, `asked` agent_idle_batch's drain
    result, `stops` ec2_instance's stop result (its stop_success), `resumed` agent_idle_batch's resume of the
    hosts whose stop failed. A host that drained but is not in stop_success is stop_failed."""
    by_id = {a["id"]: a for a in (asked or {}).get("agents", [])}
    resumed_by_id = {a["id"]: a for a in (resumed or {}).get("agents", [])}
    stopped_ids = set((stops or {}).get("stop_success") or [])
    results = []
    for host in plan["hosts"]:
        answer = by_id.get(host["instance_id"])
        outcome = _fate(host, answer, host["instance_id"] in stopped_ids, check_mode)
        if outcome == "error" and host["error"]:
            reason = host["error"]
        elif outcome in ("unreachable", "error"):
            reason = str((answer or {}).get("msg") or "no answer")
        elif outcome == "stop_failed":
            reason = _stop_failure(stops or {}, resumed_by_id.get(host["instance_id"]))
        else:
            reason = str(answer.get("reason") or "")
        results.append(
            {
                "instance_id": host["instance_id"],
                "name": host["name"],
                "instance_type": host["instance_type"],
                "agent_url": host["agent_url"],
                "idle_after": host["idle_after"],
                "idle_seconds": (answer or {}).get("idle_seconds"),
                "inflight": (answer or {}).get("inflight"),
                "outcome": outcome,
                "reason": reason,
            }
        )
    return results


def idle_summary(
    results: Sequence[Mapping[str, Any]],
    prices: Mapping[str, Mapping[str, Any]],
    deployment: str = "",
    dry_run: bool = False,
) -> dict[str, Any]:
    """The sweep's summary: every host's outcome, counts per outcome, and what the stopped hosts (the
    hosts it would stop, in a dry run) save a day at the current rate, from `prices`
    ({instance type: {usd_per_hour, gpus}})."""
    hosts = sorted((dict(r) for r in results), key=lambda r: (str(r.get("name")), str(r.get("instance_id"))))
    for host in hosts:
        if host.get("outcome") not in OUTCOMES:
            raise ValueError(
                f"idle_summary: host {host.get('instance_id')}: unknown outcome {host.get('outcome')!r}"
            )
    saving = [h for h in hosts if h["outcome"] == ("would_stop" if dry_run else "stopped")]
    known = [prices[h["instance_type"]] for h in saving if h["instance_type"] in prices]
    gpus = sum(int(p["gpus"]) for p in known)
    return {
        "deployment": deployment,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dry_run": bool(dry_run),
        "counts": {o: sum(1 for h in hosts if h["outcome"] == o) for o in OUTCOMES},
        "hosts": hosts,
        "savings": {
            "instances": len(saving),
            "gpus": gpus,
            "gpu_hours_per_day": gpus * HOURS_A_DAY,
            "usd_per_day": round(sum(float(p["usd_per_hour"]) for p in known) * HOURS_A_DAY, 2),
            "prices_unknown": sorted(
                {h["instance_type"] for h in saving if h["instance_type"] not in prices}
            ),
        },
    }


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "?"
    s = int(float(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _line(host: Mapping[str, Any]) -> str:
    what = f"{host['name']} ({host['instance_id']}, {host['instance_type']})"
    outcome = host["outcome"]
    if outcome in ("stopped", "would_stop", "not_idle"):
        detail = f"idle {_duration(host.get('idle_seconds'))} of {_duration(host.get('idle_after'))}"
    elif outcome == "busy":
        detail = f"{host.get('inflight')} request(s) in flight"
    elif outcome == "always_on":
        detail = f"idle {_duration(host.get('idle_seconds'))}, tag llmfleet:idle-after=never"
    else:
        detail = str(host.get("reason") or "")
    if outcome == "stop_failed" or (outcome in ("stopped", "would_stop") and host.get("reason")):
        detail = str(host.get("reason") or detail)
    return f"  {OUTCOMES[outcome]:<28} {what}: {detail}"


def idle_report(summary: Mapping[str, Any]) -> list[str]:
    """The summary as lines to print: a header, a line per host, and the savings."""
    hosts = summary["hosts"]
    dry = summary["dry_run"]
    saved = summary["savings"]
    header = f"idle sweep of {summary['deployment']}: {len(hosts)} running GPU host(s)"
    if dry:
        header += " (dry run: nothing drained or stopped)"
    order = list(OUTCOMES)
    lines = [header] + [_line(h) for h in sorted(hosts, key=lambda h: order.index(h["outcome"]))]
    verb = "would save" if dry else "saves"
    total = (
        f"{verb} {saved['gpu_hours_per_day']} GPU-hours and ${saved['usd_per_day']:.2f} a day"
        f" at the current rate ({saved['instances']} instance(s) {'to stop' if dry else 'stopped'})"
    )
    if saved["prices_unknown"]:
        total += f"; no price for {', '.join(saved['prices_unknown'])} (idle_shutdown_prices)"
    return [*lines, total]


def wake_line(host: Mapping[str, Any]) -> str:
    """One woken host: ready after how long, or why not (or why it could not be started)."""
    what = f"{host['name']} ({host['instance_id']}, was {host['state_before']})"
    if host.get("started") is False:
        return f"  NOT started  {what}: {host.get('reason') or 'no reason given'}"
    if host["ready"]:
        return f"  ready after {float(host['seconds']):.1f}s  {what}"
    return f"  NOT ready after {float(host['seconds']):.1f}s  {what}: {host.get('reason') or 'no answer'}"
