"""A local AWS emulator (moto's server mode with the project's fixes) for a test's lifetime."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import emulator
from agent_fleet import free_port


@contextlib.contextmanager
def running_emulator(
    tmp_path_factory: pytest.TempPathFactory, settings: dict[str, str] | None = None
) -> Iterator[str]:
    """A new, empty emulator on its own port: its URL, while the block runs. `settings`: extra environment
    for it (LLMFLEET_EMULATOR_RDS_POSTGRES: RDS instances backed by a real PostgreSQL)."""
    if importlib.util.find_spec("moto") is None:
        message = "moto is not installed (make test installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    state = tmp_path_factory.mktemp("emulator")
    emulator.start(port, state, settings=settings)
    try:
        yield emulator.url_for(port)
    finally:
        emulator.stop(port, state)
