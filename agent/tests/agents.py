"""The real agent (with the simulator as its Ollama) as a child process: config, keys, HTTP helpers.

Used by the agent's own fixtures (conftest.py) and by the collection's tests, which start agents for the
idle-shutdown playbooks.
"""

from __future__ import annotations

import copy
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from support import BIN, Proc, bearer, free_port, http, wait_until

AGENT = str(BIN / "llmfleet-agent")
SIM = str(BIN / "llmfleet-ollama-sim")


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def agent_cli(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `llmfleet-agent ARGS` with `--config` placed after the (sub)command."""
    split = 2 if args[0] in ("keys", "db", "ldap") else 1
    argv = [AGENT, *args[:split], "--config", str(config), *args[split:]]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60, check=False)


@dataclass
class AgentHandle:
    dir: Path
    config_path: Path
    config: dict[str, Any]
    url: str
    proc: Proc | None = None
    keys: dict[str, str] = field(default_factory=dict)  # role -> key, made on demand

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return agent_cli(self.config_path, *args, stdin=stdin)

    def create_key(self, role: str, name: str | None = None, *extra: str) -> tuple[str, str]:
        """Make a key with the CLI; returns (secret, id)."""
        name = name or f"{role}-{len(self.keys)}-{free_port()}"
        res = self.cli("keys", "create", "--name", name, "--role", role, "--json", *extra)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        return out["key"], out["id"]

    def key(self, role: str) -> str:
        if role not in self.keys:
            self.keys[role] = self.create_key(role, f"fixture-{role}")[0]
        return self.keys[role]

    def get(self, path: str, key: str | None = None) -> tuple[int, Any, Any]:
        return http("GET", self.url + path, headers=bearer(key) if key else None)

    def post(self, path: str, body: Any = None, key: str | None = None) -> tuple[int, Any, Any]:
        return http("POST", self.url + path, body, headers=bearer(key) if key else None)

    def status(self) -> dict[str, Any]:
        code, body, _ = self.get("/agent/status", self.key("operator"))
        assert code == 200, body
        return body

    def ollama(self) -> dict[str, Any]:
        return self.status()["ollama"]

    def readyz(self) -> tuple[int, Any]:
        code, body, _ = self.get("/readyz")
        return code, body

    def wait_ready(self, timeout: float = 10.0) -> None:
        wait_until(lambda: self.readyz()[0] == 200, timeout, f"the agent at {self.url} to be ready")

    def start(self, timeout: float = 10.0) -> AgentHandle:
        assert self.proc is None or not self.proc.alive()
        self.proc = Proc([AGENT, "serve", "--config", str(self.config_path)], self.dir / "agent.log")
        wait_until(lambda: self.get("/healthz")[0] == 200, timeout, "the agent to serve /healthz")
        return self

    def log(self) -> str:
        return (self.dir / "agent.log").read_text(errors="replace")


def base_config(directory: Path) -> dict[str, Any]:
    """The issue's minimal config, on free ports, with the simulator as Ollama."""
    return {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "ollama": {
            "command": [SIM, "serve"],
            "port": free_port(),
            "models": ["tinyllama:latest"],
            "models_dir": str(directory / "models"),
        },
        "store": {"url": f"sqlite:///{directory}/agent.db"},
    }


def new_agent(directory: Path, overrides: dict[str, Any] | None = None) -> AgentHandle:
    """Write a config (base + overrides) under `directory` and return the unstarted agent."""
    directory.mkdir(parents=True, exist_ok=True)
    config = deep_merge(base_config(directory), overrides or {})
    path = directory / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return AgentHandle(directory, path, config, f"http://127.0.0.1:{config['listen']['port']}")
