"""The local AWS emulator (moto's server mode) for the playbook tests, one per test session."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import emulator
from agent_fleet import free_port

REGION = "us-east-1"


@contextlib.contextmanager
def running_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A new, empty emulator on its own port: its URL, while the block runs."""
    if importlib.util.find_spec("moto") is None:
        message = "moto is not installed (make test installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    state = tmp_path_factory.mktemp("emulator")
    emulator.start(port, state)
    try:
        yield emulator.url_for(port)
    finally:
        emulator.stop(port, state)


def client_factory(endpoint: str) -> Any:
    """A boto3 client factory for the emulator at `endpoint`."""
    import boto3

    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    )

    def client(service: str) -> Any:
        return session.client(service, endpoint_url=endpoint)

    return client


@pytest.fixture(scope="session")
def aws_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_emulator(tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="session")
def aws(aws_endpoint: str) -> Any:
    """A boto3 client factory for the emulator."""
    return client_factory(aws_endpoint)
