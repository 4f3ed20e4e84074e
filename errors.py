"""One JSON error shape for every answer that is not a success: `{"error": "..."}` with the right status."""

from __future__ import annotations

import logging
from typing import Any

import redis
from flask import Flask, Response, jsonify, request
from rq.exceptions import NoSuchJobError
from werkzeug.exceptions import HTTPException

import redis_errors
from notifier import Busy

log = logging.getLogger("eas_queue")

REDIS_DOWN_RETRY_AFTER = 5  # seconds a client is asked to wait while Redis is unavailable


class ApiError(Exception):
    """An answer other than success: an HTTP status, a message for the client, optional headers."""

    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.headers, self.extra = code, message, headers or {}, extra


def _api_error(error: ApiError) -> tuple[Response, int, dict[str, str]]:
    return jsonify(error=error.message, **error.extra), error.code, error.headers


def _redis_error(error: redis.RedisError) -> tuple[Response, int, dict[str, str]]:
    log.warning("Redis error on %s %s: %s", request.method, request.path, error)
    headers = {"Retry-After": str(REDIS_DOWN_RETRY_AFTER)}
    return jsonify(error=f"{redis_errors.describe(error)}; retry later"), 503, headers


def _http_error(error: HTTPException) -> Response:
    """Werkzeug's own errors (404, 405, 413...) as JSON instead of its HTML page."""
    response = error.get_response()
    response.data = jsonify(error=error.description).get_data()
    response.content_type = "application/json"
    return response


def _no_such_job(error: NoSuchJobError) -> tuple[Response, int]:
    return jsonify(error="not found"), 404  # the dashboard's pages for a job that is gone


def _unexpected(error: Exception) -> tuple[Response, int]:
    log.exception("unexpected error on %s %s", request.method, request.path)
    return jsonify(error="internal error"), 500


def _json_redirect(response: Response) -> Response:
    """Werkzeug's redirects (e.g. `/rq` to `/rq/`) carry a small HTML page; say the same in JSON."""
    if 300 <= response.status_code < 400 and response.mimetype == "text/html" and response.location:
        response.set_data(jsonify(error="moved: follow Location", location=response.location).get_data())
        response.content_type = "application/json"
    return response


def _busy(error: Busy) -> tuple[Response, int, dict[str, str]]:
    return jsonify(error=f"{error}; retry later"), 503, {"Retry-After": "1"}


def register_error_handlers(app: Flask) -> None:
    app.after_request(_json_redirect)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(Busy, _busy)
    app.register_error_handler(redis.RedisError, _redis_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(NoSuchJobError, _no_such_job)
    app.register_error_handler(Exception, _unexpected)
