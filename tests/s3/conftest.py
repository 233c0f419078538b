"""Fixtures for the S3 store tests: one SeaweedFS server per session, a fresh bucket per test."""

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3.seaweed import SeaweedS3


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> Iterator[SeaweedS3]:
    """A running SeaweedFS S3 gateway on loopback, stopped after the session."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_url(seaweed: SeaweedS3, monkeypatch) -> str:
    """`s3://<new bucket>/models`, with the AWS variables pointing at the server (also for
    the subprocesses a test starts).
    """
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    seaweed.client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}/models"


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """An empty folder for downloaded weights."""
    return tmp_path / "cache"
