"""Fixtures for the S3 store tests: one SeaweedFS server per session, a fresh bucket per test."""

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.store import new_version_name
from tests.conftest import publish_random_model
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


@pytest.fixture(scope="session")
def template_version(seaweed: SeaweedS3, tmp_path_factory) -> tuple[str, str]:
    """One version published for real at the start: (bucket, version), for cloning."""
    env = seaweed.env()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        seaweed.client().create_bucket(Bucket="template")
        # A seed no test publishes: its weights (and sha256) are in no server cache.
        return "template", publish_random_model("s3://template/models", seed=99)


@pytest.fixture
def clone_version(s3_url: str, seaweed: SeaweedS3, template_version) -> Callable[..., str]:
    """clone(latest=True) -> a new complete version in the test's store, copied server-side
    from the template (uploading 45 MB per test would make the tests slow).
    """
    source_bucket, source = template_version
    bucket, _, prefix = s3_url.removeprefix("s3://").partition("/")
    client = seaweed.client()

    def clone(latest: bool = True) -> str:
        version = new_version_name()
        client.copy_object(
            Bucket=bucket,
            Key=f"{prefix}/{version}/model.pt",
            CopySource={"Bucket": source_bucket, "Key": f"models/{source}/model.pt"},
        )
        body = client.get_object(Bucket=source_bucket, Key=f"models/{source}/model.json")
        meta = {**json.loads(body["Body"].read()), "version": version}
        client.put_object(
            Bucket=bucket, Key=f"{prefix}/{version}/model.json", Body=json.dumps(meta).encode()
        )
        if latest:
            client.put_object(Bucket=bucket, Key=f"{prefix}/LATEST", Body=f"{version}\n".encode())
        return version

    return clone
