"""Every error leaves as JSON `{"error": {"code": ..., "message": ...}}`, never as a traceback."""

import logging
from typing import Any

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

# Werkzeug's exceptions by status -> our codes; others use the snake_cased reason phrase.
HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    500: "internal_error",
}
# Response headers of Werkzeug's exceptions that carry meaning (Allow on a 405).
KEPT_HEADERS = ("Allow", "Retry-After")


class ApiError(Exception):
    """An error response: HTTP status, a stable machine-readable code, a human message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}


def error_response(error: ApiError) -> ResponseReturnValue:
    """The JSON body, status and headers for `error`."""
    body = {"error": {"code": error.code, "message": error.message}, **error.extra}
    return jsonify(body), error.status, error.headers


def register_error_handlers(app: Flask) -> None:
    """Turn ApiError, every HTTPException (404, 405, 413, ...) and any other exception into JSON."""

    @app.errorhandler(ApiError)
    def api_error(error: ApiError) -> ResponseReturnValue:
        return error_response(error)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> ResponseReturnValue:
        status = error.code or 500
        code = HTTP_CODES.get(status) or (error.name or "error").lower().replace(" ", "_")
        message = error.description or error.name
        if status == 413:
            message = (
                f"request too large: at most {app.config['MAX_UPLOAD_MB']:g} MiB "
                f"and {app.config['MAX_FILES']} files per request"
            )
        headers = {k: v for k, v in error.get_headers() if k in KEPT_HEADERS}
        return error_response(ApiError(status, code, message, headers))

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> ResponseReturnValue:
        log.exception("unhandled error")
        return error_response(ApiError(500, "internal_error", "internal error; see server log"))
