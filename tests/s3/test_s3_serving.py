"""The real Gunicorn server on an S3 store (SeaweedFS): hot reload, rollback, refused versions,
and a store that goes away and comes back while the server keeps answering."""

import subprocess
import sys

import pytest

from shared.stores import open_store
from tests.inference.serving import image_bytes, publish_model, run_server, wait_ready
from tests.s3.seaweed import SeaweedS3

POLL = "0.5"
RELOAD_TIMEOUT_S = 30  # poll interval + download + load + warm-up on a busy 2-core machine
# One worker: each test waits for GET /model to show a state, then expects the next request to
# find it; several workers each poll the store on their own, a moment apart
# (tests/inference/test_workers.py covers every worker's reload on a folder store).
ONE_WORKER = {"WORKERS": "1"}


def predict(server) -> dict:
    """One prediction of a small image; asserts 200."""
    response = server.post("/predict", files={"file": ("a.png", image_bytes())})
    assert response.status_code == 200, response.text
    return response.json()


def served(server) -> str | None:
    """The version GET /model reports."""
    return server.model_version()


@pytest.mark.slow  # two real publishes of 45 MB and several reloads: ~60 s on 2 busy cores
def test_s3_server_hot_reloads_rolls_back_and_refuses_bad_versions(
    s3_url, seaweed, tmp_path, clone_version
):
    first = publish_model(s3_url, seed=0)
    with run_server(
        s3_url,
        tmp_path,
        MODEL_POLL_SECONDS=POLL,
        MODEL_CACHE_DIR=str(tmp_path / "cache"),
        **ONE_WORKER,
    ) as server:
        wait_ready(server)
        assert served(server) == first and predict(server)["model_version"] == first
        info = server.get("/model").json()
        assert info["models_dir"] == s3_url and info["store_reachable"] is True
        # The weights were kept in the cache under their sha256.
        assert (tmp_path / "cache" / f"{info['model']['sha256']}.pt").is_file()

        # Hot reload: a newly published version is served within a few polls.
        second = publish_model(s3_url, seed=1)
        server.wait_for(lambda: served(server) == second, RELOAD_TIMEOUT_S, "the new version")

        # Rollback through the CLI: LATEST moves back, the server follows.
        result = subprocess.run(
            [sys.executable, "-m", "shared", "--models-dir", s3_url, "rollback"],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        server.wait_for(lambda: served(server) == first, RELOAD_TIMEOUT_S, "the rolled back one")

        # A corrupt object (model.pt no longer matches model.json's sha256) is refused, and
        # the served version keeps answering.
        bucket, prefix = s3_url.removeprefix("s3://").split("/", 1)
        corrupt = clone_version(latest=False)
        seaweed.client().put_object(
            Bucket=bucket, Key=f"{prefix}/{corrupt}/model.pt", Body=b"not the weights"
        )
        open_store(s3_url).set_latest(corrupt)
        refused = lambda: (server.get("/model").json()["last_error"] or {}).get("version")  # noqa: E731
        server.wait_for(lambda: refused() == corrupt, RELOAD_TIMEOUT_S, "the refusal")
        assert "sha256" in server.get("/model").json()["last_error"]["message"]
        assert predict(server)["model_version"] == first

        # A version whose model.json is missing is refused the same way.
        incomplete = clone_version(latest=False)
        client = seaweed.client()
        client.delete_object(Bucket=bucket, Key=f"{prefix}/{incomplete}/model.json")
        client.put_object(Bucket=bucket, Key=f"{prefix}/LATEST", Body=incomplete.encode())
        server.wait_for(lambda: refused() == incomplete, RELOAD_TIMEOUT_S, "the refusal")
        assert "model.json" in server.get("/model").json()["last_error"]["message"]
        assert predict(server)["model_version"] == first
        assert server.get("/health/ready").status_code == 200


@pytest.mark.slow  # a second SeaweedFS, stopped and restarted: ~60 s on 2 busy cores
def test_s3_server_keeps_serving_while_the_store_is_unreachable(tmp_path, monkeypatch):
    # Its own S3 server: stopping the session's would break the other tests.
    seaweed = SeaweedS3(tmp_path / "seaweed")
    seaweed.start()
    try:
        for name, value in seaweed.env().items():
            monkeypatch.setenv(name, value)
        seaweed.client().create_bucket(Bucket="models")
        url = "s3://models/store"
        first = publish_model(url, seed=0)
        with run_server(
            url,
            tmp_path,
            MODEL_POLL_SECONDS=POLL,
            MODEL_CACHE_DIR=str(tmp_path / "cache"),
            **ONE_WORKER,
        ) as server:
            wait_ready(server)
            seaweed.stop()

            def unreachable() -> bool:
                return server.get("/model").json()["store_reachable"] is False

            server.wait_for(unreachable, RELOAD_TIMEOUT_S, "store_reachable false")
            info = server.get("/model").json()
            assert "unreachable" in info["store_error"]["message"]
            assert info["version"] == first and info["last_error"] is None
            for _ in range(3):
                assert predict(server)["model_version"] == first
            assert server.get("/health/ready").status_code == 200

            # Back again: polls recover and a new version loads.
            seaweed.start()
            second = publish_model(url, seed=1)
            server.wait_for(lambda: served(server) == second, RELOAD_TIMEOUT_S, "the new one")
            assert server.get("/model").json()["store_reachable"] is True
            assert predict(server)["model_version"] == second
            assert "unreachable" in server.log()  # logged once, as a warning
    finally:
        seaweed.stop()
