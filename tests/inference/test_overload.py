"""A full queue over HTTP: 503 `overloaded` with Retry-After at once, and the server goes on."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.inference.serving import image_bytes, publish_model, run_server, wait_ready

FILES = 16  # MAX_FILES and QUEUE_MAX_IMAGES: one full request fills the queue
CLIENTS = 8


@pytest.mark.slow
def test_full_queue_answers_503_overloaded_with_retry_after(tmp_path):
    # The real model, made to fall behind: a forward pass over 16 images of 64 px on one torch
    # thread takes far longer than decoding 16 tiny PNGs. Of 8 requests sent at once, one
    # runs, one full request waits in the queue, and the others find it full.
    models_dir = tmp_path / "models"
    publish_model(models_dir, image_size=64)
    env = {
        "MAX_FILES": str(FILES),
        "QUEUE_MAX_IMAGES": str(FILES),
        "BATCH_MAX_IMAGES": str(FILES),
        "THREADS": str(CLIENTS),
        "TORCH_THREADS": "1",
        "PREDICT_TIMEOUT_SECONDS": "120",  # no 503 from waiting: only from the full queue
        "WORKERS": "1",  # one queue: what fits above is one worker's
    }
    files = [("file", (f"{i}.png", image_bytes(color=(i * 15, 80, 160)))) for i in range(FILES)]
    with run_server(models_dir, tmp_path, **env) as server:
        wait_ready(server)

        def send(_):
            return server.post("/predict", files=files, timeout=120)

        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(send, range(CLIENTS)))
        statuses = [a.status_code for a in answers]
        assert set(statuses) <= {200, 503}, statuses
        refused = [a for a in answers if a.status_code == 503]
        assert refused and 200 in statuses, statuses
        for answer in refused:
            error = answer.json()["error"]
            assert error["code"] == "overloaded", error
            assert "images are waiting for the model" in error["message"], error
            assert int(answer.headers["Retry-After"]) >= 1
        for answer in answers:
            if answer.status_code == 200:
                assert len(answer.json()["predictions"]) == FILES
        # Still serving once the burst is over.
        assert server.post("/predict", files=files).status_code == 200
        assert requests.get(server.url + "/health/ready", timeout=30).status_code == 200
