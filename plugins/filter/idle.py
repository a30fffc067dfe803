# Copyright: llmfleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters for the reports of the idle sweep and of wake: idle_summary, idle_report and wake_line."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from ansible.errors import AnsibleFilterError

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
            raise AnsibleFilterError(
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
    """One woken host: ready after how long, or why not."""
    what = f"{host['name']} ({host['instance_id']}, was {host['state_before']})"
    if host["ready"]:
        return f"  ready after {float(host['seconds']):.1f}s  {what}"
    return f"  NOT ready after {float(host['seconds']):.1f}s  {what}: {host.get('reason') or 'no answer'}"


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"idle_summary": idle_summary, "idle_report": idle_report, "wake_line": wake_line}
