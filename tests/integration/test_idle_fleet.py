"""Fifty emulated GPU hosts, each with a real agent (one fleet, started once for the file): one sweep over
all of them (its duration is printed at the end of the run, section "figures"; docs/performance.md has the
figure), then the race between "it looks idle" and "stop it".

The scale test: half the hosts are idle past a zero threshold (stopped), half have an hour to go (kept);
the sweep completes and decides every host.

The race: clients send requests at random moments to the hosts while the idle sweep runs over and over,
and a stopped host really goes away.

A watcher polls the emulator; the moment it sees an instance stopping or stopped it takes the host out of
the clients' choice, lets the requests the clients already sent end, and freezes the agent and its
simulator (SIGSTOP to the process group): a stopped instance serves nothing, and a request still in flight
would hang there and end after the stop, which the test catches. After each sweep the stopped hosts come
back for the next one as wake brings them back: instance started, agent going again (SIGCONT) and resumed.
(Freezing rather than killing and restarting saves a Python start per agent and sweep, about a second of
CPU each, without weakening the check.) What must hold for every request: it completed (a whole stream,
ending in done) and was not running when its host was stopped; or it was refused with 503 by an agent
whose host was then really stopped. Anything else (a cut stream, a timeout, a refused connection) fails.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from agent_fleet import Fleet, fleet, wait_until
from idle_support import Deployment, outcomes

pytestmark = pytest.mark.slow

HOSTS = 50
SWEEPS = 4  # a sweep decides for every host at once: HOSTS * SWEEPS = 200 host sweeps
CLIENTS = 3
# seconds: a host gets a request every second or two, so a few hosts drain in each sweep while requests
# keep arriving at the others (and at the drained ones, until their instance is seen stopped)
IDLE_AFTER = "2"
SIM = {"ollama": {"env": {"LLMFLEET_SIM_TOKEN_DELAY": "0.02"}}}


@dataclass
class Request:
    host: str
    start: float
    end: float = 0.0
    outcome: str = ""  # complete | refused_503 | broken | other
    detail: str = ""


@dataclass
class Downtime:
    """A host's instance seen stopped: when its agent was frozen."""

    host: str
    frozen: float


@dataclass
class World:
    """What the clients may target and what happened: shared by the client threads, watcher and test."""

    hosts: dict[str, str]  # name -> agent URL
    up: dict[str, bool]
    sending: dict[str, int]  # requests the clients have under way, per host
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[Request] = field(default_factory=list)
    downtimes: list[Downtime] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def one_request(url: str, key: str, words: int) -> tuple[str, str]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    prompt = " ".join(f"w{i}" for i in range(words))
    body = {"model": "tinyllama", "messages": [{"role": "user", "content": prompt}], "stream": True}
    try:
        try:
            conn.request("POST", "/api/chat", json.dumps(body), {"Authorization": f"Bearer {key}"})
        except OSError as exc:
            return "broken", f"cannot connect: {exc!r}"
        try:
            resp = conn.getresponse()
        except (ConnectionError, http.client.HTTPException) as exc:
            return "broken", f"no answer: {exc!r}"
        if resp.status == 503:
            resp.read()
            return "refused_503", ""
        if resp.status != 200:
            return "other", f"status {resp.status}: {resp.read()[:200]!r}"
        last = b""
        try:
            while line := resp.readline():
                if line.strip():
                    last = line
        except (ConnectionError, http.client.HTTPException) as exc:
            return "broken", f"stream cut: {exc!r}"
        parsed = json.loads(last) if last else {}
        if parsed.get("done") is True and "error" not in parsed:
            return "complete", ""
        return "broken", f"stream ended without done: {last[:200]!r}"
    finally:
        conn.close()


def client(world: World, key: str, seed: int) -> None:
    rng = random.Random(seed)
    while not world.stop.is_set():
        time.sleep(rng.expovariate(1 / 0.2))
        # choosing a host and counting the request as sent is one step: the watcher freezes a host only
        # when it is out of the choice and its requests have ended
        with world.lock:
            candidates = [h for h, up in world.up.items() if up]
            if not candidates:
                continue
            name = rng.choice(candidates)
            world.sending[name] += 1
        req = Request(name, time.time())
        try:
            req.outcome, req.detail = one_request(world.hosts[name], key, rng.randint(3, 20))
        finally:
            req.end = time.time()
            with world.lock:
                world.sending[name] -= 1
                world.requests.append(req)


def watcher(world: World, dep: Deployment, agents: Fleet) -> None:
    """Take a host down the moment its instance is seen stopping or stopped."""
    while not world.stop.is_set():
        for name, state in dep.states().items():
            if state in ("stopping", "stopped") and world.up[name]:
                with world.lock:
                    world.up[name] = False
                    world.downtimes.append(Downtime(name, time.time()))
                # what the clients sent before they knew ends first (on a drained agent: a 503 at once)
                deadline = time.monotonic() + 5
                while world.sending[name] and time.monotonic() < deadline:
                    time.sleep(0.01)
                proc = agents.agents[name].proc
                assert proc is not None
                os.killpg(proc.pid, signal.SIGSTOP)
        time.sleep(0.2)


def bring_back(world: World, dep: Deployment, agents: Fleet, names: list[str]) -> None:
    """Start the instances and let their agents go on, resumed (what wake does)."""
    for name in names:
        proc = agents.agents[name].proc
        assert proc is not None
        os.killpg(proc.pid, signal.SIGCONT)
        code, body = agents.request(name, "POST", "/agent/resume", key=agents.operator_key)
        assert code == 200 and body["draining"] is False, body
    dep.ec2.start_instances(InstanceIds=[dep.ids[n] for n in names])
    wait_until(lambda: all(dep.states()[n] == "running" for n in names), 30, f"{names} running again")
    with world.lock:
        for name in names:
            world.up[name] = True


@pytest.fixture(scope="module")
def fifty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with fleet(tmp_path_factory.mktemp("agents")) as made:
        made.add_many([f"h{i:02d}" for i in range(HOSTS)], SIM)
        made.start()
        try:
            yield made
        finally:
            # a test that failed may leave agents frozen: they must take the fleet's SIGTERM
            for handle in made.agents.values():
                if handle.proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(handle.proc.pid, signal.SIGCONT)


def resume_all(agents: Fleet) -> None:
    for name in agents.agents:
        code, body = agents.request(name, "POST", "/agent/resume", key=agents.operator_key)
        assert code == 200, body


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
    # the agents of the stopped hosts are draining, the others not
    draining = {n: fifty.idle(n)["draining"] for n in expected}
    assert draining == {n: o == "stopped" for n, o in expected.items()}


@pytest.fixture
def race(
    fifty: Fleet, tmp_path: Path, aws: Any, aws_endpoint: str
) -> Iterator[tuple[World, Deployment, Fleet]]:
    """The fleet, every agent resumed, behind the instances of a deployment of its own."""
    resume_all(fifty)
    names = sorted(fifty.agents)
    dep = Deployment("idle-race", aws, aws_endpoint, tmp_path / "state", fifty.operator_key)
    for name in names:
        dep.launch(name, fifty.agents[name].url, IDLE_AFTER)
    urls = {n: fifty.agents[n].url for n in names}
    world = World(urls, dict.fromkeys(names, True), dict.fromkeys(names, 0))
    try:
        yield world, dep, fifty
    finally:
        world.stop.set()


def test_sweeps_in_a_loop_never_cut_off_a_request(race: tuple[World, Deployment, Fleet]) -> None:
    world, dep, agents = race
    threads = [
        threading.Thread(target=client, args=(world, agents.user_key, i), daemon=True) for i in range(CLIENTS)
    ]
    threads.append(threading.Thread(target=watcher, args=(world, dep, agents), daemon=True))
    for thread in threads:
        thread.start()

    swept: dict[str, int] = {}
    stops: list[tuple[str, float]] = []  # (host, time the sweep that stopped it ended)
    for _sweep in range(SWEEPS):
        _run, summary = dep.sweep()
        for host in summary["hosts"]:
            swept[host["outcome"]] = swept.get(host["outcome"], 0) + 1
        stopped = [h["name"] for h in summary["hosts"] if h["outcome"] == "stopped"]
        wait_until(
            lambda s=stopped: all(not world.up[n] for n in s), 10, f"the watcher to take down {stopped}"
        )
        stops += [(n, time.time()) for n in stopped]
        if stopped:
            bring_back(world, dep, agents, stopped)
    world.stop.set()
    for thread in threads:
        thread.join(60)

    # the loop did what it says: every host swept each time, some stopped, some kept busy or not idle
    assert sum(swept.values()) == HOSTS * SWEEPS >= 200, swept
    assert swept.get("stopped", 0) >= 5 and swept.get("busy", 0) + swept.get("not_idle", 0) >= 20, swept
    assert set(swept) <= {"stopped", "busy", "not_idle"}, swept
    requests = world.requests
    by_outcome = {o: [r for r in requests if r.outcome == o] for o in ("complete", "refused_503")}
    assert len(by_outcome["complete"]) >= 200, f"only {len(requests)} requests"

    # nothing broke, nothing else went wrong
    bad = [r for r in requests if r.outcome not in by_outcome]
    assert not bad, bad[:10]

    def downtimes(r: Request) -> list[Downtime]:
        return [d for d in world.downtimes if d.host == r.host]

    # no request that completed was still running when its host was seen stopped
    cut = [r for r in by_outcome["complete"] if any(r.start < d.frozen < r.end for d in downtimes(r))]
    assert not cut, cut[:10]
    # a 503 came from a drained agent whose host was stopped next (within the sweep that drained it)
    wrong_503 = [
        r for r in by_outcome["refused_503"] if not any(0 <= d.frozen - r.start < 60 for d in downtimes(r))
    ]
    assert not wrong_503, wrong_503[:10]
    # each stop the sweep reported is a downtime the watcher saw
    assert len(world.downtimes) == len(stops)
