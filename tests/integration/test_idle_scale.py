"""One sweep over 50 emulated GPU hosts, each with a real agent: it completes and decides every host.

Half the hosts are idle past a zero threshold (stopped), half have an hour to go (kept). The sweep's
duration is printed at the end of the test run (section "figures"); docs/performance.md has the figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_fleet import Fleet, fleet
from idle_support import Deployment, outcomes

pytestmark = pytest.mark.slow

HOSTS = 50


@pytest.fixture
def fifty(tmp_path: Path) -> Iterator[Fleet]:
    with fleet(tmp_path / "agents") as made:
        made.add_many([f"h{i:02d}" for i in range(HOSTS)])
        made.start()
        yield made


def test_a_sweep_over_fifty_hosts_decides_every_one(
    fifty: Fleet,
    aws: Any,
    aws_endpoint: str,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    dep = Deployment("idle-fifty", aws, aws_endpoint, tmp_path / "state", fifty.operator_key)
    for i, (name, agent) in enumerate(sorted(fifty.agents.items())):
        dep.launch(name, agent.url, "0" if i % 2 == 0 else "1h")

    started = time.monotonic()
    _run, summary = dep.sweep()
    took = time.monotonic() - started

    record_property("figure", f"idle sweep over {HOSTS} hosts with agents: {took:.1f} s")
    expected = {name: "stopped" if i % 2 == 0 else "not_idle" for i, name in enumerate(sorted(fifty.agents))}
    assert outcomes(summary) == expected
    states = dep.states()
    assert all(states[n] in ("stopping", "stopped") for n, o in expected.items() if o == "stopped")
    assert all(states[n] == "running" for n, o in expected.items() if o == "not_idle")
    assert summary["savings"]["instances"] == HOSTS // 2
