#!/usr/bin/env python3
"""Benchmark: the agent's proxy against a direct connection to the same Ollama, and the fleet gateway in
front of that agent, side by side in one run.

Starts the agent with the simulator as its Ollama (token delay 0, so the backend costs almost nothing and
the proxy's own cost shows), a gateway whose one host is that agent, and a bare relay in front of the same
agent (bench/relay.py: the gateway's frame, an aiohttp server and the proxy's HTTP/1.1 client, doing
nothing else), then drives the simulator directly, through the agent, through the gateway and through the
relay with the same requests: concurrency 1 and 64, streamed and not. Reports the latency the agent adds
over direct and the gateway over the agent beside what the bare relay adds over the agent (p50, p99), the
throughput ratios, the time-to-first-byte added for streams, CPU per request of each process, the agent's
peak memory, and its memory before and after 20,000 requests. Writes everything as JSON under
bench/results/.

    make bench                       # or: .venv/bin/python bench/bench.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BODY = {
    "model": "tinyllama",
    "messages": [{"role": "user", "content": "one two three four five six seven eight"}],
}


@dataclass
class Run:
    target: str  # direct | agent | gateway | relay
    concurrency: int
    stream: bool
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    ttfb_p50_ms: float
    ttfb_p99_ms: float
    errors: int
    cpu_us_per_request: dict[str, float]  # CPU time per request, by pid (the agent's and Ollama's)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def one(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[float, float, bool]:
    start = time.perf_counter()
    first = None
    async with session.post(url, data=body, headers=headers) as resp:
        async for _ in resp.content.iter_any():
            if first is None:
                first = time.perf_counter()
        ok = resp.status == 200
    end = time.perf_counter()
    return end - start, (first or end) - start, ok


WARM = 20  # requests a side before the measured ones, to open and warm the connections


class Target:
    """One side of the comparison: a base URL, its headers, and what was measured against it."""

    def __init__(
        self, name: str, base: str, key: str | None, stream: bool, watch: list[psutil.Process]
    ) -> None:
        self.name = name
        self.watch = watch  # processes whose CPU time is charged to this side's requests
        self.cpu: dict[int, float] = {p.pid: 0.0 for p in watch}
        self.url = f"{base}/api/chat"
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.body = json.dumps({**BODY, "stream": stream}).encode()
        self.latencies: list[float] = []
        self.ttfbs: list[float] = []
        self.errors = 0
        self.seconds = 0.0

    async def request(self, session: aiohttp.ClientSession) -> None:
        latency, ttfb, ok = await one(session, self.url, self.body, self.headers)
        self.latencies.append(latency)
        self.ttfbs.append(ttfb)
        self.errors += not ok

    def cpu_now(self) -> dict[int, float]:
        return {p.pid: cpu_seconds(p) for p in self.watch}

    def charge(self, before: dict[int, float], elapsed: float) -> None:
        self.seconds += elapsed
        for pid, value in self.cpu_now().items():
            self.cpu[pid] += value - before[pid]

    def run(self, concurrency: int, stream: bool) -> Run:
        n = len(self.latencies)
        cpu_us = {str(pid): round(sec / n * 1e6, 1) for pid, sec in self.cpu.items()}
        return Run(
            self.name,
            concurrency,
            stream,
            n,
            self.seconds,
            pct(self.latencies, 0.5),
            pct(self.latencies, 0.99),
            pct(self.ttfbs, 0.5),
            pct(self.ttfbs, 0.99),
            self.errors,
            cpu_us,
        )


async def compare(targets: list[Target], concurrency: int, total: int, rounds: int = 8) -> None:
    """Drive the targets with the same requests. At concurrency 1 they alternate request by request; above
    it, in alternating rounds, so that whatever else the machine does falls on both sides alike."""
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) for _ in targets]
    try:
        for target, session in zip(targets, sessions, strict=True):
            for _ in range(WARM):  # warm the connections
                await one(session, target.url, target.body, target.headers)
            target.latencies.clear()
            target.ttfbs.clear()
        if concurrency == 1:
            for _ in range(total):
                for target, session in zip(targets, sessions, strict=True):
                    cpu, started = target.cpu_now(), time.perf_counter()
                    await target.request(session)
                    target.charge(cpu, time.perf_counter() - started)
            return
        per_round = max(1, total // rounds)
        for _ in range(rounds):
            for target, session in zip(targets, sessions, strict=True):
                remaining = per_round

                async def worker(t: Target = target, s: aiohttp.ClientSession = session) -> None:
                    nonlocal remaining
                    while remaining > 0:
                        remaining -= 1
                        await t.request(s)

                cpu, started = target.cpu_now(), time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                target.charge(cpu, time.perf_counter() - started)
    finally:
        for session in sessions:
            await session.close()


# after a phase, long enough for what a process puts off (the agent's bookkeeping: later.DELAY, 0.1 s) to be
# done and counted
SETTLE = 0.5


def cpu_seconds(proc: psutil.Process) -> float:
    return sum(proc.cpu_times()[:2])


async def compare_spent(
    targets: list[Target], concurrency: int, total: int, procs: list[psutil.Process]
) -> dict[int, float]:
    """compare(), and each process's CPU seconds over the whole phase. A side's own figure counts what its
    processes do while its requests are open; what they do after an answer (the bookkeeping the agent puts
    off) falls outside every side's window, so the whole phase over the requests a process served is the
    figure that counts everything."""
    before = {p.pid: cpu_seconds(p) for p in procs}
    await compare(targets, concurrency, total)
    await asyncio.sleep(SETTLE)
    return {p.pid: cpu_seconds(p) - before[p.pid] for p in procs}


def per_request_us(spent: dict[int, float], proc: psutil.Process, sides: list[Target]) -> float:
    """`proc`'s CPU a request over the phase, among every request the `sides` (those through it) sent."""
    served = sum(len(side.latencies) + WARM for side in sides)
    return round(spent[proc.pid] / served * 1e6, 1)


async def drive(base: str, key: str | None, concurrency: int, stream: bool, total: int) -> Run:
    target = Target("agent" if key else "direct", base, key, stream, [])
    await compare([target], concurrency, total, rounds=1)
    return target.run(concurrency, stream)


class PeakRss:
    """Samples a process's resident memory in the background."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def now(self) -> int:
        return int(self.proc.memory_info().rss)

    async def _loop(self) -> None:
        while True:
            self.peak = max(self.peak, self.now())
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def stop(self) -> None:
        if self._task:
            self._task.cancel()


def _cli(*args: Any, stdin: str | None = None) -> str:
    made = subprocess.run(
        [BIN / "llmfleet-agent", *args], input=stdin, capture_output=True, text=True, check=True
    )
    return made.stdout.strip()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until `url` answers /readyz; else the process is stopped and the end of its log shown (the log's
    directory is a temporary one, gone once the bench exits)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as resp:  # noqa: S310 - our own http URL
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    why = f"it exited with {proc.returncode}" if proc.poll() is not None else "not ready within 30 s"
    proc.kill()
    proc.wait()
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise SystemExit(f"{url} did not become ready ({why}); the end of {log.name}:\n{tail}")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop what a run started, the last started first: each asked to end, then killed if it has not
    within 30 s. Every one is stopped, also when another is slow to."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(procs):
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_agent(workdir: Path, gateway_key: str) -> tuple[subprocess.Popen[bytes], str, str, str]:
    agent_port, ollama_port = free_port(), free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": agent_port},
        "ollama": {
            "command": [str(BIN / "llmfleet-ollama-sim"), "serve"],
            "port": ollama_port,
            "models": ["tinyllama:latest"],
            "models_dir": str(workdir / "models"),
            "env": {"LLMFLEET_SIM_TOKEN_DELAY": "0"},
        },
        "store": {"url": f"sqlite:///{workdir}/agent.db"},
        "auth": {"gateway_sources": ["127.0.0.1/32"]},
    }
    path = workdir / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    key = _cli("keys", "create", "--config", path, "--name", "bench", "--role", "user")
    gateway = ("--name", "gateway", "--role", "operator", "--gateway", "--from-stdin")
    _cli("keys", "create", "--config", path, *gateway, stdin=gateway_key)
    log = (workdir / "agent.log").open("wb")
    proc = subprocess.Popen([BIN / "llmfleet-agent", "serve", "--config", path], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{agent_port}"
    _wait_ready(url, proc, workdir / "agent.log")
    return proc, url, f"http://127.0.0.1:{ollama_port}", key


def start_gateway(
    workdir: Path, agent_url: str, gateway_key: str, user_key: str
) -> tuple[subprocess.Popen[bytes], str]:
    """A gateway whose one host is the agent; the same user key in its store."""
    home = workdir / "gateway"
    home.mkdir()
    key_file = home / "gateway-key"
    key_file.write_text(gateway_key)
    key_file.chmod(0o600)
    port = free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "store": {"url": f"sqlite:///{home}/gateway.db"},
        "gateway": {"key_file": str(key_file), "hosts": [{"id": "agent", "url": agent_url}]},
    }
    path = home / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    _cli(
        "keys",
        "create",
        "--config",
        path,
        "--name",
        "bench",
        "--role",
        "user",
        "--from-stdin",
        stdin=user_key,
    )
    log = (home / "gateway.log").open("wb")
    proc = subprocess.Popen([BIN / "llmfleet-agent", "gateway", "--config", path], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, proc, home / "gateway.log")
    return proc, url


def start_relay(workdir: Path, upstream: str) -> tuple[subprocess.Popen[bytes], str]:
    """bench/relay.py in front of `upstream`: what a hop of the gateway's frame alone costs."""
    port = free_port()
    log_path = workdir / "relay.log"
    log = log_path.open("wb")
    relay = [BIN / "python", ROOT / "bench" / "relay.py", "--upstream", upstream, "--port", str(port)]
    proc = subprocess.Popen(relay, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, proc, log_path)
    return proc, url


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    gateway_key = "llmf_" + os.urandom(32).hex()
    procs: list[subprocess.Popen[bytes]] = []  # stopped however the run ends, also when one fails to start
    rss: PeakRss | None = None
    runs: list[Run] = []
    whole: list[dict[str, float]] = []  # a phase's CPU a request of each process, over all it served
    try:
        proc, agent_url, direct_url, key = start_agent(workdir, gateway_key)
        procs.append(proc)
        gateway, gateway_url = start_gateway(workdir, agent_url, gateway_key, key)
        procs.append(gateway)
        relay, relay_url = start_relay(workdir, agent_url)
        procs.append(relay)
        rss = PeakRss(proc.pid)
        agent_proc = psutil.Process(proc.pid)
        gateway_proc = psutil.Process(gateway.pid)
        relay_proc = psutil.Process(relay.pid)
        ollama_proc = agent_proc.children()[0]
        watched = [agent_proc, ollama_proc, gateway_proc, relay_proc]
        rss.start()
        for concurrency, total in ((1, args.requests_c1), (64, args.requests_c64)):
            for stream in (False, True):
                sides = [
                    Target("direct", direct_url, None, stream, [ollama_proc]),
                    Target("agent", agent_url, key, stream, [agent_proc, ollama_proc]),
                    Target("gateway", gateway_url, key, stream, [gateway_proc, agent_proc, ollama_proc]),
                    Target("relay", relay_url, key, stream, [relay_proc, agent_proc, ollama_proc]),
                ]
                spent = await compare_spent(sides, concurrency, total, watched)
                whole.append(
                    {
                        "agent": per_request_us(spent, agent_proc, sides[1:]),
                        "ollama": per_request_us(spent, ollama_proc, sides),
                        "gateway": per_request_us(spent, gateway_proc, sides[2:3]),
                        "relay": per_request_us(spent, relay_proc, sides[3:]),
                    }
                )
                pair = [side.run(concurrency, stream) for side in sides]
                for run in pair:
                    target = run.target
                    print(
                        f"  {target:<7} c={concurrency:<3} stream={stream!s:<5} {run.rps:8.0f} req/s  "
                        f"p50 {run.p50_ms:7.3f} ms  p99 {run.p99_ms:7.3f} ms  "
                        f"ttfb p50 {run.ttfb_p50_ms:7.3f} ms",
                        flush=True,
                    )
                runs.extend(pair)
        # memory over many requests: after a warm-up, then after `soak` more
        await drive(agent_url, key, 16, False, 2000)
        before = rss.now()
        soak = await drive(agent_url, key, 16, False, args.soak)
        after = rss.now()
        print(
            f"  soak: {args.soak} requests at c=16, {soak.rps:.0f} req/s, rss {before / 2**20:.1f} -> "
            f"{after / 2**20:.1f} MiB",
            flush=True,
        )
    finally:
        if rss is not None:
            rss.stop()
        stop(procs)

    agent_pid, ollama_pid = agent_proc.pid, ollama_proc.pid
    comparisons, gateway_comparisons = [], []
    quads = zip(runs[0::4], runs[1::4], runs[2::4], runs[3::4], whole, strict=True)
    for direct, agent, through, bare, spent in quads:
        gateway_comparisons.append(
            {
                "concurrency": agent.concurrency,
                "stream": agent.stream,
                "added_p50_ms": round(through.p50_ms - agent.p50_ms, 3),
                "added_p99_ms": round(through.p99_ms - agent.p99_ms, 3),
                "added_ttfb_p50_ms": round(through.ttfb_p50_ms - agent.ttfb_p50_ms, 3),
                "throughput_ratio": round(through.rps / agent.rps, 3),
                "agent_rps": round(agent.rps, 1),
                "gateway_rps": round(through.rps, 1),
                "gateway_cpu_us_per_request": through.cpu_us_per_request[str(gateway_proc.pid)],
                "gateway_cpu_us_all": spent["gateway"],
                # the same hop with the frame alone (bench/relay.py), in the same run
                "relay_added_p50_ms": round(bare.p50_ms - agent.p50_ms, 3),
                "relay_cpu_us_per_request": bare.cpu_us_per_request[str(relay_proc.pid)],
                "relay_cpu_us_all": spent["relay"],
            }
        )
        comparisons.append(
            {
                "concurrency": direct.concurrency,
                "stream": direct.stream,
                "added_p50_ms": round(agent.p50_ms - direct.p50_ms, 3),
                "added_p99_ms": round(agent.p99_ms - direct.p99_ms, 3),
                "added_ttfb_p50_ms": round(agent.ttfb_p50_ms - direct.ttfb_p50_ms, 3),
                "throughput_ratio": round(agent.rps / direct.rps, 3),
                "direct_rps": round(direct.rps, 1),
                "agent_rps": round(agent.rps, 1),
                "ollama_cpu_us_per_request": direct.cpu_us_per_request[str(ollama_pid)],
                "agent_cpu_us_per_request": agent.cpu_us_per_request[str(agent_pid)],
                # over every request the agent served in the phase (its own side's, the gateway's and the
                # relay's), with what it did after the answers
                "agent_cpu_us_all": spent["agent"],
                "ollama_cpu_us_all": spent["ollama"],
            }
        )
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "runs": [{**asdict(r), "rps": round(r.rps, 1)} for r in runs],
        "comparisons": comparisons,
        "gateway_comparisons": gateway_comparisons,
        "agent_memory": {
            "peak_rss_mib": round(rss.peak / 2**20, 1),
            "soak_requests": args.soak,
            "rss_before_soak_mib": round(before / 2**20, 1),
            "rss_after_soak_mib": round(after / 2**20, 1),
            "growth_mib": round((after - before) / 2**20, 1),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests-c1", type=int, default=2000)
    parser.add_argument("--requests-c64", type=int, default=6400)
    parser.add_argument("--soak", type=int, default=20000)
    parser.add_argument("--quick", action="store_true", help="few requests: checks that the bench works")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.quick:
        args.requests_c1, args.requests_c64, args.soak = 200, 640, 1000
    print(
        "llmfleet bench: the gateway, a bare relay, the agent and a direct connection to one simulator"
        " (token delay 0)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="llmfleet-bench-") as tmp:
        result = asyncio.run(bench(args, Path(tmp)))
    print(
        "\n  concurrency stream  added p50  added p99  added ttfb p50  agent/direct req/s"
        "  CPU/request: agent, ollama (whole phase: agent, ollama)"
    )
    for c in result["comparisons"]:
        print(
            f"  {c['concurrency']:>11} {c['stream']!s:<6} {c['added_p50_ms']:>6.3f} ms"
            f" {c['added_p99_ms']:>6.3f} ms"
            f" {c['added_ttfb_p50_ms']:>11.3f} ms {c['throughput_ratio']:>18.2f}"
            f"  {c['agent_cpu_us_per_request']:>6.0f} us, {c['ollama_cpu_us_per_request']:.0f} us"
            f" ({c['agent_cpu_us_all']:.0f} us, {c['ollama_cpu_us_all']:.0f} us)"
        )
    print(
        "\n  gateway over agent: concurrency stream  added p50  added p99  gateway/agent req/s"
        "  gateway CPU/request (whole phase)   bare relay: added p50, CPU/request (whole phase)"
    )
    for c in result["gateway_comparisons"]:
        print(
            f"  {c['concurrency']:>30} {c['stream']!s:<6} {c['added_p50_ms']:>6.3f} ms"
            f" {c['added_p99_ms']:>6.3f} ms {c['throughput_ratio']:>20.2f}"
            f"  {c['gateway_cpu_us_per_request']:>10.0f} us ({c['gateway_cpu_us_all']:.0f} us)"
            f"   {c['relay_added_p50_ms']:>18.3f} ms, {c['relay_cpu_us_per_request']:.0f} us"
            f" ({c['relay_cpu_us_all']:.0f} us)"
        )
    mem = result["agent_memory"]
    print(
        f"\n  agent peak RSS {mem['peak_rss_mib']} MiB; over {mem['soak_requests']} requests "
        f"{mem['rss_before_soak_mib']} -> {mem['rss_after_soak_mib']} MiB ({mem['growth_mib']:+} MiB)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    name = "quick" if args.quick else time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = args.out / f"bench-{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n  written: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
