import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from contextlib import nullcontext

import pytest
import torch
import torchvision

from shared import store
from tests.conftest import REPO, publish_random_model
from tests.sandbox import fill, permissions_enforced, read_only_view, small_filesystem
from tests.shared.publisher import Publishers


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


@pytest.mark.parametrize(
    "latest", ["../x", "/etc/passwd", "20261128T201500123Z-abcdef/../../x", ""]
)
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
    with pytest.raises(store.StoreError, match="is a symbolic link"):
        store.load_version(models, version)


def link_elsewhere(path, tmp_path):
    """Move `path` out of the store and leave a symlink to it in its place."""
    moved = tmp_path / f"elsewhere-{path.name}"
    os.replace(path, moved)
    path.symlink_to(moved)


def make_special(path, kind):
    """Replace the file `path` with a FIFO or a character device (/dev/zero's numbers)."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
        return
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except PermissionError:  # no CAP_MKNOD (an unprivileged developer); CI runs as root
        if os.environ.get("CI"):
            raise
        pytest.skip("creating a device node needs CAP_MKNOD")


STORE_FILES = {"latest": store.LATEST, "meta": store.META_FILE, "weights": store.WEIGHTS_FILE}


@pytest.mark.parametrize(
    "case, reason",
    [
        ("latest_symlink", "is a symbolic link"),
        ("meta_symlink", "is a symbolic link"),
        ("weights_symlink", "is a symbolic link"),
        ("latest_fifo", "is not a regular file"),
        ("meta_fifo", "is not a regular file"),
        ("weights_fifo", "is not a regular file"),
        ("latest_device", "is not a regular file"),
        ("meta_device", "is not a regular file"),
        ("weights_device", "is not a regular file"),
        ("latest_huge", "more than the 256 bytes allowed"),
        ("meta_huge", "more than the 1048576 bytes allowed"),
        ("weights_huge", "more than the 2147483648 bytes allowed"),
    ],
)
def test_store_files_must_be_plain_files_of_bounded_size(tmp_path, case, reason):
    models = tmp_path / "models"
    version = publish_random_model(models)
    which, kind = case.split("_")
    path = (models if which == "latest" else models / version) / STORE_FILES[which]
    if kind == "symlink":  # for model.pt: the very same bytes, just not inside the store
        link_elsewhere(path, tmp_path)
    elif kind in ("fifo", "device"):
        make_special(path, kind)
    else:  # sparse: costs no disk
        os.truncate(path, {"latest": 256 << 20, "meta": 256 << 20}.get(which, (2 << 30) + 1))
    with pytest.raises(store.StoreError, match=reason):
        store.load_version(models, store.read_latest(models) if which == "latest" else version)


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


def test_publish_that_cannot_write_latest_takes_the_new_version_back(tmp_path, monkeypatch):
    first = publish_random_model(tmp_path)
    write = store.atomic_write_bytes

    def latest_fails(path, data):
        if path.name == store.LATEST:
            raise OSError(28, "No space left on device")
        write(path, data)

    monkeypatch.setattr(store, "atomic_write_bytes", latest_fails)
    with pytest.raises(store.StoreError, match="cannot point LATEST at .*No space left"):
        publish_random_model(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first, store.LATEST])
    assert store.read_latest(tmp_path) == first


@pytest.mark.parametrize("key", store.STORE_KEYS)
def test_publish_refuses_meta_that_sets_the_stores_own_keys(tmp_path, key):
    first = publish_random_model(tmp_path)
    with pytest.raises(store.StoreError, match=f"meta may not set {key}"):
        publish_random_model(tmp_path, **{key: "20990101T000000000Z-000000"})
    assert store.list_versions(tmp_path) == [first]
    assert store.read_meta(tmp_path, first)["version"] == first


def test_version_folder_whose_model_json_names_another_version_is_refused(tmp_path):
    first = publish_random_model(tmp_path)
    second = publish_random_model(tmp_path)
    shutil.rmtree(tmp_path / first)
    os.rename(tmp_path / second, tmp_path / first)  # copied or renamed by hand
    with pytest.raises(store.StoreError, match=f"names version '{second}'"):
        store.load_version(tmp_path, first)


def test_publish_keeps_the_new_version_when_syncing_the_folder_fails_after_latest_moved(
    tmp_path, monkeypatch
):
    """Unit-level fault injection: a real fsync failure cannot be provoked on demand, so the
    folder sync fails here (EIO) only once LATEST already names the new version. The version
    LATEST names must stay, and the error says so.
    """
    first = publish_random_model(tmp_path)
    fsync_dir = store._fsync_dir

    def fails_after_latest_moved(path):
        fsync_dir(path)
        if path == tmp_path and store.read_latest(tmp_path) != first:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(store, "_fsync_dir", fails_after_latest_moved)
    with pytest.raises(store.StoreError, match="Input/output error.* is kept: LATEST names it"):
        publish_random_model(tmp_path)
    monkeypatch.undo()
    second = store.read_latest(tmp_path)
    assert second != first and store.list_versions(tmp_path) == [first, second]
    store.load_version(tmp_path, second)


PUBLISH = """
import sys
from shared.store import StoreError
from tests.conftest import publish_random_model
try:
    publish_random_model(sys.argv[1])
except StoreError as exc:
    sys.exit(f"error: {exc}")
"""


def run_as(preexec, *args: str) -> subprocess.CompletedProcess:
    """Run this Python with `args` from the repo root, with `preexec` in the child."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        preexec_fn=preexec,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("how", ["permissions", "read_only_mount"])
def test_read_only_store_gives_clear_error_and_keeps_the_published_model(tmp_path, how):
    first = publish_random_model(tmp_path)
    second = publish_random_model(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    tmp_path.chmod(0o555)
    try:
        if how == "permissions":  # EACCES; as root (CI) chmod alone would stop nothing
            preexec, view = permissions_enforced(), nullcontext(tmp_path)
        else:  # EROFS, like a container's read-only volume, even for root
            preexec, view = None, read_only_view(tmp_path)
        reason = "Permission denied" if how == "permissions" else "Read-only file system"
        with view as models:
            published = run_as(preexec, "-c", PUBLISH, str(models))
            assert published.returncode == 1, published.stderr
            assert f"cannot publish to {models}: {reason}" in published.stderr
            for verb in (["promote", first], ["rollback"]):
                result = run_as(preexec, "-m", "shared", "--models-dir", str(models), *verb)
                assert result.returncode == 2, result.stderr
                assert result.stderr.count("\n") == 1 and reason in result.stderr, result.stderr
    finally:
        tmp_path.chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert store.read_latest(tmp_path) == second
    store.load_version(tmp_path, second)


def test_full_disk_fails_publish_and_promote_cleanly_and_keeps_the_published_model():
    with small_filesystem(100) as disk:  # room for two 45 MB versions, not three
        models = disk / "models"
        first = publish_random_model(models)
        second = publish_random_model(models)
        free = shutil.disk_usage(disk).free
        with pytest.raises(store.StoreError, match="cannot publish .*: No space left on device"):
            publish_random_model(models)
        assert shutil.disk_usage(disk).free == free  # the partial version is gone
        assert sorted(p.name for p in models.iterdir()) == sorted([first, second, store.LATEST])

        fill(disk)
        result = run_as(None, "-m", "shared", "--models-dir", str(models), "promote", first)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "No space left on device" in result.stderr
        assert sorted(p.name for p in models.iterdir()) == sorted([first, second, store.LATEST])
        assert store.read_latest(models) == second
        store.load_version(models, second)


def temp_folders(models_dir):
    """The versions of the `.tmp-<version>` folders in `models_dir`."""
    return {p.name.removeprefix(store.TMP_PREFIX) for p in models_dir.glob(".tmp-*")}


def assert_never_served(models_dir, version):
    """`version` is not listed, not named by LATEST and cannot be loaded."""
    assert version not in store.list_versions(models_dir)
    assert store.read_latest(models_dir) != version
    with pytest.raises(store.StoreError, match="does not exist"):
        store.load_version(models_dir, version)


@pytest.mark.slow
def test_publisher_killed_at_random_moments_never_exposes_half_a_version(tmp_path):
    """SIGKILL lands at random offsets inside real publishes (timed from the moment the
    publisher signals it is writing); at least 3 of them leave a temporary folder as
    evidence, no such version is ever listed, named by LATEST or loadable, every listed one
    loads, and the next publish removes the temporary folders (the killed hold no lock).
    """
    rng = random.Random()
    with Publishers(tmp_path) as publishers:
        publishers.start(1)
        first, seconds = publishers.expect("published")[1:]
        duration = float(seconds)  # one whole publish in a fresh publisher, on this machine
        checked, interrupted, rounds = {first}, set(), 0
        while len(interrupted) < 3:
            rounds += 1
            assert rounds <= 15, f"only {len(interrupted)} kills landed inside a write"
            before = temp_folders(tmp_path)
            pid = publishers.start(1000)
            time.sleep(rng.uniform(0.05, 0.95) * duration)
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)  # the kernel releases the publisher's lock as it reaps it
            interrupted |= temp_folders(tmp_path) - before
            for version in temp_folders(tmp_path):
                assert_never_served(tmp_path, version)
            assert store.read_latest(tmp_path) in store.list_versions(tmp_path)
            for version in set(store.list_versions(tmp_path)) - checked:
                store.load_version(tmp_path, version)  # every visible version is complete
                checked.add(version)
    publish_random_model(tmp_path)
    assert temp_folders(tmp_path) == set()
    assert first in store.list_versions(tmp_path)
    assert not interrupted & set(store.list_versions(tmp_path))


def test_live_publishers_temp_folder_is_never_removed(tmp_path):
    """A real publisher stopped (SIGSTOP) in the middle of its write holds its folder's lock:
    prune and another publish leave its folder alone, and once resumed it publishes.
    """
    rng = random.Random()
    publish_random_model(tmp_path)
    with Publishers(tmp_path) as publishers:
        for _attempt in range(20):
            pid = publishers.start(1)
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(pid, signal.SIGSTOP)
            try:
                writing = temp_folders(tmp_path)  # empty when stopped outside the write
                if writing:
                    assert not writing & set(store.prune(tmp_path, keep=0))
                    publish_random_model(tmp_path)
                    assert temp_folders(tmp_path) == writing
            finally:
                os.kill(pid, signal.SIGCONT)
            published = publishers.expect("published")[1]
            if writing:
                assert writing == {published}
                break
        else:
            pytest.fail("never stopped a publisher inside its write")
    assert temp_folders(tmp_path) == set()
    assert published in store.list_versions(tmp_path)
    store.load_version(tmp_path, published)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "shared", *args], cwd=REPO, capture_output=True, text=True
    )


def test_cli_lists_promotes_and_rolls_back(tmp_path):
    first = publish_random_model(tmp_path)
    second = publish_random_model(tmp_path)
    listing = run_cli("--models-dir", str(tmp_path), "list")
    assert listing.returncode == 0 and f"* {second}" in listing.stdout and first in listing.stdout
    assert run_cli("--models-dir", str(tmp_path), "rollback").returncode == 0
    assert store.read_latest(tmp_path) == first
    assert run_cli("--models-dir", str(tmp_path), "promote", second).returncode == 0
    assert store.read_latest(tmp_path) == second


def test_cli_promote_unknown_version_is_one_line_exit_2(tmp_path):
    publish_random_model(tmp_path)
    result = run_cli("--models-dir", str(tmp_path), "promote", "20990101T000000000Z-000000")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr
