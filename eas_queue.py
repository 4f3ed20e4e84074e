"""The eas-queue API: accept prediction requests into RQ queues and report their outcome.

POST /api/predict/<service>[/<subpath>]      enqueue; answers at once with the request id
GET  /api/predict/<service>/sink?request_id  status and the model's answer
DELETE the same                              cancel a request that has not started
GET  /healthz                                200 when Redis answers, 503 otherwise
/rq                                          rq-dashboard, behind HTTP Basic auth (password: a token)

`eas_queue:app` is the WSGI app (gunicorn); `flask --app eas_queue run` works too.
"""

from __future__ import annotations

import hmac
import logging
import math
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import redis
import rq_dashboard
from flask import Flask, Response, jsonify, request
from rq.exceptions import NoSuchJobError
from rq.utils import utcformat
from werkzeug.exceptions import HTTPException

import forwarding
import queueing
from settings import Settings, get_settings, is_service_name

log = logging.getLogger("eas_queue")

RESERVED_PARAMETERS = {"_priority_", "_ttl_"}
SINK_PARAMETERS = {"request_id"}
MAX_IDEMPOTENCY_KEY_LENGTH = 255
QUEUE_FULL_RETRY_AFTER = 2  # seconds a client is asked to wait when a queue is full
REDIS_DOWN_RETRY_AFTER = 5

MESSAGES = {
    "PENDING": "Request is queued.",
    "STARTED": "Request is being forwarded to the model.",
    "RETRY": "The last attempt failed; the request waits for its next attempt.",
    "SUCCESS": "Task completed successfully.",
    "FAILURE": "Task failed.",
    "CANCELED": "Request was canceled before it was forwarded.",
    "EXPIRED": "Request waited longer than its queue TTL and was never forwarded.",
}


class ApiError(Exception):
    """An answer other than success: an HTTP status, a message for the client, optional headers."""

    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.headers, self.extra = code, message, headers or {}, extra


def _matches(candidate: str, accepted: tuple[str, ...]) -> bool:
    """Constant-time comparison against every accepted token (no early exit)."""
    found = False
    for token in accepted:
        found |= hmac.compare_digest(candidate.encode(), token.encode())
    return found


def _check_token(settings: Settings, service: str) -> None:
    header = request.headers.get("Authorization", "").strip()
    if not header:
        raise ApiError(401, "missing Authorization header", {"WWW-Authenticate": "Bearer"})
    scheme, _, rest = header.partition(" ")
    token = rest.strip() if scheme.lower() == "bearer" and rest.strip() else header
    if not _matches(token, settings.tokens_for(service)):
        raise ApiError(403, "token not accepted")


def _check_service(settings: Settings, service: str) -> None:
    if not is_service_name(service):
        raise ApiError(400, "service name must be 1-128 letters, digits, '_', '-' or '.'")
    _check_token(settings, service)
    if settings.listed_services_only and service not in settings.services:
        raise ApiError(404, f"unknown service {service!r}")


def _single(name: str) -> str | None:
    values = request.args.getlist(name)
    if len(values) > 1:
        raise ApiError(400, f"{name} given more than once")
    return values[0] if values else None


def _submission(settings: Settings, service: str, subpath: str) -> queueing.Submission:
    args = request.args
    priority = ttl_text = None
    if args:
        unknown = sorted(k for k in args if k.startswith("_") and k not in RESERVED_PARAMETERS)
        if unknown:
            raise ApiError(400, f"unknown reserved query parameter {unknown[0]!r} (known: _priority_, _ttl_)")
        priority, ttl_text = _single("_priority_"), _single("_ttl_")
    if priority not in (None, "0", "1"):
        raise ApiError(400, "_priority_ must be 0 or 1")
    ttl = None
    if ttl_text is not None:
        try:
            ttl = float(ttl_text)
        except ValueError:
            ttl = math.nan
        if not math.isfinite(ttl) or ttl <= 0:
            raise ApiError(400, "_ttl_ must be a positive number of seconds")
    headers = request.headers
    key = headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH and key.isascii() and key.isprintable()):
        raise ApiError(400, f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII characters")
    if subpath and not forwarding.is_subpath(subpath):
        raise ApiError(400, "subpath segments must be letters, digits, '_', '.', '~' or '-', and not '.' or '..'")
    body = _read_body(settings.max_body_bytes)
    return queueing.Submission(
        service=service,
        subpath=subpath,
        query=tuple((k, v) for k, v in args.items(multi=True) if not k.startswith("_")) if args else (),
        content_type=headers.get("Content-Type"),
        body=body,
        priority=priority == "1",
        ttl=ttl,
        idempotency_key=key,
    )


def _read_body(limit: int) -> bytes:
    """The body, or 413 if it is longer than `limit`: checked against Content-Length, and counted while
    reading a chunked body (werkzeug would silently cut such a body at MAX_CONTENT_LENGTH)."""
    environ, length = request.environ, request.content_length
    if length is not None:
        if length > limit:
            raise ApiError(413, f"body larger than {limit} bytes")
        body = environ["wsgi.input"].read(length) if length else b""
        if len(body) != length:  # the client went away mid-body: never queue half a request
            raise ApiError(400, f"body ended after {len(body)} of {length} bytes (Content-Length)")
        return body
    if not environ.get("wsgi.input_terminated"):
        return b""  # no length and a server that does not end the stream: nothing can be read safely
    stream, chunks, size = environ["wsgi.input"], [], 0
    while chunk := stream.read(min(65536, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body larger than {limit} bytes")
    return b"".join(chunks)


def _iso(moment: float | None) -> str | None:
    """A unix time in the format of RQ's own timestamps (enqueued_at and the others)."""
    return utcformat(datetime.fromtimestamp(moment, tz=UTC)) if moment else None


def _state_body(state: queueing.RequestState) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request_id": state.request_id,
        "status": state.status,
        "service_name": state.service,
        "message": MESSAGES[state.status],
        "attempts": state.attempts,
        "enqueued_at": state.enqueued_at,
        "started_at": state.started_at,
        "ended_at": state.ended_at,
    }
    if state.status == "SUCCESS":
        body["result"] = state.result
    elif state.status == "FAILURE":
        body["error_info"] = state.error
    elif state.status == "RETRY":
        body.update(next_attempt=state.attempts + 1, retry_at=_iso(state.retry_at), last_error=state.error)
    elif state.status == "PENDING" and state.error:
        body.update(next_attempt=state.attempts + 1, last_error=state.error)
    return body


def _request_id() -> str:
    unknown = sorted(set(request.args) - SINK_PARAMETERS)
    if unknown:
        raise ApiError(400, f"unknown query parameter {unknown[0]!r} (the sink takes request_id)")
    request_id = _single("request_id")
    if not request_id:
        raise ApiError(400, "request_id query parameter is required")
    if not queueing.REQUEST_ID_PATTERN.match(request_id):
        raise ApiError(400, "request_id is not a request id (a lowercase UUID)")
    return request_id


def _known_state(connection: redis.Redis, service: str, request_id: str) -> queueing.RequestState:
    state = queueing.read_state(connection, request_id)
    if state is None or state.service != service:
        raise ApiError(404, "no such request for this service (unknown, expired or another service's)")
    return state


def _add_dashboard(app: Flask, settings: Settings) -> None:
    app.config["RQ_DASHBOARD_REDIS_URL"] = settings.redis_url
    rq_dashboard.web.setup_rq_connection(app)
    app.register_blueprint(rq_dashboard.blueprint, url_prefix="/rq")

    def dashboard_guard() -> Response | None:
        auth = request.authorization
        if auth is None or auth.type != "basic" or not _matches(auth.password or "", settings.tokens):
            response = jsonify(error="the dashboard needs HTTP Basic auth; the password is an API token")
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Basic realm="eas-queue dashboard"'
            return response
        # Browsers resend Basic credentials to any site's forms and images, so an action (requeue, delete,
        # empty) must come from this host's own pages: the dashboard's scripts send Origin or Referer.
        if request.method not in ("GET", "HEAD") or request.path.startswith("/rq/requeue/"):
            source = request.headers.get("Origin") or request.headers.get("Referer") or ""
            if urlsplit(source).netloc != request.host:
                response = jsonify(error="dashboard actions must come from its own pages (Origin of this host)")
                response.status_code = 403
                return response
        return None

    # First among the dashboard's own hooks (which open a Redis connection per request), and only on its
    # routes: the API's requests do not pay for it.
    app.before_request_funcs.setdefault(rq_dashboard.blueprint.name, []).insert(0, dashboard_guard)


def create_app(settings: Settings | None = None) -> Flask:
    """Builds the app; the module-level `app` uses the process's settings."""
    settings = settings or get_settings()
    app = Flask(__name__)
    app.json.sort_keys = False  # keep the sink's fields in the order they are documented
    app.url_map.merge_slashes = False  # `a//b` is a bad subpath (400), not a redirect to `a/b`
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    connection = queueing.connect(settings.redis_url, settings.redis_timeout)
    enqueuer = queueing.Enqueuer(connection, settings)
    _add_dashboard(app, settings)

    @app.post("/api/predict/<service>")
    @app.post("/api/predict/<service>/<path:subpath>")
    def submit(service: str, subpath: str = "") -> Response:
        _check_service(settings, service)
        if subpath == "sink":
            raise ApiError(405, "the sink is read with GET and canceled with DELETE", {"Allow": "GET, DELETE"})
        queued = enqueuer.enqueue(_submission(settings, service, subpath))
        if queued.outcome == "full":
            raise ApiError(
                429,
                f"queue is full ({settings.max_queue_length} requests waiting); retry later",
                {"Retry-After": str(QUEUE_FULL_RETRY_AFTER)},
            )
        if queued.outcome == "conflict":
            raise ApiError(422, "this Idempotency-Key was already used for a different request")
        response = Response(queued.request_id, status=200, mimetype="text/plain")
        response.headers[forwarding.REQUEST_ID_HEADER] = queued.request_id
        return response

    @app.get("/api/predict/<service>/sink")
    def sink(service: str) -> tuple[Response, int]:
        _check_service(settings, service)
        state = _known_state(connection, service, _request_id())
        return jsonify(_state_body(state)), 200 if state.finished else 202

    @app.delete("/api/predict/<service>/sink")
    def cancel(service: str) -> tuple[Response, int]:
        _check_service(settings, service)
        request_id = _request_id()
        _known_state(connection, service, request_id)  # 404 unless it is this service's
        outcome = queueing.cancel(connection, request_id, settings.result_ttl)
        state = _known_state(connection, service, request_id)
        if outcome == "running":
            raise ApiError(409, "request is being forwarded now; it cannot be canceled", status=state.status)
        if outcome != "canceled":
            raise ApiError(409, "request has already ended", status=state.status)
        return jsonify(_state_body(state)), 200

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        connection.ping()
        return jsonify(status="ok"), 200

    @app.errorhandler(ApiError)
    def api_error(error: ApiError) -> tuple[Response, int, dict[str, str]]:
        return jsonify(error=error.message, **error.extra), error.code, error.headers

    @app.errorhandler(redis.RedisError)
    def redis_error(error: redis.RedisError) -> tuple[Response, int, dict[str, str]]:
        log.warning("Redis unavailable: %s", error)
        headers = {"Retry-After": str(REDIS_DOWN_RETRY_AFTER)}
        return jsonify(error="the queue's storage (Redis) is unavailable; retry later"), 503, headers

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        response = error.get_response()
        response.data = jsonify(error=error.description).get_data()
        response.content_type = "application/json"
        return response

    @app.errorhandler(NoSuchJobError)
    @app.errorhandler(LookupError)
    def not_found(error: Exception) -> tuple[Response, int]:
        return jsonify(error="not found"), 404

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> tuple[Response, int]:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return jsonify(error="internal error"), 500

    return app


app = create_app()
