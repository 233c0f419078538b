"""The trainer on a read-only or full models folder: one-line error, exit 2, last model intact."""

import shutil

import pytest

from shared import store
from tests.conftest import (
    assert_one_line_error,
    make_image_folders,
    publish_random_model,
    run_trainer,
)
from tests.sandbox import permissions_enforced, small_filesystem

FAST = ["--epochs", "1", "--weights", "none", "--batch-size", "16", "--device", "cpu"]
SMALL_DISK_MB = 64  # the published model (45 MB) fits; a second copy does not


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny 10-class dataset."""
    return make_image_folders(tmp_path_factory.mktemp("data"), per_class=8)


def snapshot(models_dir) -> dict[str, bytes]:
    """Every file of the store, by relative path: to prove nothing changed."""
    return {
        str(p.relative_to(models_dir)): p.read_bytes()
        for p in sorted(models_dir.rglob("*"))
        if p.is_file()
    }


def test_read_only_models_folder_fails_with_one_line_and_keeps_the_model(tmp_path, data):
    models = tmp_path / "models"
    published = publish_random_model(models)
    before = snapshot(models)
    models.chmod(0o555)
    try:
        result = run_trainer(
            "--data-dir",
            str(data),
            *FAST,
            "--runs-dir",
            str(tmp_path / "runs"),
            "--models-dir",
            str(models),
            preexec_fn=permissions_enforced(),  # as root, chmod alone would stop nothing
        )
    finally:
        models.chmod(0o755)
    assert_one_line_error(result, f"cannot publish to {models}", "Permission denied", "best.pt")
    assert snapshot(models) == before
    assert store.read_latest(models) == published
    store.load_version(models, published)


@pytest.mark.parametrize("full", ["models", "models_and_runs"])
def test_full_disk_fails_with_one_line_and_keeps_the_model(tmp_path, data, full):
    with small_filesystem(SMALL_DISK_MB) as disk:
        models = disk / "models"
        runs = disk / "runs" if full == "models_and_runs" else tmp_path / "runs"
        published = publish_random_model(models)
        before = snapshot(models)
        free = shutil.disk_usage(disk).free
        result = run_trainer(
            "--data-dir", str(data), *FAST, "--runs-dir", str(runs), "--models-dir", str(models)
        )
        # Publishing fails when the models folder is full; a full runs folder fails earlier,
        # saving the epoch's weights.
        where = "cannot publish to" if full == "models" else "cannot write"
        assert_one_line_error(result, where, "No space left on device")
        assert snapshot(models) == before
        assert store.read_latest(models) == published
        store.load_version(models, published)
        if full == "models":
            assert shutil.disk_usage(disk).free == free  # the partial version is gone
