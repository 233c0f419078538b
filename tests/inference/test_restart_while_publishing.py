"""The server restarted (killed, stopped, reloaded) while versions are being published.

A publisher process publishes back to back through shared.store.publish, the code the trainer
publishes with, so every restart lands in the middle of some publish. Each time, the server
must come back serving a complete version: loaded without a refusal, answering /predict.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.inference.serving import REPO, image_bytes, publish_model, run_server, wait_ready
from tests.inference.traffic import process_tree

PUBLISH_LOOP = """
import shutil, sys, time
from pathlib import Path
from shared import store
from tests.inference.serving import publish_model

models, stop = Path(sys.argv[1]), Path(sys.argv[2])
for seed in range(100, 400):  # bounded, in case the test dies without asking it to stop
    if stop.exists():
        break
    print(publish_model(models, seed=seed), flush=True)
    # Keep the disk use bounded: only versions a server could still be loading stay.
    for old in store.list_versions(models)[:-12]:
        shutil.rmtree(models / old)
    time.sleep(0.2)
"""
FILES = [("file", ("a.png", image_bytes()))]


def check_serving(server) -> str:
    """The server answers with a complete version and refused nothing; return that version."""
    info = server.get("/model").json()
    assert info["last_error"] is None, info["last_error"]
    response = server.post("/predict", files=FILES)
    assert response.status_code == 200, response.text
    assert "refused" not in server.log()
    return response.json()["model_version"]


@pytest.mark.slow
def test_server_restarted_while_publishing_comes_back_on_a_complete_version(tmp_path):
    models_dir = tmp_path / "models"
    first = publish_model(models_dir, seed=1)
    stop = tmp_path / "stop"
    publisher = subprocess.Popen(
        [sys.executable, "-c", PUBLISH_LOOP, str(models_dir), str(stop)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    served = []
    try:
        # Killed outright (as by the OOM killer or a power cut), then stopped cleanly.
        for how in (signal.SIGKILL, signal.SIGTERM):
            with run_server(models_dir, tmp_path, MODEL_POLL_SECONDS="0.3") as server:
                wait_ready(server)
                served.append(check_serving(server))
                time.sleep(1.0)  # a swap or two to a newer version
                served.append(check_serving(server))
                if how == signal.SIGKILL:
                    os.killpg(server.proc.pid, signal.SIGKILL)
                    server.proc.wait(30)

        # Reloaded in place: SIGHUP makes Gunicorn start new workers, which load afresh.
        with run_server(models_dir, tmp_path, MODEL_POLL_SECONDS="0.3") as server:
            wait_ready(server)
            served.append(check_serving(server))
            old_workers = set(process_tree(server.proc.pid)) - {server.proc.pid}
            server.proc.send_signal(signal.SIGHUP)
            server.wait_for(
                lambda: not old_workers & set(process_tree(server.proc.pid)), 60, "old worker gone"
            )
            wait_ready(server)
            served.append(check_serving(server))
    finally:
        stop.touch()
        out, _ = publisher.communicate(timeout=120)
    published = {first, *out.split()}
    assert len(published) > 5, "the publisher barely ran"
    assert set(served) <= published, set(served) - published
    assert not [p for p in models_dir.iterdir() if p.name.startswith(".")], "leftover temp files"
