"""The Flask app: `create_app()` builds it, Gunicorn calls `create_served_app()`.

Settings come from inference/config.py (environment variables); the model is loaded by a
background thread started in each worker, never at import or in the Gunicorn master. Gunicorn
calls `create_served_app()`, which turns a setting the machine can't honour into one line.
"""

import logging
import time
from typing import Any

from flask import Flask, g, request
from flask.wrappers import Response
from gunicorn.errors import AppImportError

from inference import metrics
from inference.config import load_config
from inference.errors import register_error_handlers
from inference.predictor import Predictor
from inference.routes import bp
from inference.upload_deadline import UploadDeadlines
from shared.device import DeviceError, resolve_device


def _record_request(response: Response) -> Response:
    """Count the request and its latency under its route pattern (not the raw path)."""
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    metrics.REQUESTS.labels(route, request.method, str(response.status_code)).inc()
    if "start" in g:
        metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - g.start)
    return response


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app: defaults, then environment variables, then `config` (tests).

    Raises ValueError for a setting that does not parse, or a DEVICE this machine lacks.
    """
    settings = load_config(overrides=config)
    try:  # now, not at the first model load: a missing device is a setting to fix
        resolve_device(settings["DEVICE"])
    except DeviceError as exc:
        raise DeviceError(f"DEVICE={exc}") from None
    logging.basicConfig(
        level=settings["LOG_LEVEL"].upper(),
        format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s",
    )
    app = Flask(__name__)
    app.config.update(settings)
    # Werkzeug enforces these while parsing, with or without Content-Length (-> 413).
    app.config["MAX_CONTENT_LENGTH"] = int(settings["MAX_UPLOAD_MB"] * 1024 * 1024)
    app.config["MAX_FORM_PARTS"] = settings["MAX_FILES"] + 16
    app.json.sort_keys = False  # keep documented key order (category first, ...)

    predictor = Predictor(settings)
    app.extensions["inference"] = predictor
    deadlines = UploadDeadlines(settings["UPLOAD_TIMEOUT_SECONDS"])
    app.extensions["upload_deadlines"] = deadlines

    @app.before_request
    def before_request() -> None:
        g.start = time.perf_counter()
        predictor.ensure_started()
        # A client that stalls or trickles its body must not hold a request thread forever:
        # a timeout on each pause (Gunicorn resets the socket to blocking before each request
        # on the connection), and a deadline for the whole body (a byte a second never pauses).
        sock = request.environ.get("gunicorn.socket")
        if sock is not None:
            sock.settimeout(settings["CLIENT_TIMEOUT_SECONDS"])
            if request.content_length or request.headers.get("Transfer-Encoding"):
                g.upload_watch = deadlines.watch(sock)

    @app.teardown_request
    def stop_watching_the_body(_error: BaseException | None) -> None:
        watch = g.pop("upload_watch", None)
        if watch is not None:
            deadlines.release(watch)

    app.after_request(_record_request)
    app.register_blueprint(bp)
    register_error_handlers(app)
    return app


def create_served_app() -> Flask:
    """create_app for Gunicorn: a bad setting stops the server with one line, not a traceback."""
    try:
        return create_app()
    except ValueError as exc:
        # Gunicorn prints an AppImportError's message alone, and the master stops ("App failed
        # to load", exit code 4) instead of booting a worker that would fail the same way.
        raise AppImportError(f"error: {exc}") from None
