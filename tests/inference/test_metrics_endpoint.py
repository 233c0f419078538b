"""GET /metrics: Prometheus text (merged across workers: tests/inference/test_workers.py)."""

from tests.inference.serving import image_bytes, metric_sample


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
        return metric_sample(after, name, **labels) - metric_sample(before, name, **labels)

    assert delta("inference_requests_total", route="/predict", status="200") == 1
    assert delta("inference_requests_total", route="unmatched", status="404") == 1
    assert delta("inference_images_total", outcome="predicted") == 1
    assert delta("inference_images_total", outcome="rejected") == 1
    assert delta("inference_queue_wait_seconds_count") == 1
    assert delta("inference_model_seconds_count") >= 1
    assert delta("inference_batch_images_count") >= 1
    assert delta("inference_request_duration_seconds_count", route="/predict") == 1
    assert metric_sample(after, "inference_model_info", version=version) == 1
