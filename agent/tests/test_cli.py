"""The operator's commands against a running agent: status, over plain HTTP and over TLS."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import urllib.request
from pathlib import Path

from conftest import AGENT, AgentHandle
from support import Proc, wait_until


def _status(agent: AgentHandle, key: str | None, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LLMFLEET_API_KEY"}
    if key is not None:
        env["LLMFLEET_API_KEY"] = key
    return subprocess.run(
        [AGENT, "status", "--config", str(agent.config_path), *extra],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_status_command_summarises_and_dumps_json(ready_agent: AgentHandle) -> None:
    res = _status(ready_agent, ready_agent.key("operator"))
    assert res.returncode == 0, res.stderr
    assert "RUNNING" in res.stdout and "ready    yes" in res.stdout
    full = json.loads(_status(ready_agent, ready_agent.key("operator"), "--json").stdout)
    assert full["ollama"]["state"] == "RUNNING"


def test_status_command_errors_are_one_line(ready_agent: AgentHandle) -> None:
    no_key = _status(ready_agent, None)
    assert no_key.returncode == 1 and "LLMFLEET_API_KEY" in no_key.stderr
    user = _status(ready_agent, ready_agent.key("user"))
    assert user.returncode == 1 and "403" in user.stderr
    gone = _status(ready_agent, ready_agent.key("operator"), "--url", "http://127.0.0.1:9")
    assert gone.returncode == 1 and "cannot reach the agent" in gone.stderr
    for res in (no_key, user, gone):
        assert "Traceback" not in res.stderr


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_tls_listener(make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key = _self_signed(tmp_path)
    agent: AgentHandle = make_agent({"listen": {"tls": {"cert": str(cert), "key": str(key)}}})
    url = agent.url.replace("http://", "https://")
    # started by hand: the handle's own helpers speak plain HTTP
    agent.proc = Proc([AGENT, "serve", "--config", str(agent.config_path)], agent.dir / "agent.log")
    context = ssl.create_default_context(cafile=str(cert))

    def ready() -> bool:
        with urllib.request.urlopen(f"{url}/readyz", context=context, timeout=5) as resp:
            return resp.status == 200

    wait_until(ready, 10, "the TLS agent to be ready")
    res = _status(agent, agent.key("operator"))
    assert res.returncode == 0, res.stderr
    assert "(TLS)" in res.stdout


def test_unreadable_certificate_is_a_config_error(make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    agent: AgentHandle = make_agent({"listen": {"tls": {"cert": str(tmp_path / "no.crt"), "key": "/no.key"}}})
    res = agent.cli("check-config")
    assert res.returncode == 2 and "listen.tls" in res.stderr


def test_private_key_readable_by_others_is_refused(make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key = _self_signed(tmp_path)
    agent: AgentHandle = make_agent({"listen": {"tls": {"cert": str(cert), "key": str(key)}}})
    key.chmod(0o644)
    serve = subprocess.run(
        [AGENT, "serve", "--config", str(agent.config_path)], capture_output=True, text=True, timeout=30
    )
    for res in (agent.cli("check-config"), serve):
        assert res.returncode == 2, res.stderr
        for named in ("listen.tls.key", str(key), "0644", f"chmod 600 {key}"):
            assert named in res.stderr
        assert "Traceback" not in res.stderr
    key.chmod(0o640)  # group-readable (root:llmfleet, say) is allowed
    ok = agent.cli("check-config")
    assert ok.returncode == 0, ok.stderr
