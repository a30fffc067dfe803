"""The local AWS emulator (moto's server mode) for the playbook tests, one per test session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from emulators import running_emulator

REGION = "us-east-1"


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
