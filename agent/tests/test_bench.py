"""`make bench` runs end to end (direct, agent, gateway and the bare relay side by side) and writes its JSON
(the figures themselves live in docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_quick_run_writes_json(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads((tmp_path / "bench-quick.json").read_text())
    assert {(c["concurrency"], c["stream"]) for c in result["comparisons"]} == {
        (1, False),
        (1, True),
        (64, False),
        (64, True),
    }
    for run in result["runs"]:
        assert run["errors"] == 0 and run["requests"] > 0
    for comparison in result["comparisons"]:
        assert comparison["agent_rps"] > 0 and comparison["agent_cpu_us_per_request"] > 0
        # and over the whole phase, what the agent does after its answers counted too
        assert comparison["agent_cpu_us_all"] > 0 and comparison["ollama_cpu_us_all"] > 0
    # the gateway beside the agent, in the same run: every request through it answered
    assert {(c["concurrency"], c["stream"]) for c in result["gateway_comparisons"]} == {
        (c["concurrency"], c["stream"]) for c in result["comparisons"]
    }
    assert all(
        c["gateway_rps"] > 0 and c["gateway_cpu_us_per_request"] > 0 for c in result["gateway_comparisons"]
    )
    # the bare relay (the gateway's frame alone) in the same run, beside the gateway: what the gateway adds
    # is read against it
    assert all(c["relay_cpu_us_per_request"] > 0 for c in result["gateway_comparisons"])
    assert all(
        c["gateway_cpu_us_all"] > 0 and c["relay_cpu_us_all"] > 0 for c in result["gateway_comparisons"]
    )
    assert {run["target"] for run in result["runs"]} == {"direct", "agent", "gateway", "relay"}
    assert result["agent_memory"]["peak_rss_mib"] > 0
    assert "added p50" in res.stdout
