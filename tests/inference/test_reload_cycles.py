"""20 publish/rollback cycles against a real Gunicorn under load: no failures, old models freed."""

import shutil
import time

import pytest

from shared import store
from tests.inference.serving import image_bytes, publish_model, run_server, wait_ready
from tests.inference.traffic import Kind, Load, summary, tree_rss_bytes

CYCLES = 20
MAX_MEMORY_GROWTH = 0.15
SWAP_TIMEOUT_S = 30  # generous: a shared 2-core machine; the 3 s promise has its own test
GOOD = image_bytes(size=(48, 40), color=(120, 40, 200))


def predict(count: int):
    """A `send` function posting `count` good images."""

    def send(session, url):
        files = [("file", (f"{i}.png", GOOD)) for i in range(count)]
        return session.post(url + "/predict", files=files, timeout=60)

    return send


def predicted(count: int):
    """A check: `count` predictions, none refused."""

    def check(response) -> str | None:
        entries = response.json()["predictions"]
        if len(entries) != count or not all("category" in e for e in entries):
            return f"expected {count} predictions: {entries}"
        return None

    return check


KINDS = [
    Kind("one_image", 2, predict(1), (200,), predicted(1)),
    Kind("four_images", 1, predict(4), (200,), predicted(4)),
]


def prune(models_dir, keep: int = 2) -> None:
    """Delete all but the `keep` newest versions (keeps the test's disk use at ~100 MB)."""
    for version in store.list_versions(models_dir)[:-keep]:
        shutil.rmtree(models_dir / version)


@pytest.mark.slow
def test_20_publish_rollback_cycles_under_load_fail_no_request_and_free_old_models(tmp_path):
    models_dir = tmp_path / "models"
    published = {publish_model(models_dir, seed=0)}
    rss: list[int] = []
    # One worker: the log counts one load per swap, and the rollback follows the swap that
    # GET /model showed (every worker's reload: tests/inference/test_workers.py).
    with run_server(models_dir, tmp_path, MODEL_POLL_SECONDS="0.2", WORKERS="1") as server:
        wait_ready(server)
        load = Load(server.url, KINDS, concurrency=6).start()
        try:
            for cycle in range(1, CYCLES + 1):
                new = publish_model(models_dir, seed=cycle)
                published.add(new)
                server.wait_for(lambda new=new: server.model_version() == new, SWAP_TIMEOUT_S, new)
                back = store.rollback(models_dir)
                server.wait_for(
                    lambda back=back: server.model_version() == back, SWAP_TIMEOUT_S, back
                )
                prune(models_dir)
                time.sleep(0.3)  # requests still on the old model finish and let go of it
                rss.append(tree_rss_bytes(server.proc.pid))
        finally:
            outcomes = load.stop()
        info = server.get("/model").json()
        log = server.log()

    report = summary(outcomes)
    assert len(outcomes) > 100, report
    assert not [o for o in outcomes if o.problem], report  # every request 200, none dropped
    assert {o.version for o in outcomes} <= published, report
    assert info["last_error"] is None
    assert log.count("serving model version") == 1 + 2 * CYCLES
    assert "refused" not in log and "Traceback" not in log
    # Each swap loads a fresh 45 MB model: kept references would add ~1.7 GB by the end.
    warm = sorted(rss[2:6])[2]  # medians of 4 cycles: after the first few, and the last few
    final = sorted(rss[-4:])[2]
    trace = [round(b / 2**20) for b in rss]
    print(f"server RSS after each cycle (MiB): {trace}")
    assert final / warm - 1 < MAX_MEMORY_GROWTH, f"memory grew across reloads (MiB): {trace}"
