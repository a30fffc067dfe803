"""The idle sweep's filters: the plan, each host's outcome, the summary, its lines (durations: test_rules)."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError
from ansible_collections.llmfleet.aws.plugins.filter.idle import (
    idle_outcomes,
    idle_report,
    idle_summary,
    idle_sweep_plan,
    wake_line,
)

PRICES = {"g5.xlarge": {"usd_per_hour": 1.006, "gpus": 1}, "g5.12xlarge": {"usd_per_hour": 5.672, "gpus": 4}}


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
    reason = "no capacity: tried g6.xlarge in us-east-1a (InsufficientInstanceCapacity for each)"
    not_started = {**woken, "started": False, "ready": False, "seconds": 0, "reason": reason}
    assert wake_line(not_started) == f"  NOT started  a (i-a, was stopped): {reason}"


# --- the plan and the outcomes ---------------------------------------------------------------------------


def instance(iid: str, tags: dict[str, str], ip: str = "10.0.1.5") -> dict[str, object]:
    """An instance as amazon.aws.ec2_instance_info returns it (the fields the sweep reads)."""
    return {"instance_id": iid, "instance_type": "g5.xlarge", "private_ip_address": ip, "tags": tags}


def test_the_plan_takes_url_threshold_and_certificate_from_tags_and_files(tmp_path) -> None:
    (tmp_path / "i-2.crt").write_text("a certificate")
    instances = [
        instance("i-1", {"llmfleet:host": "gpu-a", "llmfleet:idle-after": "1h"}),
        instance("i-2", {"Name": "dep-gpu-b", "llmfleet:agent-url": "http://127.0.0.1:9000"}),
        instance("i-3", {"llmfleet:idle-after": "never"}),
        instance("i-4", {"llmfleet:idle-after": "soon"}),
    ]
    plan = idle_sweep_plan(
        instances, "30m", scheme="https", port=8443, certs_dir=str(tmp_path), ca_path="/ca.pem"
    )

    hosts = {h["instance_id"]: h for h in plan["hosts"]}
    assert [h["name"] for h in plan["hosts"]] == ["gpu-a", "dep-gpu-b", "i-3", "i-4"]
    assert hosts["i-1"]["agent_url"] == "https://10.0.1.5:8443" and hosts["i-1"]["idle_after"] == 3600
    assert hosts["i-1"]["ca_path"] == "/ca.pem"  # no i-1.crt: the common CA
    assert hosts["i-2"]["agent_url"] == "http://127.0.0.1:9000" and hosts["i-2"]["idle_after"] == 1800
    assert hosts["i-2"]["ca_path"] == str(tmp_path / "i-2.crt")
    assert hosts["i-3"]["idle_after"] is None and hosts["i-3"]["error"] == ""
    assert "tag llmfleet:idle-after of i-4" in hosts["i-4"]["error"] and "'soon'" in hosts["i-4"]["error"]
    # the module's options: every host but the one with a bad tag; always-on only reports
    assert plan["agents"] == [
        {"id": "i-1", "url": "https://10.0.1.5:8443", "drain_if_idle_for": 3600, "ca_path": "/ca.pem"},
        {
            "id": "i-2",
            "url": "http://127.0.0.1:9000",
            "drain_if_idle_for": 1800,
            "ca_path": str(tmp_path / "i-2.crt"),
        },
        {"id": "i-3", "url": "https://10.0.1.5:8443", "drain_if_idle_for": None, "ca_path": "/ca.pem"},
    ]


def answer(iid: str, **figures: object) -> dict[str, object]:
    """One agent's entry in agent_idle_batch's result."""
    base = {"id": iid, "answered": True, "agent_unreachable": False, "idle_seconds": 100.0, "inflight": 0}
    return {**base, "drained": False, "reason": "", **figures}


def test_outcomes_of_every_kind() -> None:
    tags = {"llmfleet:idle-after": "60"}
    plan = idle_sweep_plan(
        [
            instance("i-stop", tags),
            instance("i-fail", tags),
            instance("i-busy", tags),
            instance("i-young", tags),
            instance("i-on", {"llmfleet:idle-after": "never"}),
            instance("i-down", tags),
            instance("i-key", tags),
            instance("i-tag", {"llmfleet:idle-after": "soon"}),
        ]
    )
    asked = {
        "agents": [
            answer("i-stop", drained=True),
            answer("i-fail", drained=True),
            answer("i-busy", inflight=2, reason="not drained: 2 request(s) in flight"),
            answer("i-young", idle_seconds=5.0, reason="not drained: idle for 5.0s, less than 60s"),
            answer("i-on", idle_seconds=9000.0),
            {"id": "i-down", "answered": False, "agent_unreachable": True, "msg": "cannot reach: refused"},
            {"id": "i-key", "answered": False, "agent_unreachable": False, "msg": "refused the operator key"},
        ]
    }
    stops = {"stop_success": ["i-stop"], "msg": "OperationNotPermitted"}
    resumed = {"agents": [{"id": "i-fail", "answered": True, "draining": False, "resumed": True}]}

    got = {r["instance_id"]: r for r in idle_outcomes(plan, asked, stops, resumed)}

    assert {i: r["outcome"] for i, r in got.items()} == {
        "i-stop": "stopped",
        "i-fail": "stop_failed",
        "i-busy": "busy",
        "i-young": "not_idle",
        "i-on": "always_on",
        "i-down": "unreachable",
        "i-key": "error",
        "i-tag": "error",
    }
    assert got["i-fail"]["reason"] == "stop failed: OperationNotPermitted; the agent was resumed"
    assert got["i-young"]["reason"] == "not drained: idle for 5.0s, less than 60s"
    assert got["i-down"]["reason"] == "cannot reach: refused" and got["i-down"]["idle_seconds"] is None
    assert got["i-key"]["reason"] == "refused the operator key"
    assert "tag llmfleet:idle-after of i-tag" in got["i-tag"]["reason"]
    assert (got["i-on"]["idle_after"], got["i-busy"]["inflight"]) == (None, 2)
    # the records idle_summary takes
    assert idle_summary(list(got.values()), PRICES)["counts"]["stopped"] == 1


def test_a_failed_stop_whose_resume_failed_says_so() -> None:
    plan = idle_sweep_plan([instance("i-1", {"llmfleet:idle-after": "0"})])
    asked = {"agents": [answer("i-1", drained=True)]}
    resumed = {"agents": [{"id": "i-1", "answered": False, "msg": "cannot reach the agent: timed out"}]}

    (result,) = idle_outcomes(plan, asked, {"msg": "throttled"}, resumed)

    assert result["outcome"] == "stop_failed"
    assert (
        result["reason"]
        == "stop failed: throttled; the agent could NOT be resumed: cannot reach the agent: timed out"
    )


def test_a_dry_run_says_would_stop_only_for_hosts_that_would_drain() -> None:
    plan = idle_sweep_plan([instance("i-1", {}), instance("i-2", {})], "60")
    asked = {"agents": [answer("i-1", would_drain=True), answer("i-2", would_drain=False, idle_seconds=3.0)]}

    results = idle_outcomes(plan, asked, {}, {}, check_mode=True)

    assert [r["outcome"] for r in results] == ["would_stop", "not_idle"]


def test_ldaps_urls_give_each_controller_by_address() -> None:
    from ansible_collections.llmfleet.aws.plugins.filter.directory import ldaps_urls

    assert ldaps_urls(["10.42.128.10", "10.42.144.10"]) == [
        "ldaps://10.42.128.10:636",
        "ldaps://10.42.144.10:636",
    ]
    assert ldaps_urls(["fd00::10"]) == ["ldaps://[fd00::10]:636"]
    assert ldaps_urls([]) == []
    with pytest.raises(AnsibleFilterError, match="not a list of addresses"):
        ldaps_urls("10.42.128.10")


def test_gateway_endpoint_is_the_load_balancer_else_the_first_running_gateway() -> None:
    from ansible_collections.llmfleet.aws.plugins.filter.gateway import gateway_endpoint

    gateways = [
        {"name": "gateway-1", "private_ip": "10.42.128.7", "state": "stopped"},
        {"name": "gateway-2", "private_ip": "10.42.144.9", "state": "running"},
    ]
    assert gateway_endpoint(gateways, "internal-acme-gw-1.us-east-1.elb.amazonaws.com") == (
        "https://internal-acme-gw-1.us-east-1.elb.amazonaws.com"
    )
    assert gateway_endpoint(gateways, "", 9443) == "https://10.42.144.9:9443"
    assert gateway_endpoint(gateways, "", 9443, False) == "http://10.42.144.9:9443"
    assert gateway_endpoint([{"private_ip": "fd00::7", "state": "running"}]) == "https://[fd00::7]:8443"
    assert gateway_endpoint([]) == ""
    with pytest.raises(AnsibleFilterError, match="not a list of gateways"):
        gateway_endpoint("10.42.128.7")
    with pytest.raises(AnsibleFilterError, match="port 'x' is not a port"):
        gateway_endpoint(gateways, "", "x")


def test_gateways_have_a_load_balancer_when_several_or_certified() -> None:
    from ansible_collections.llmfleet.aws.plugins.filter.gateway import gateway_load_balanced

    arn = "arn:aws:acm:us-east-1:123456789012:certificate/abc"
    assert gateway_load_balanced(1) is False
    assert gateway_load_balanced("1", arn) is True
    assert gateway_load_balanced(2) is True
    assert gateway_load_balanced(0, arn) is False
    with pytest.raises(AnsibleFilterError, match="'two' is not a number of gateways"):
        gateway_load_balanced("two")


def test_gateway_lb_name_fits_aws_limit_without_a_trailing_dash() -> None:
    from ansible_collections.llmfleet.aws.plugins.filter.gateway import gateway_lb_name

    assert gateway_lb_name("acme") == "acme-gw"
    assert gateway_lb_name("a" * 32) == "a" * 29 + "-gw"
    # cut right after a dash: AWS refuses a name with two dashes or ending in one
    assert gateway_lb_name("abcdefghijklmnopqrstuvwxyz12-45") == "abcdefghijklmnopqrstuvwxyz12-gw"
    assert len(gateway_lb_name("b" * 32)) == 32
    with pytest.raises(AnsibleFilterError, match="gateway_lb_name: 7 is not a deployment name"):
        gateway_lb_name(7)


def test_instance_role_policy_puts_session_manager_first_and_nothing_else() -> None:
    from ansible_collections.llmfleet.aws.plugins.filter.iam import instance_role_policy

    own = {"Sid": "FindGpuHosts", "Effect": "Allow", "Action": ["ec2:DescribeInstances"], "Resource": "*"}
    policy = instance_role_policy([own])
    assert policy["Version"] == "2012-10-17"
    session_manager, found = policy["Statement"]
    assert found == own
    assert session_manager["Sid"] == "SessionManager"
    # the five actions AWS documents for Session Manager: no ssm:GetParameter (the managed core policy's)
    actions = session_manager["Action"]
    assert all(a.startswith(("ssmmessages:", "ssm:UpdateInstanceInformation")) for a in actions)
    assert instance_role_policy([])["Statement"] == [session_manager]
    with pytest.raises(AnsibleFilterError, match="needs its own Sid"):
        instance_role_policy([{"Sid": "SessionManager"}])
    with pytest.raises(AnsibleFilterError, match="needs its own Sid"):
        instance_role_policy([{"Effect": "Allow"}])
    with pytest.raises(AnsibleFilterError, match="is not a list of statements"):
        instance_role_policy("ec2:*")
