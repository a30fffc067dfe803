#!/usr/bin/env python3
"""Two versions of the agent in one bench run: each version's simulator, agent and gateway (six sides),
their requests interleaved as bench.py interleaves its sides, so that the VM's drift between runs (often
larger than the difference sought) falls on both alike.

Each version is a venv's bin directory with `llmfleet-agent` and `llmfleet-ollama-sim` installed (e.g. a
git worktree of the base commit with its own `make venv`). Runs alternate which version goes first.

    .venv/bin/python bench/versions.py --base /path/to/base/.venv/bin [--runs 3] [--requests-c1 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

import bench  # beside this file: run as a script, its folder is on the path

KEYS = (
    "direct_p50_ms",
    "agent_add_p50_ms",
    "agent_cpu_us",
    "agent_cpu_us_all",
    "gateway_add_p50_ms",
    "gateway_cpu_us",
    "gateway_cpu_us_all",
    "agent_cpu_us_gateway",
)


async def one_run(
    workdir: Path, bins: dict[str, Path], order: list[str], c1: int, c64: int
) -> list[dict[str, Any]]:
    started: dict[str, Any] = {}
    procs = []
    try:
        for name in order:
            bench.BIN = bins[name]  # start_agent and start_gateway run this version's executables
            home = workdir / name
            home.mkdir()
            gateway_key = "llmf_" + os.urandom(32).hex()
            agent, agent_url, direct_url, key = bench.start_agent(home, gateway_key)
            procs.append(agent)
            gateway, gateway_url = bench.start_gateway(home, agent_url, gateway_key, key)
            procs.append(gateway)
            agent_proc = psutil.Process(agent.pid)
            started[name] = (
                direct_url,
                agent_url,
                gateway_url,
                key,
                agent_proc,
                psutil.Process(gateway.pid),
                agent_proc.children()[0],
            )
        rows = []
        for concurrency, total in ((1, c1), (64, c64)):
            for stream in (False, True):
                sides = {}
                for name in order:
                    direct_url, agent_url, gateway_url, key, agent_p, gateway_p, ollama_p = started[name]
                    sides[name] = [
                        bench.Target("direct", direct_url, None, stream, [ollama_p]),
                        bench.Target("agent", agent_url, key, stream, [agent_p, ollama_p]),
                        bench.Target("gateway", gateway_url, key, stream, [gateway_p, agent_p, ollama_p]),
                    ]
                everything = [t for name in order for t in sides[name]]
                watched = [p for name in order for p in started[name][4:6]]
                spent = await bench.compare_spent(everything, concurrency, total, watched)
                for name in order:
                    agent_pid, gateway_pid = str(started[name][4].pid), str(started[name][5].pid)
                    direct, agent, gateway = (t.run(concurrency, stream) for t in sides[name])
                    row = {
                        "version": name,
                        "concurrency": concurrency,
                        "stream": stream,
                        "direct_p50_ms": round(direct.p50_ms, 3),
                        "agent_add_p50_ms": round(agent.p50_ms - direct.p50_ms, 3),
                        "agent_cpu_us": agent.cpu_us_per_request[agent_pid],
                        # over the phase, every request it served (its own side's and the gateway's)
                        "agent_cpu_us_all": bench.per_request_us(spent, started[name][4], sides[name][1:]),
                        "gateway_add_p50_ms": round(gateway.p50_ms - agent.p50_ms, 3),
                        "gateway_cpu_us": gateway.cpu_us_per_request[gateway_pid],
                        "gateway_cpu_us_all": bench.per_request_us(spent, started[name][5], sides[name][2:]),
                        "agent_cpu_us_gateway": gateway.cpu_us_per_request[agent_pid],
                        "errors": direct.errors + agent.errors + gateway.errors,
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        return rows
    finally:
        bench.stop(procs)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, required=True, help="the base version's venv bin directory")
    parser.add_argument("--new", type=Path, default=Path(sys.executable).parent, help="default: this venv's")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests-c1", type=int, default=2000)
    parser.add_argument("--requests-c64", type=int, default=6400)
    parser.add_argument("--out", type=Path, default=bench.ROOT / "bench" / "results")
    args = parser.parse_args()
    bins = {"base": args.base, "new": args.new}
    rows: list[dict[str, Any]] = []
    for run in range(args.runs):
        order = ["base", "new"] if run % 2 == 0 else ["new", "base"]
        print(f"run {run + 1} of {args.runs}: {' then '.join(order)}", flush=True)
        with tempfile.TemporaryDirectory(prefix="llmfleet-versions-") as tmp:
            rows += asyncio.run(one_run(Path(tmp), bins, order, args.requests_c1, args.requests_c64))
    print(f"\nmedians of {args.runs} runs, base -> new:")
    for concurrency in (1, 64):
        for stream in (False, True):
            line = f"  c={concurrency:<3} stream={stream!s:<5}"
            for key in KEYS:
                medians = [
                    statistics.median(
                        r[key]
                        for r in rows
                        if (r["version"], r["concurrency"], r["stream"]) == (v, concurrency, stream)
                    )
                    for v in ("base", "new")
                ]
                line += f"  {key} {medians[0]:g} -> {medians[1]:g}"
            print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"versions-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    requests = {"c1": args.requests_c1, "c64": args.requests_c64, "runs": args.runs}  # a side's, per run
    result = {"bins": {k: str(v) for k, v in bins.items()}, "requests": requests, "rows": rows}
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n  written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
