"""The Ollama supervisor, end to end: the real agent process with the simulator as its child."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import AgentHandle
from support import free_port, pid_alive, wait_until

FAST_RESTART = {"initial_delay": 0.05, "max_delay": 0.1, "max_failures": 3}


def child_pid(agent: AgentHandle) -> int:
    return wait_until(lambda: agent.ollama()["pid"], 10, "the Ollama child's pid")


def log_events(agent: AgentHandle) -> list[dict]:
    out = []
    for line in agent.log().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_minimal_config_ready_within_5s_with_model_pulled(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent()
    agent.start()
    agent.wait_ready(timeout=5)
    ollama = agent.ollama()
    assert ollama["state"] == "RUNNING"
    assert "tinyllama:latest" in ollama["models"]["present"]
    assert ollama["models"]["missing"] == []
    messages = [e["msg"] for e in log_events(agent)]
    assert any(m.startswith("pull tinyllama:latest: pulling") for m in messages)  # progress logged
    # the child's output, with a prefix (read in batches: within child_output.DELAY)
    logged = lambda: any(e["msg"].startswith("ollama: ") for e in log_events(agent))  # noqa: E731
    wait_until(logged, 5, "the child's output logged")
    # the child listens on loopback only, on the configured port
    conns = [c for c in psutil.Process(ollama["pid"]).net_connections() if c.status == "LISTEN"]
    assert {(c.laddr.ip, c.laddr.port) for c in conns} == {("127.0.0.1", agent.config["ollama"]["port"])}


def test_kill_9_of_child_is_backoff_then_ready_again(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent({"ollama": {"restart": {"initial_delay": 1.0}}})
    agent.start().wait_ready()
    old = child_pid(agent)
    os.kill(old, signal.SIGKILL)
    killed_at = time.monotonic()
    seen = wait_until(lambda: agent.ollama() if agent.ollama()["state"] == "BACKOFF" else None, 2, "BACKOFF")
    assert "killed by SIGKILL" in seen["reason"]
    assert agent.readyz()[0] == 503
    wait_until(lambda: agent.readyz()[0] == 200, 3 - (time.monotonic() - killed_at), "ready again within 3 s")
    after = agent.ollama()
    assert after["restarts"] == 1
    assert after["pid"] != old
    assert after["last_exit"]["description"] == "killed by SIGKILL"


def test_child_exiting_at_once_ends_fatal_and_agent_keeps_serving(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent(
        {"ollama": {"env": {"LLMFLEET_SIM_EXIT_AT_ONCE": "1"}, "restart": FAST_RESTART}}
    )
    agent.start()
    wait_until(lambda: agent.ollama()["state"] == "FATAL", 10, "FATAL")
    ollama = agent.ollama()
    assert ollama["consecutive_failures"] == 3
    assert ollama["restarts"] == 2
    code, body = agent.readyz()
    assert code == 503
    assert "FATAL" in body["reason"] and "gave up after 3 failures" in body["reason"]
    assert "exited with code 1" in body["reason"]
    # each time, the child's last words (why it exited) are in the log before the agent's word on it
    messages = [e["msg"] for e in log_events(agent) if e["msg"].startswith("ollama")]
    crash = "ollama: Error: simulated crash at start (LLMFLEET_SIM_EXIT_AT_ONCE)"
    assert messages.count(crash) == 3
    exits = [at for at, message in enumerate(messages) if message.startswith("ollama exited with code 1")]
    assert len(exits) == 3 and all(messages[at - 1] == crash for at in exits), messages
    assert agent.get("/healthz")[0] == 200
    assert agent.get("/agent/idle", agent.key("operator"))[0] == 200


def test_backoff_doubles_up_to_the_cap(make_agent) -> None:  # type: ignore[no-untyped-def]
    restart = {"initial_delay": 0.1, "max_delay": 0.2, "max_failures": 4}
    agent: AgentHandle = make_agent(
        {"ollama": {"env": {"LLMFLEET_SIM_EXIT_AT_ONCE": "1"}, "restart": restart}}
    )
    agent.start()
    wait_until(lambda: agent.ollama()["state"] == "FATAL", 10, "FATAL")
    delays = [e["reason"].rsplit(" in ", 1)[1] for e in log_events(agent) if e.get("state") == "BACKOFF"]
    assert delays == ["0.1s", "0.2s", "0.2s"]


def test_missing_binary_is_fatal_command_not_found(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent({"ollama": {"command": ["/nonexistent/bin/ollama", "serve"]}})
    agent.start()
    wait_until(lambda: agent.ollama()["state"] == "FATAL", 5, "FATAL")
    code, body = agent.readyz()
    assert code == 503 and "command not found: /nonexistent/bin/ollama" in body["reason"]
    assert "Traceback" not in agent.log()


def test_child_that_never_answers_hits_the_start_timeout(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent(
        {
            "ollama": {
                "env": {"LLMFLEET_SIM_REFUSE_START": "1"},
                "start_timeout": 0.5,
                "restart": {**FAST_RESTART, "max_failures": 2},
            }
        }
    )
    agent.start()
    wait_until(lambda: agent.ollama()["state"] == "FATAL", 10, "FATAL")
    assert "did not answer" in agent.ollama()["reason"] and "within 0.5s" in agent.ollama()["reason"]
    # the hung children were killed, not left behind
    sims = [p for p in psutil.process_iter(["cmdline"]) if str(agent.config["ollama"]["port"]) in str(p.info)]
    assert sims == []


def test_port_taken_by_another_process_is_reported(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent({"ollama": {"restart": {**FAST_RESTART, "max_failures": 2}}})
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", agent.config["ollama"]["port"]))
        squatter.listen()
        agent.start()
        wait_until(lambda: agent.ollama()["state"] == "FATAL", 10, "FATAL")
        assert "already in use" in agent.ollama()["reason"]


def test_stable_run_resets_the_failure_count(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent(
        {"ollama": {"restart": {"initial_delay": 0.05, "max_failures": 2, "reset_after": 0.5}}}
    )
    agent.start().wait_ready()
    for round_ in range(3):
        ollama = agent.ollama()
        wait_until(lambda o=ollama: time.time() - o["since"] > 0.6, 5, "a stable run")
        os.kill(ollama["pid"], signal.SIGKILL)
        wait_until(lambda p=ollama["pid"]: agent.ollama()["pid"] not in (None, p), 5, "a new child")
        agent.wait_ready()
        assert agent.ollama()["restarts"] == round_ + 1
    assert agent.ollama()["consecutive_failures"] == 1  # never accumulated to max_failures


def test_failed_pull_is_reported_by_readyz(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent({"ollama": {"models": ["nonexistent-model:1b"]}})
    agent.start()
    wait_until(lambda: "pull failed" in agent.readyz()[1].get("reason", ""), 10, "the pull failure")
    assert "model missing: nonexistent-model:1b" in agent.readyz()[1]["reason"]
    assert agent.ollama()["state"] == "RUNNING"


def test_sigterm_stops_agent_and_child_within_grace(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent({"ollama": {"stop_timeout": 3}})
    agent.start().wait_ready()
    child = child_pid(agent)
    assert agent.proc is not None
    agent.proc.signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=3 + 2) == 0
    assert not pid_alive(child)
    assert "ollama STOPPED" in agent.log()


def test_sigkill_of_agent_takes_the_child_too(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent()
    agent.start().wait_ready()
    child = child_pid(agent)
    assert agent.proc is not None
    agent.proc.signal(signal.SIGKILL)
    agent.proc.wait(timeout=5)
    wait_until(lambda: not pid_alive(child), 5, "the orphaned child to die")


def test_leftover_process_group_is_reaped_at_start(make_agent) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent()
    # a process group left by an earlier agent (say, a runner that outlived `ollama serve`)
    leftover = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        record = {"pgid": leftover.pid, "created": psutil.Process(leftover.pid).create_time()}
        (agent.dir / "ollama.pgid").write_text(json.dumps(record))
        agent.start().wait_ready()
        assert leftover.wait(timeout=5) == -signal.SIGKILL
        assert "killed processes left by an earlier run" in agent.log()
    finally:
        if leftover.poll() is None:
            leftover.kill()


# the supervisor alone, in a process of its own whose file descriptors run out while the child runs, and the
# child dies: the restart runs short of descriptors; it says so and retries, and starts the child once
# descriptors are free again
OUT_OF_DESCRIPTORS = """
import asyncio, os, signal, sys, tempfile
from pathlib import Path
import aiohttp
from llmfleet_agent.config import OllamaConfig
from llmfleet_agent.supervisor import State, Supervisor

async def until(check, seconds):
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)

async def main() -> None:
    cfg = OllamaConfig(command=[sys.argv[1], "serve"], port=int(sys.argv[2]),
                       restart={"initial_delay": 0.05, "max_delay": 0.1, "max_failures": 1000})
    async with aiohttp.ClientSession() as session:
        supervisor = Supervisor(cfg, Path(tempfile.mkdtemp()), session)
        await supervisor.start()
        await until(lambda: supervisor.state is State.RUNNING, 20)
        print("before:", supervisor.state.value, flush=True)
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            for _ in range(int(sys.argv[3])):  # left free
                os.close(held.pop())
        os.kill(supervisor.pid, signal.SIGKILL)
        await until(lambda: supervisor.reason.startswith("cannot"), 10)
        print("while out:", supervisor.state.value, supervisor.reason, flush=True)
        for fd in held:
            os.close(fd)
        await until(lambda: supervisor.state is State.RUNNING, 20)
        print("after:", supervisor.state.value, flush=True)
        await supervisor.stop()

asyncio.run(main())
"""


@pytest.mark.parametrize("left", [0, 1])
def test_out_of_descriptors_is_a_failure_retried(tmp_path, left: int) -> None:  # type: ignore[no-untyped-def]
    sim = Path(sys.executable).parent / "llmfleet-ollama-sim"
    res = subprocess.run(
        [sys.executable, "-c", OUT_OF_DESCRIPTORS, str(sim), str(free_port()), str(left)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout.splitlines()
    assert out[0] == "before: RUNNING", out
    # which step runs short depends on what the dead child freed (the port check, the pipes, the spawn);
    # each is a failure said and retried, never a silent stop or FATAL
    assert out[1].startswith("while out: BACKOFF cannot ") and "Too many open files" in out[1], out
    assert out[2] == "after: RUNNING", out
