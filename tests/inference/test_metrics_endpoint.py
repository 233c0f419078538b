"""GET /metrics: Prometheus text, single worker and merged across several workers."""

import re

import pytest

from tests.inference.serving import image_bytes, publish_model, run_server, wait_ready


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{(.*)\}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def test_metrics_count_requests_images_batches_and_the_served_version(server, served_models):
    _, version = served_models
    before = server.get("/metrics").text
    files = [("file", ("a.png", image_bytes())), ("file", ("b.txt", b"not an image"))]
    assert server.post("/predict", files=files).status_code == 200
    server.get("/no-such-page")
    response = server.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    after = response.text

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("inference_requests_total", route="/predict", status="200") == 1
    assert delta("inference_requests_total", route="unmatched", status="404") == 1
    assert delta("inference_images_total", outcome="predicted") == 1
    assert delta("inference_images_total", outcome="rejected") == 1
    assert delta("inference_queue_wait_seconds_count") == 1
    assert delta("inference_model_seconds_count") >= 1
    assert delta("inference_batch_images_count") >= 1
    assert delta("inference_request_duration_seconds_count", route="/predict") == 1
    assert sample(after, "inference_model_info", version=version) == 1


@pytest.mark.slow
def test_metrics_add_up_across_workers(tmp_path):
    models_dir = tmp_path / "models"
    version = publish_model(models_dir)
    with run_server(models_dir, tmp_path, WORKERS="2", THREADS="2") as server:
        wait_ready(server)
        server.wait_for(  # both workers loaded (each has its own poller)
            lambda: all(server.get("/health/ready").status_code == 200 for _ in range(6)),
            60,
            "both workers ready",
        )
        for _ in range(12):
            assert server.post("/predict", files={"file": ("a.png", image_bytes())}).ok
        text = server.get("/metrics").text
        requests_ok = sample(text, "inference_requests_total", route="/predict", status="200")
        assert requests_ok == 12, text
        assert sample(text, "inference_images_total", outcome="predicted") == 12, text
        assert sample(text, "inference_model_info", version=version) == 1, text
