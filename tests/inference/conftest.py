"""Fixtures for the inference tests: a published model and a real Gunicorn serving it."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.inference.serving import Server, publish_model, run_server, wait_ready


@pytest.fixture(scope="session")
def served_models(tmp_path_factory) -> tuple[Path, str]:
    """A models folder with one published version: (models_dir, version)."""
    models_dir = tmp_path_factory.mktemp("served-models")
    return models_dir, publish_model(models_dir, seed=0)


@pytest.fixture(scope="session")
def server(served_models, tmp_path_factory) -> Iterator[Server]:
    """One ready Gunicorn shared by the request tests (small limits keep them fast).

    Its teardown fails the session when the server logged a traceback.
    """
    models_dir, _ = served_models
    with run_server(
        models_dir, tmp_path_factory.mktemp("logs"), MAX_UPLOAD_MB="2", MAX_FILES="24"
    ) as srv:
        wait_ready(srv)
        yield srv
    # Checked once the server has stopped, after every test that used it (whatever their order
    # or -k): hostile input must never reach a traceback.
    if "Traceback" in srv.log():
        pytest.fail(f"the server logged a traceback:\n{srv.log()[-5000:]}")
