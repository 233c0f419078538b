"""Prometheus metrics of the service, and the /metrics body in single- or multi-process mode.

prometheus_client picks its storage when first imported: with PROMETHEUS_MULTIPROC_DIR set
(gunicorn.conf.py sets it for several workers) every worker writes to files in that folder
and /metrics adds them up.
"""

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

disable_created_metrics()  # no *_created series: they double the output and nobody graphs them

# Seconds: from a few ms (one small image) to a long queue on a slow CPU.
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter(
    "inference_requests_total",
    "HTTP requests by route, method and status",
    ["route", "method", "status"],
)
REQUEST_SECONDS = Histogram(
    "inference_request_duration_seconds",
    "Time from request start to response, by route",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
IMAGES = Counter(
    "inference_images_total", "Uploaded files by outcome (predicted, rejected)", ["outcome"]
)
PREPROCESS_SECONDS = Histogram(
    "inference_preprocess_seconds",
    "Decode and resize time of one request's files",
    buckets=LATENCY_BUCKETS,
)
QUEUE_SECONDS = Histogram(
    "inference_queue_wait_seconds",
    "Time a request's images waited for their forward pass",
    buckets=LATENCY_BUCKETS,
)
MODEL_SECONDS = Histogram(
    "inference_model_seconds", "Duration of one batched forward pass", buckets=LATENCY_BUCKETS
)
BATCH_IMAGES = Histogram(
    "inference_batch_images", "Images per batched forward pass", buckets=BATCH_BUCKETS
)
QUEUE_REJECTIONS = Counter(
    "inference_queue_rejections_total", "Requests answered 503 because the queue was full"
)
MODEL_RELOADS = Counter(
    "inference_model_reloads_total", "Model version loads by outcome (loaded, refused)", ["outcome"]
)
# 1 for the version a worker serves, 0 for versions it served before; livemax: 1 if any live
# worker serves it.
MODEL_INFO = Gauge(
    "inference_model_info", "Served model version", ["version"], multiprocess_mode="livemax"
)


def observe_batch(images: int, seconds: float) -> None:
    """Record one forward pass."""
    BATCH_IMAGES.observe(images)
    MODEL_SECONDS.observe(seconds)


def set_served_version(version: str, previous: str | None) -> None:
    """Mark `version` as served and `previous` as no longer served."""
    if previous is not None:
        MODEL_INFO.labels(previous).set(0)
    MODEL_INFO.labels(version).set(1)


def render() -> tuple[bytes, str]:
    """The /metrics body and its content type, merged across workers when multiprocess."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
