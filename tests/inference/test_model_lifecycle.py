"""Model lifecycle against a real Gunicorn: no model yet, hot reload, refused versions, rollback."""

import json
import os
import threading
import time

import pytest
import torch

from shared import store
from tests.inference.serving import image_bytes, publish_model, run_server, wait_ready

FILES = [("file", ("a.png", image_bytes())), ("file", ("b.jpg", image_bytes(fmt="JPEG")))]
SWAP_DEADLINE_S = 3.0  # the promise: a new version answers within 3 s of LATEST changing
# One worker where a test reads the server's state (GET /model, readiness, the log) and expects
# the next request to find the same: several workers each load on their own poll, a moment
# apart. Every worker's readiness and reload: tests/inference/test_workers.py.
ONE_WORKER = {"WORKERS": "1"}


class Payload:
    """Unpickling this runs `touch MARKER`: what a malicious model.pt would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_starts_without_a_model_then_becomes_ready_when_one_is_published(tmp_path):
    models_dir = tmp_path / "models"  # does not even exist yet
    with run_server(models_dir, tmp_path, **ONE_WORKER) as server:
        ready = server.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "no_model"
        response = server.post("/predict", files=FILES)
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "no_model" and "trainer" in error["message"]
        assert "Retry-After" in response.headers
        assert server.get("/model").json()["version"] is None

        version = publish_model(models_dir, seed=1)
        published = time.monotonic()
        wait_ready(server, timeout=30)
        assert time.monotonic() - published < SWAP_DEADLINE_S + 1  # +1: the poll of /ready
        response = server.post("/predict", files=FILES)
        assert response.status_code == 200
        assert response.json()["model_version"] == version


@pytest.mark.slow
def test_hot_reload_under_concurrent_requests_fails_no_request(tmp_path):
    models_dir = tmp_path / "models"
    old = publish_model(models_dir, seed=1)
    new = publish_model(models_dir, seed=2, make_latest=False)
    results: list[tuple[float, float, int, str | None]] = []  # start, end, status, version
    stop = threading.Event()

    with run_server(models_dir, tmp_path, **ONE_WORKER) as server:  # MODEL_POLL_SECONDS=2
        wait_ready(server)

        def client() -> None:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    response = server.post("/predict", files=FILES, timeout=30)
                    version = response.json().get("model_version")
                    results.append((start, time.monotonic(), response.status_code, version))
                except Exception as exc:  # noqa: BLE001 - a dropped connection is a failure
                    results.append((start, time.monotonic(), 0, repr(exc)))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        changed = time.monotonic()
        store.set_latest(models_dir, new)
        server.wait_for(
            lambda: any(r[3] == new for r in list(results)), SWAP_DEADLINE_S + 5, "new version"
        )
        time.sleep(1.5)
        stop.set()
        for thread in threads:
            thread.join()

    failures = [r for r in results if r[2] != 200]
    assert not failures, failures[:5]
    assert {r[3] for r in results} == {old, new}
    first_new = min(r[1] for r in results if r[3] == new)
    assert first_new - changed <= SWAP_DEADLINE_S
    # Once the new version answered, requests that started later never see the old one.
    assert all(r[3] == new for r in results if r[0] > first_new)
    assert len(results) > 20


def write_latest(models_dir, text: str) -> None:
    """Replace LATEST with `text`, bypassing the store's checks (as an attacker would)."""
    store.atomic_write_bytes(models_dir / store.LATEST, f"{text}\n".encode())


def corrupt_sha(models_dir, tmp_path) -> str:
    """A version whose model.pt no longer matches the sha256 in its model.json."""
    version = publish_model(models_dir, seed=3, make_latest=False)
    with open(models_dir / version / store.WEIGHTS_FILE, "ab") as f:
        f.write(b"tampered")
    return version


def pickle_payload(models_dir, tmp_path) -> str:
    """A version whose model.pt is a pickle that runs code, with a matching sha256."""
    version = publish_model(models_dir, seed=4, make_latest=False)
    weights = models_dir / version / store.WEIGHTS_FILE
    torch.save({"conv1.weight": Payload(str(tmp_path / "pwned"))}, weights)
    meta_path = models_dir / version / store.META_FILE
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = store.sha256_file(weights)  # only weights_only=True stands in the way
    meta_path.write_text(json.dumps(meta))
    return version


def wrong_class_count(models_dir, tmp_path) -> str:
    """A version whose model.json declares 5 classes for 10-class weights."""
    names = ["a", "b", "c", "d", "e"]
    return publish_model(models_dir, seed=5, make_latest=False, class_names=names)


def missing_weights(models_dir, tmp_path) -> str:
    """A version folder without model.pt."""
    version = publish_model(models_dir, seed=6, make_latest=False)
    (models_dir / version / store.WEIGHTS_FILE).unlink()
    return version


def absent_version(models_dir, tmp_path) -> str:
    """A well-formed version name with no folder."""
    return "20990101T000000000Z-abcdef"


def outside_path(models_dir, tmp_path) -> str:
    """A LATEST that tries to leave the models folder."""
    return "../outside"


@pytest.mark.slow
def test_refused_versions_never_serve_and_the_current_model_keeps_serving(tmp_path):
    models_dir = tmp_path / "models"
    good = publish_model(models_dir, seed=1)
    with run_server(models_dir, tmp_path, MODEL_POLL_SECONDS="0.5", **ONE_WORKER) as server:
        wait_ready(server)
        for make_bad in (
            corrupt_sha,
            pickle_payload,
            wrong_class_count,
            missing_weights,
            absent_version,
            outside_path,
        ):
            bad = make_bad(models_dir, tmp_path)
            write_latest(models_dir, bad)
            server.wait_for(
                lambda bad=bad: bad in json.dumps(server.get("/model").json()["last_error"]),
                10,
                f"GET /model to report the {make_bad.__name__} failure",
            )
            info = server.get("/model").json()
            assert info["version"] == good, make_bad.__name__
            assert server.get("/health/ready").status_code == 200
            response = server.post("/predict", files=FILES)
            assert response.status_code == 200
            assert response.json()["model_version"] == good
        assert not (tmp_path / "pwned").exists(), "the pickle payload ran"
        assert "refused model version" in server.log()

        # A good version published afterwards is picked up as usual, and clears the error.
        fixed = publish_model(models_dir, seed=7)
        server.wait_for(lambda: server.model_version() == fixed, 10, "the fixed version")
        assert server.get("/model").json()["last_error"] is None


@pytest.mark.slow
def test_failed_version_is_not_retried_until_latest_changes(tmp_path):
    models_dir = tmp_path / "models"
    good = publish_model(models_dir, seed=1)
    bad = corrupt_sha(models_dir, tmp_path)
    write_latest(models_dir, bad)
    with run_server(models_dir, tmp_path, MODEL_POLL_SECONDS="0.2", **ONE_WORKER) as server:
        # No version loads: the only candidate is refused, once.
        server.wait_for(lambda: server.get("/model").json()["last_error"], 20, "the refusal")
        time.sleep(1.5)  # ~7 more polls
        assert server.log().count("refused model version") == 1
        assert server.get("/health/ready").status_code == 503
        store.set_latest(models_dir, good)
        server.wait_for(lambda: server.model_version() == good, 10, "the good version")


@pytest.mark.slow
def test_rollback_is_picked_up(tmp_path):
    models_dir = tmp_path / "models"
    first = publish_model(models_dir, seed=1)
    second = publish_model(models_dir, seed=2)
    with run_server(models_dir, tmp_path, **ONE_WORKER) as server:
        wait_ready(server)
        assert server.model_version() == second
        assert store.rollback(models_dir) == first
        rolled = time.monotonic()
        server.wait_for(lambda: server.model_version() == first, 10, "the rolled-back version")
        assert time.monotonic() - rolled <= SWAP_DEADLINE_S
        response = server.post("/predict", files=FILES)
        assert response.json()["model_version"] == first


# Hostile store files the test above does not cover. Each maker points LATEST at its bad
# version (or replaces LATEST itself) and returns what the logged reason must contain.


def absolute_path(models_dir, tmp_path) -> str:
    """LATEST holds the absolute path of a complete version outside the models folder."""
    outside = publish_model(tmp_path / "elsewhere", seed=8)
    write_latest(models_dir, str(tmp_path / "elsewhere" / outside))
    return "is not a version name"


def unknown_arch(models_dir, tmp_path) -> str:
    """A version whose model.json names an architecture the server does not know."""
    version = publish_model(models_dir, seed=9, make_latest=False)
    meta_path = models_dir / version / store.META_FILE
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "arch": "vgg16"}))
    write_latest(models_dir, version)
    return "unknown arch 'vgg16'"


def symlinked_version(models_dir, tmp_path) -> str:
    """A well-named version folder that is a symlink to a complete version elsewhere."""
    outside = publish_model(tmp_path / "linked", seed=10)
    (models_dir / outside).symlink_to(tmp_path / "linked" / outside)
    write_latest(models_dir, outside)
    return "is a symbolic link"


def symlinked_latest(models_dir, tmp_path) -> str:
    """LATEST itself is a symlink to a file elsewhere naming another, complete version."""
    other = publish_model(models_dir, seed=11, make_latest=False)
    (tmp_path / "their-latest").write_text(other)
    (models_dir / "LATEST.new").symlink_to(tmp_path / "their-latest")
    os.replace(models_dir / "LATEST.new", models_dir / store.LATEST)
    return "LATEST is a symbolic link"


def symlinked_meta(models_dir, tmp_path) -> str:
    """A version whose model.json is a symlink to a (valid) model.json elsewhere."""
    version = publish_model(models_dir, seed=12, make_latest=False)
    meta_path = models_dir / version / store.META_FILE
    os.replace(meta_path, tmp_path / "their-model.json")
    meta_path.symlink_to(tmp_path / "their-model.json")
    write_latest(models_dir, version)
    return "model.json is a symbolic link"


def fifo_weights(models_dir, tmp_path) -> str:
    """A version whose model.pt is a FIFO: reading it would wait forever for a writer."""
    version = publish_model(models_dir, seed=13, make_latest=False)
    (models_dir / version / store.WEIGHTS_FILE).unlink()
    os.mkfifo(models_dir / version / store.WEIGHTS_FILE)
    write_latest(models_dir, version)
    return "model.pt is not a regular file"


def huge_meta(models_dir, tmp_path) -> str:
    """A version whose model.json is 256 MiB (sparse): reading it whole would cost memory."""
    version = publish_model(models_dir, seed=14, make_latest=False)
    os.truncate(models_dir / version / store.META_FILE, 256 << 20)
    write_latest(models_dir, version)
    return "more than the 1048576 bytes allowed"


def huge_latest(models_dir, tmp_path) -> str:
    """A 256 MiB (sparse) LATEST."""
    store.atomic_write_bytes(models_dir / "LATEST.tmp", b"")
    os.truncate(models_dir / "LATEST.tmp", 256 << 20)
    os.replace(models_dir / "LATEST.tmp", models_dir / store.LATEST)
    return "more than the 256 bytes allowed"


@pytest.mark.slow
def test_hostile_store_files_are_refused_with_a_logged_reason_and_serving_goes_on(tmp_path):
    models_dir = tmp_path / "models"
    good = publish_model(models_dir, seed=1)
    with run_server(models_dir, tmp_path, MODEL_POLL_SECONDS="0.3") as server:
        wait_ready(server)
        for make_bad in (
            absolute_path,
            unknown_arch,
            symlinked_version,
            symlinked_latest,
            symlinked_meta,
            fifo_weights,
            huge_meta,
            huge_latest,
        ):
            reason = make_bad(models_dir, tmp_path)
            server.wait_for(
                lambda reason=reason: reason in json.dumps(server.get("/model").json()),
                10,
                f"GET /model to report the {make_bad.__name__} refusal ({reason!r})",
            )
            assert reason in server.log(), f"{make_bad.__name__}: reason not logged"
            assert server.model_version() == good, make_bad.__name__
            response = server.post("/predict", files=FILES)
            assert response.status_code == 200, make_bad.__name__
            assert response.json()["model_version"] == good
        assert "Traceback" not in server.log()

        # The poller is not stuck on any of them: a good version is picked up as usual.
        fixed = publish_model(models_dir, seed=15)
        server.wait_for(lambda: server.model_version() == fixed, 10, "the fixed version")
