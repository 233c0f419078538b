"""create_app and the model holder in-process (Flask test client): settings, startup, release."""

import gc
import threading
import weakref

import pytest

from inference import create_app
from inference.config import load_config
from inference.predictor import ModelHolder
from shared import store
from tests.inference.serving import publish_model


@pytest.fixture
def make_app():
    """Build apps with create_app; stop their background threads afterwards."""
    apps = []

    def make(config=None):
        app = create_app(config)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["inference"].stop()


def test_settings_come_from_defaults_then_environment_then_overrides(monkeypatch, make_app):
    monkeypatch.setenv("MAX_FILES", "7")
    monkeypatch.setenv("TOP_K", "3")
    app = make_app({"TOP_K": 5})
    assert app.config["MODEL_POLL_SECONDS"] == 2.0  # default
    assert app.config["MAX_FILES"] == 7  # environment
    assert app.config["TOP_K"] == 5  # override beats environment
    assert app.config["MAX_CONTENT_LENGTH"] == 10 * 1024 * 1024


@pytest.mark.parametrize(
    "name, value",
    [("MAX_UPLOAD_MB", "ten"), ("MAX_FILES", "0"), ("DEVICE", "tpu"), ("LOG_LEVEL", "loud")],
)
def test_malformed_environment_value_names_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        load_config({name: value})


def test_create_app_loads_nothing_until_the_worker_serves(tmp_path, make_app):
    publish_model(tmp_path)
    app = make_app({"MODELS_DIR": str(tmp_path), "MODEL_POLL_SECONDS": 0.1})
    # Building the app (what a --preload master would do) starts no thread and loads no model.
    assert not any(t.name == "model-poller" for t in threading.enumerate())
    assert app.extensions["inference"].current is None
    client = app.test_client()
    assert client.get("/health/live").status_code == 200  # the first request starts the worker
    holder = app.extensions["inference"].holder
    for _ in range(200):
        if holder.current is not None:
            break
        threading.Event().wait(0.05)
    assert client.get("/health/ready").status_code == 200


def test_readiness_is_503_while_shutting_down(tmp_path, make_app):
    publish_model(tmp_path)
    app = make_app({"MODELS_DIR": str(tmp_path)})
    predictor = app.extensions["inference"]
    predictor.holder.poll_once()
    client = app.test_client()
    assert client.get("/health/ready").status_code == 200
    predictor.begin_shutdown()
    response = client.get("/health/ready")
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "shutting_down"


def test_swapped_out_model_is_released(tmp_path):
    holder = ModelHolder(tmp_path, "cpu", poll_seconds=1)
    publish_model(tmp_path, seed=1)
    assert holder.poll_once()
    old = weakref.ref(holder.current.loaded.model)
    publish_model(tmp_path, seed=2)
    assert holder.poll_once()
    gc.collect()
    assert old() is None, "the previous model is still referenced"


def test_rollback_to_the_served_version_after_a_refusal_loads_nothing(tmp_path):
    holder = ModelHolder(tmp_path, "cpu", poll_seconds=1)
    good = publish_model(tmp_path, seed=1)
    assert holder.poll_once()
    bad = publish_model(tmp_path, seed=2)
    (tmp_path / bad / store.WEIGHTS_FILE).write_bytes(b"garbage")
    assert not holder.poll_once()
    assert holder.last_error["version"] == bad
    assert not holder.poll_once()  # LATEST unchanged: not retried
    store.set_latest(tmp_path, good)
    assert not holder.poll_once()  # already serving it
    assert holder.current.version == good
