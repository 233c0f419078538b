import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torchvision

from shared import store
from tests.conftest import REPO, publish_random_model


def test_published_model_loads_with_plain_torchvision(tmp_path):
    version = publish_random_model(tmp_path)
    assert store.read_latest(tmp_path) == version
    path = tmp_path / version / "model.pt"
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(torch.load(path, weights_only=True))
    meta = json.loads((tmp_path / version / "model.json").read_text())
    for key in (
        "format_version",
        "version",
        "created_at",
        "run_id",
        "arch",
        "num_classes",
        "class_names",
        "image_size",
        "mean",
        "std",
        "metrics",
        "sha256",
        "config",
    ):
        assert key in meta
    assert meta["class_names"][6] == "frog" and meta["num_classes"] == 10
    assert meta["sha256"] == store.sha256_file(path)


def test_load_version_builds_an_eval_model(tmp_path):
    version = publish_random_model(tmp_path, arch="resnet18_cifar")
    loaded = store.load_version(tmp_path, version)
    assert not loaded.model.training
    assert loaded.model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_versions_sort_by_time_and_rollback_moves_latest_back(tmp_path):
    first = publish_random_model(tmp_path)
    time.sleep(1.1)
    second = publish_random_model(tmp_path)
    assert store.list_versions(tmp_path) == [first, second]
    assert store.rollback(tmp_path) == first
    assert store.read_latest(tmp_path) == first
    with pytest.raises(store.StoreError):
        store.rollback(tmp_path)


def test_sha_mismatch_is_refused(tmp_path):
    version = publish_random_model(tmp_path)
    meta_path = tmp_path / version / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(store.StoreError, match="sha256"):
        store.load_version(tmp_path, version)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    version = publish_random_model(tmp_path)
    marker = tmp_path / "pwned"
    weights = tmp_path / version / "model.pt"
    torch.save({"conv1.weight": Payload(marker)}, weights)
    meta_path = tmp_path / version / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = store.sha256_file(weights)  # the attacker controls both files
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(store.StoreError, match="refused"):
        store.load_version(tmp_path, version)
    assert not marker.exists()


@pytest.mark.parametrize(
    "change", [{"num_classes": 9}, {"arch": "vgg16"}, {"format_version": 99}], ids=str
)
def test_inconsistent_metadata_is_refused(tmp_path, change):
    version = publish_random_model(tmp_path)
    meta_path = tmp_path / version / "model.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), **change}))
    with pytest.raises(store.StoreError):
        store.load_version(tmp_path, version)


def test_weights_that_do_not_fit_the_arch_are_refused(tmp_path):
    version = publish_random_model(tmp_path, class_names=[f"c{i}" for i in range(10)])
    meta_path = tmp_path / version / "model.json"
    meta = json.loads(meta_path.read_text())
    meta.update(class_names=["a", "b", "c"], num_classes=3)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(store.StoreError, match="do not fit"):
        store.load_version(tmp_path, version)


@pytest.mark.parametrize("latest", ["../x", "/etc/passwd", "20261128T201500Z-abcdef/../../x", ""])
def test_latest_outside_the_store_is_refused(tmp_path, latest):
    (tmp_path / "LATEST").write_text(latest)
    with pytest.raises(store.StoreError):
        store.read_latest(tmp_path)


def test_symlinked_version_is_refused(tmp_path):
    outside = tmp_path / "outside"
    version = publish_random_model(outside)
    models = tmp_path / "models"
    models.mkdir()
    (models / version).symlink_to(outside / version)
    assert store.list_versions(models) == []
    with pytest.raises(store.StoreError):
        store.load_version(models, version)


def test_failed_publish_leaves_no_version_and_latest_unchanged(tmp_path, monkeypatch):
    first = publish_random_model(tmp_path)

    def fail(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "atomic_write_json", fail)
    with pytest.raises(store.StoreError, match="No space left"):
        publish_random_model(tmp_path)
    assert store.list_versions(tmp_path) == [first]
    assert store.read_latest(tmp_path) == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_read_only_store_gives_clear_error(tmp_path):
    first = publish_random_model(tmp_path)
    tmp_path.chmod(0o555)
    try:
        if os.access(tmp_path, os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        with pytest.raises(store.StoreError, match="cannot publish"):
            publish_random_model(tmp_path)
    finally:
        tmp_path.chmod(0o755)
    assert store.read_latest(tmp_path) == first


KILL_LOOP = """
import sys
from tests.conftest import publish_random_model
while True:
    publish_random_model(sys.argv[1])
"""


def test_publisher_killed_at_random_moments_never_exposes_half_a_version(tmp_path):
    first = publish_random_model(tmp_path)
    for delay in (0.3, 0.55, 0.8, 1.05, 1.3):
        child = subprocess.Popen([sys.executable, "-c", KILL_LOOP, str(tmp_path)], cwd=REPO)
        time.sleep(delay)
        child.kill()
        child.wait()
        latest = store.read_latest(tmp_path)
        assert latest in store.list_versions(tmp_path)
        for version in store.list_versions(tmp_path):
            store.load_version(tmp_path, version)  # every visible version is complete
    assert first in store.list_versions(tmp_path)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "shared", *args], cwd=REPO, capture_output=True, text=True
    )


def test_cli_lists_promotes_and_rolls_back(tmp_path):
    first = publish_random_model(tmp_path)
    time.sleep(1.1)
    second = publish_random_model(tmp_path)
    listing = run_cli("--models-dir", str(tmp_path), "list")
    assert listing.returncode == 0 and f"* {second}" in listing.stdout and first in listing.stdout
    assert run_cli("--models-dir", str(tmp_path), "rollback").returncode == 0
    assert store.read_latest(tmp_path) == first
    assert run_cli("--models-dir", str(tmp_path), "promote", second).returncode == 0
    assert store.read_latest(tmp_path) == second


def test_cli_promote_unknown_version_is_one_line_exit_2(tmp_path):
    publish_random_model(tmp_path)
    result = run_cli("--models-dir", str(tmp_path), "promote", "20990101T000000Z-000000")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr
