"""The inference service: `create_app()` builds the Flask app that Gunicorn serves.

    gunicorn -c inference/gunicorn.conf.py        # from the repo root, inside .venv

Settings come from inference/config.py (environment variables); the model is loaded by a
background thread started in each worker, never at import or in the Gunicorn master.
"""

import logging
import time
from typing import Any

from flask import Flask, g, request
from flask.wrappers import Response

from inference import metrics
from inference.config import load_config
from inference.errors import register_error_handlers
from inference.predictor import Predictor
from inference.routes import bp


def _record_request(response: Response) -> Response:
    """Count the request and its latency under its route pattern (not the raw path)."""
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    metrics.REQUESTS.labels(route, request.method, str(response.status_code)).inc()
    if "start" in g:
        metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - g.start)
    return response


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app: defaults, then environment variables, then `config` (tests)."""
    settings = load_config(overrides=config)
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

    @app.before_request
    def before_request() -> None:
        g.start = time.perf_counter()
        predictor.ensure_started()
        # A client that trickles its body must not hold a request thread forever. Gunicorn
        # resets the socket to blocking (no timeout) before each request on the connection.
        sock = request.environ.get("gunicorn.socket")
        if sock is not None:
            sock.settimeout(settings["CLIENT_TIMEOUT_SECONDS"])

    app.after_request(_record_request)
    app.register_blueprint(bp)
    register_error_handlers(app)
    return app
