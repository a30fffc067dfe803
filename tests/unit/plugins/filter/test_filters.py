"""The idle sweep's filters: thresholds from tags, the summary and its lines."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError
from ansible_collections.llmfleet.aws.plugins.filter.duration import duration_seconds
from ansible_collections.llmfleet.aws.plugins.filter.idle import idle_report, idle_summary, wake_line

PRICES = {"g5.xlarge": {"usd_per_hour": 1.006, "gpus": 1}, "g5.12xlarge": {"usd_per_hour": 5.672, "gpus": 4}}


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90),
        ("90", 90),
        ("90s", 90),
        ("30m", 1800),
        ("1.5h", 5400),
        ("2d", 172800),
        (" 1H ", 3600),
        ("0", 0),
        (0.5, 0.5),
        ("never", None),
        ("off", None),
        ("Always-On", None),
    ],
)
def test_durations(value: object, seconds: float | None) -> None:
    assert duration_seconds(value) == seconds


@pytest.mark.parametrize("value", ["soon", "30 minutes", "-5", "1h30m", "", True, "m"])
def test_bad_durations_name_the_value_and_what_it_is(value: object) -> None:
    with pytest.raises(
        AnsibleFilterError, match=r"tag llmfleet:idle-after: .* (is not a duration|is negative)"
    ):
        duration_seconds(value, "tag llmfleet:idle-after")


def host(name: str, outcome: str, instance_type: str = "g5.xlarge", **extra: object) -> dict[str, object]:
    return {
        "instance_id": f"i-{name}",
        "name": name,
        "instance_type": instance_type,
        "outcome": outcome,
        "idle_seconds": 4000.0,
        "idle_after": 1800,
        "inflight": 0,
        "reason": "",
        **extra,
    }


def test_summary_counts_every_outcome_and_prices_what_was_stopped() -> None:
    results = [
        host("b", "stopped", "g5.12xlarge"),
        host("a", "stopped"),
        host("c", "busy", inflight=2),
        host("d", "unreachable", reason="connection refused"),
        host("e", "stopped", "x9.huge"),
    ]
    summary = idle_summary(results, PRICES, deployment="prod")
    assert [h["name"] for h in summary["hosts"]] == ["a", "b", "c", "d", "e"]
    assert summary["counts"]["stopped"] == 3 and summary["counts"]["busy"] == 1
    assert summary["counts"]["unreachable"] == 1 and summary["counts"]["not_idle"] == 0
    assert summary["savings"] == {
        "instances": 3,
        "gpus": 5,
        "gpu_hours_per_day": 120,
        "usd_per_day": round((1.006 + 5.672) * 24, 2),
        "prices_unknown": ["x9.huge"],
    }
    lines = idle_report(summary)
    assert lines[0] == "idle sweep of prod: 5 running GPU host(s)"
    assert any("kept, busy" in line and "2 request(s) in flight" in line for line in lines)
    assert any("agent unreachable" in line and "connection refused" in line for line in lines)
    assert lines[-1].startswith("saves 120 GPU-hours and $160.27 a day") and "x9.huge" in lines[-1]


def test_a_dry_run_prices_what_it_would_stop() -> None:
    summary = idle_summary([host("a", "would_stop"), host("b", "not_idle")], PRICES, dry_run=True)
    assert summary["dry_run"] is True and summary["savings"]["instances"] == 1
    assert "dry run" in idle_report(summary)[0] and idle_report(summary)[-1].startswith(
        "would save 24 GPU-hours"
    )


def test_an_unknown_outcome_is_an_error() -> None:
    with pytest.raises(AnsibleFilterError, match="unknown outcome 'gone'"):
        idle_summary([host("a", "gone")], PRICES)


def test_wake_lines() -> None:
    woken = {"name": "a", "instance_id": "i-a", "state_before": "stopped", "ready": True, "seconds": 41.25}
    assert wake_line(woken) == "  ready after 41.2s  a (i-a, was stopped)"
    late = {**woken, "ready": False, "reason": "models missing"}
    assert wake_line(late).startswith("  NOT ready after") and late["reason"] in wake_line(late)
