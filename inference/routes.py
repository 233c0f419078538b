"""HTTP routes: /predict, health, /model, /metrics and the web page."""

import math
import os
import time
import unicodedata
from typing import Any

import torch
from flask import Blueprint, Response, current_app, g, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import ClientDisconnected, HTTPException

from inference import metrics
from inference.batcher import BatchFailed, BatchTimeout, QueueFull
from inference.errors import ApiError
from inference.predictor import Predictor, ServedModel
from shared.preprocess import ImageError

bp = Blueprint("inference", __name__)

FIELD = "file"
MAX_FILENAME_CHARS = 255
# The version that answered a /predict, on every response a model took part in (successes,
# per-file errors, 422): behind a load balancer, each response says which version it got.
VERSION_HEADER = "X-Model-Version"


def predictor() -> Predictor:
    """The app's Predictor."""
    return current_app.extensions["inference"]


def no_model_error() -> ApiError:
    """503 for requests that need a model before one is loaded."""
    retry = str(math.ceil(current_app.config["MODEL_POLL_SECONDS"]))
    models_dir = current_app.config["MODELS_DIR"]
    return ApiError(
        503,
        "no_model",
        f"no model is loaded yet: run the trainer (python -m trainer) to publish one to "
        f"{models_dir}; this server picks it up by itself",
        {"Retry-After": retry},
    )


def safe_filename(name: str | None) -> str:
    """The client's file name for echoing back: control characters dropped, length capped."""
    name = "".join(c for c in (name or "") if unicodedata.category(c)[0] != "C")
    return name[:MAX_FILENAME_CHARS]


def parse_top_k(num_classes: int) -> int:
    """?top_k= as an int in [0, num_classes], else the TOP_K default; 400 if malformed."""
    text = request.args.get("top_k")
    if text is None or text == "":
        return min(current_app.config["TOP_K"], num_classes)
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ApiError(400, "invalid_top_k", f"top_k must be a whole number >= 0, got {text!r}")
    return min(value, num_classes)


def body_cut_off() -> bool:
    """Whether the upload deadline cut this request's body short (and stop watching it)."""
    watch = g.pop("upload_watch", None)
    return watch is not None and current_app.extensions["upload_deadlines"].release(watch)


def body_error(cause: BaseException | None, cut_off: bool) -> ApiError:
    """The error for a body that could not be read: 408 when the client was too slow."""
    if cut_off:
        timeout = current_app.config["UPLOAD_TIMEOUT_SECONDS"]
        message = f"the request body took more than {timeout:g} s to arrive"
    elif isinstance(cause, TimeoutError):
        timeout = current_app.config["CLIENT_TIMEOUT_SECONDS"]
        message = f"the request body stalled for more than {timeout:g} s"
    else:
        return ApiError(400, "unreadable_body", "the request body could not be read")
    return ApiError(408, "client_timeout", message, {"Connection": "close"})


def read_uploads() -> list[FileStorage]:
    """The request's `file` parts, in upload order; 400/413 for malformed or oversized bodies."""
    if request.mimetype != "multipart/form-data":
        raise ApiError(
            400,
            "not_multipart",
            f"send multipart/form-data with one or more '{FIELD}' fields "
            f"(got {request.mimetype or 'no content type'})",
        )
    try:
        files = request.files
    except ClientDisconnected as exc:  # Werkzeug's wrapper around a failed socket read
        raise body_error(exc.__context__, body_cut_off()) from None
    except HTTPException:
        raise  # 413 from the size limits
    except Exception as exc:  # noqa: BLE001 - broken chunking and other transport failures
        raise body_error(exc, body_cut_off()) from None
    if body_cut_off():  # cut short at the deadline, yet parsed: never use a partial form
        raise body_error(None, cut_off=True)
    uploads = files.getlist(FIELD)
    if not uploads:
        if FIELD in request.form:
            message = f"the '{FIELD}' field holds text, not a file (curl: -F {FIELD}=@photo.jpg)"
        else:
            fields = sorted({safe_filename(k)[:40] for k in [*files.keys(), *request.form.keys()]})
            got = f"got fields: {', '.join(fields[:5])}" if fields else "the form is empty"
            message = f"send images in multipart fields named '{FIELD}'; {got}"
        raise ApiError(400, "no_file", message)
    limit = current_app.config["MAX_FILES"]
    if len(uploads) > limit:
        raise ApiError(
            413, "too_many_files", f"{len(uploads)} files sent; at most {limit} per request"
        )
    return uploads


def prediction(probs: list[float], class_names: list[str], top_k: int, filename: str) -> dict:
    """The JSON entry for one image's probabilities."""
    # Plain floats: ten classes sort faster in Python than a few torch ops cost to launch, and
    # this runs once per image on the request thread, under the GIL.
    ranked = sorted(range(len(probs)), key=probs.__getitem__, reverse=True)
    best = ranked[0]
    entry: dict[str, Any] = {
        "category": class_names[best],
        "category_index": best,
        "confidence": round(probs[best], 6),
        "filename": filename,
    }
    if top_k:
        entry["top_k"] = [
            {"category": class_names[i], "category_index": i, "probability": round(probs[i], 6)}
            for i in ranked[:top_k]
        ]
    return entry


def decode_uploads(
    served: ServedModel, uploads: list[FileStorage]
) -> tuple[list[torch.Tensor], list[int], dict[int, dict[str, str]]]:
    """Decode each upload for `served`: (tensors, their upload indices, errors by index)."""
    tensors: list[torch.Tensor] = []
    slots: list[int] = []
    errors: dict[int, dict[str, str]] = {}
    for i, upload in enumerate(uploads):
        data = upload.read()
        try:
            if not data:
                raise ImageError("the file is empty")
            tensors.append(served.prepare(data))
            slots.append(i)
        except ImageError as exc:
            errors[i] = {"code": "invalid_image", "message": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a decoder surprise is still the file's fault
            current_app.logger.warning("decoding upload %d failed: %r", i, exc)
            errors[i] = {"code": "invalid_image", "message": "the image cannot be decoded"}
    return tensors, slots, errors


@bp.post("/predict")
def predict() -> ResponseReturnValue:
    """Classify every uploaded image; bad files get an error entry in place of a prediction."""
    uploads = read_uploads()
    served = predictor().current
    if served is None:
        raise no_model_error()
    g.served_version = served.version
    top_k = parse_top_k(len(served.class_names))
    names = [safe_filename(upload.filename) for upload in uploads]
    with predictor().batcher.ticket() as ticket:
        start = time.perf_counter()
        tensors, slots, errors = decode_uploads(served, uploads)
        metrics.PREPROCESS_SECONDS.observe(time.perf_counter() - start)
        metrics.IMAGES.labels("rejected").inc(len(errors))
        if not tensors:
            entries = [{"filename": names[i], "error": errors[i]} for i in range(len(names))]
            raise ApiError(
                422,
                "no_usable_image",
                f"none of the {len(names)} files is a usable image",
                extra={"predictions": entries, "model_version": served.version},
            )
        timeout = current_app.config["PREDICT_TIMEOUT_SECONDS"]
        try:
            # The connection names the client: keep-alive clients come back on it.
            client = (request.environ.get("REMOTE_ADDR"), request.environ.get("REMOTE_PORT"))
            job = ticket.submit(served, torch.stack(tensors), timeout, client=client)
        except (QueueFull, BatchTimeout) as exc:
            metrics.QUEUE_REJECTIONS.inc()
            raise ApiError(
                503, "overloaded", f"server busy ({exc}); retry shortly", {"Retry-After": "1"}
            ) from None
        except BatchFailed as exc:
            raise ApiError(500, "model_error", "the model failed on this batch") from exc
    metrics.QUEUE_SECONDS.observe(job.queue_seconds)
    metrics.IMAGES.labels("predicted").inc(len(tensors))
    probs = dict(zip(slots, job.probs.tolist(), strict=True))
    entries = [
        prediction(probs[i], served.class_names, top_k, names[i])
        if i in probs
        else {"filename": names[i], "error": errors[i]}
        for i in range(len(names))
    ]
    return jsonify({"predictions": entries, "model_version": served.version})


@bp.after_request
def add_version_header(response: Response) -> Response:
    """Name the served version in a header when a model took part in the answer."""
    version = g.get("served_version")
    if version is not None:
        response.headers[VERSION_HEADER] = version
    return response


@bp.get("/health/live")
def live() -> ResponseReturnValue:
    """200 while the process answers."""
    return jsonify({"status": "alive"})


@bp.get("/health/ready")
def ready() -> ResponseReturnValue:
    """200 with a loaded, warmed model; 503 before that and while shutting down."""
    if predictor().shutting_down:
        raise ApiError(503, "shutting_down", "this worker is shutting down")
    served = predictor().current
    if served is None:
        raise no_model_error()
    return jsonify({"status": "ready", "version": served.version, "worker_pid": os.getpid()})


@bp.get("/model")
def model_info() -> ResponseReturnValue:
    """This worker's served version, its model.json, the worker count, the last reload error."""
    holder = predictor().holder
    served = holder.current
    return jsonify(
        {
            "version": served.version if served else None,
            "loaded_at": served.loaded_at if served else None,
            "device": str(served.loaded.device) if served else None,
            "precision": served.choice.precision if served else None,
            "memory_format": served.choice.memory_format if served else None,
            "precision_reason": served.choice.reason if served else None,
            "tta": served.tta if served else None,
            "cuda_graphs": served.graphs_note if served else None,
            "compiled": served.compiled_note if served else None,
            # Each worker answers for itself: behind one port, the pid says which one this was.
            "workers": current_app.config["WORKERS"],
            "workers_reason": current_app.config["WORKERS_REASON"],
            "worker_pid": os.getpid(),
            "latest": holder.latest,
            "models_dir": holder.models_dir,
            "store_reachable": holder.store_error is None,
            "store_error": holder.store_error,
            "last_error": holder.last_error,
            "model": served.loaded.meta if served else None,
        }
    )


@bp.get("/metrics")
def metrics_text() -> ResponseReturnValue:
    """Prometheus text format."""
    body, content_type = metrics.render()
    return Response(body, content_type=content_type)


@bp.get("/")
def index() -> ResponseReturnValue:
    """The web page."""
    return current_app.send_static_file("index.html")
