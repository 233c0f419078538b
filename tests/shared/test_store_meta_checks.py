"""read_meta refuses model.json values a server would otherwise compute with."""

import json

import pytest

from shared import store
from tests.conftest import publish_random_model


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A models folder with one small valid version; returns (models_dir, version)."""
    models_dir = tmp_path_factory.mktemp("models")
    version = publish_random_model(models_dir)
    return models_dir, version


def test_read_meta_accepts_a_published_version(published):
    models_dir, version = published
    assert store.read_meta(models_dir, version)["image_size"] == 32


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("image_size", 100_000, "image_size"),
        ("image_size", 32.0, "image_size"),
        ("image_size", True, "image_size"),
        ("mean", [0.5, 0.5], "mean"),
        ("mean", "0.5", "mean"),
        ("std", [0.2, float("nan"), 0.2], "std"),
        ("std", [0.2, 0.0, 0.2], "std must be positive"),
        ("class_names", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "class_names"),
    ],
)
def test_read_meta_refuses_unusable_preprocessing_values(published, key, value, message):
    models_dir, version = published
    path = models_dir / version / store.META_FILE
    original = path.read_text()
    meta = json.loads(original)
    meta[key] = value
    path.write_text(json.dumps(meta))
    try:
        with pytest.raises(store.StoreError, match=message):
            store.read_meta(models_dir, version)
    finally:
        path.write_text(original)
