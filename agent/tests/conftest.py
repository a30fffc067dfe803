"""Fixtures that run the real agent (with the simulator as its Ollama) as a child process."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from agents import AGENT, SIM, AgentHandle, agent_cli, base_config, deep_merge, new_agent

__all__ = ["AGENT", "SIM", "AgentHandle", "agent_cli", "base_config", "deep_merge"]


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Any]:
    """Factory: make_agent(overrides) writes a config (base + overrides) and returns an unstarted agent."""
    made: list[AgentHandle] = []

    def make(overrides: dict[str, Any] | None = None, name: str = "agent") -> AgentHandle:
        handle = new_agent(tmp_path / name, overrides)
        made.append(handle)
        return handle

    yield make
    for handle in made:
        if handle.proc is not None:
            handle.proc.stop()


@pytest.fixture(scope="module")
def ready_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentHandle]:
    """One ready agent shared by a module's tests (for tests that do not change its state for good)."""
    handle = new_agent(tmp_path_factory.mktemp("shared-agent")).start()
    handle.wait_ready()
    yield handle
    assert handle.proc is not None
    handle.proc.stop()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real PostgreSQL server for the session (postgres.py); tests take a database each."""
    from postgres import PostgresServer

    server = PostgresServer(tmp_path_factory.mktemp("postgres")).start()
    yield server
    server.destroy()


@pytest.fixture
def pg_database(postgres: Any, request: pytest.FixtureRequest) -> str:
    """A new, empty database of the session's server, named after the test."""
    import re
    import secrets

    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40] + "_" + secrets.token_hex(3)
    postgres.create_database(name)
    return name


@pytest.fixture
def fleet_db(postgres: Any, pg_database: str, tmp_path: Path) -> Any:
    """A database set up as the collection sets it up, for agents of one fleet (test_shared_store.FleetDB)."""
    from test_shared_store import FleetDB

    return FleetDB(postgres, pg_database, tmp_path / "fleet")
