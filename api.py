"""The queue's HTTP API: submit, read the sink, cancel, and health. Small views over queueing.py and
lifecycle.py; each validation failure is an ApiError, answered as JSON by errors.py."""

from __future__ import annotations

import math
import re
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

import gunicorn.http.errors
import redis
from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.routing import PathConverter

import callback_urls
import eas_sink
import events
import forwarding
import keys
import lifecycle
import metrics
import query
import queueing
import redis_errors
from auth import check_token
from backpressure import MemoryWatch
from errors import ApiError
from notifier import EndedNotifier
from settings import Service, Settings, is_service_name

bp = Blueprint("api", __name__)

RESERVED_PARAMETERS = {"_priority_", "_ttl_"}
ID_PARAMETERS = {"request_id", "requestId"}  # requestId: the EAS SDKs' name
SINK_PARAMETERS = ID_PARAMETERS | {"_timeout_", "_raw_"}
RAW_ANSWER_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"}
MAX_IDEMPOTENCY_KEY_LENGTH = 255
QUEUE_FULL_RETRY_AFTER = 2  # seconds a client is asked to wait when a queue is full
REDIS_FULL_RETRY_AFTER = 5  # ... and when Redis is past its memory high-water mark
BODY_IDLE_TIMEOUT = 10.0  # seconds a request body may send nothing before the client gets 408
CALLBACK_HEADER = "X-Eas-Callback-Url"  # a submit's completion webhook (webhooks.py)
SINK_RULE = "/api/predict/<service>/sink"
# What the sink takes: a POST there matches the submit route with the subpath `sink`, only to get 405.
SINK_METHODS = "GET, HEAD, PUT, DELETE, OPTIONS"


class SubpathConverter(PathConverter):
    """Werkzeug's `path`, but matching every character: its `.` stops at a newline, so a subpath with CR or
    LF would not reach validation and would get 404 instead of 400."""

    regex = r"[^/][\s\S]*?"


@dataclass(frozen=True)
class ApiContext:
    """What the views share, made once by create_app."""

    settings: Settings
    connection: redis.Redis
    enqueuer: queueing.Enqueuer
    memory: MemoryWatch
    notifier: EndedNotifier


def context() -> ApiContext:
    return current_app.extensions["eas_queue"]


# --- views ----------------------------------------------------------------------------------------


@bp.post("/api/predict/<service>")
@bp.post("/api/predict/<service>/<subpath:subpath>")
def submit(service: str, subpath: str = "") -> Response:
    ctx = context()
    check_service(ctx.settings, service)
    request.environ[metrics.SERVICE_ENVIRON] = service  # a label now: it passed the service and token checks
    if subpath == "sink":
        raise ApiError(405, "the sink is read with GET and canceled with DELETE", {"Allow": SINK_METHODS})
    wait = preferred_wait()
    if wait:  # the waiting client's place is taken first: a full server refuses before queuing anything
        with ctx.notifier.client():
            request_id = enqueue(ctx, submission_from_request(ctx.settings, service, subpath))
            return answer_when_ended(ctx, service, request_id, wait)
    request_id = enqueue(ctx, submission_from_request(ctx.settings, service, subpath))
    response = Response(request_id, status=200, mimetype="text/plain")
    response.headers[forwarding.REQUEST_ID_HEADER] = request_id
    return response


def enqueue(ctx: ApiContext, submission: queueing.Submission) -> str:
    """Queues the submission (or finds the request its Idempotency-Key names); its request id."""
    used = ctx.memory.over_high_water()
    if used is not None:
        raise ApiError(
            429,
            f"Redis is {used:.0%} full (redis_memory_high_water {ctx.settings.redis_memory_high_water:g}); retry later",
            {"Retry-After": str(REDIS_FULL_RETRY_AFTER)},
        )
    queued = ctx.enqueuer.enqueue(submission)
    if queued.outcome == "full":
        raise ApiError(
            429,
            f"queue is full ({ctx.settings.max_queue_length} requests waiting); retry later",
            {"Retry-After": str(QUEUE_FULL_RETRY_AFTER)},
        )
    if queued.outcome == "conflict":
        raise ApiError(422, "this Idempotency-Key was already used for a different request")
    return queued.request_id


EXPIRY_MARGIN = 0.01  # seconds past a request's queue deadline at which a waiting client reads it again


def wait_until_ended(
    ctx: ApiContext, service: str, request_id: str, seconds: float, state: lifecycle.RequestState | None = None
) -> lifecycle.RequestState | None:
    """The request's state once it has ended, read as it ends (notifier.py), or None if it has not ended
    within `seconds` (or the client went away). `state`: the caller's latest read (read here if None). A
    request that expires in the queue with no worker to see it ends without a notification, so the wait
    also reads it at its queue deadline (`expires_in`). The caller holds a waiting client's place."""

    def ended() -> lifecycle.RequestState | None:
        current = known_state(ctx.connection, service, request_id)
        return current if current.status.ended else None

    deadline = time.monotonic() + seconds
    while True:
        if state is None:
            with ctx.notifier.reading():
                state = known_state(ctx.connection, service, request_id)
        if state.status.ended:
            return state
        left = deadline - time.monotonic()
        if state.expires_in is None or state.expires_in >= left:
            return ctx.notifier.wait_until(ended, max(left, 0.0), request_id=request_id, gone=client_gone)
        woken = ctx.notifier.wait_until(
            ended, state.expires_in + EXPIRY_MARGIN, request_id=request_id, gone=client_gone
        )
        if woken is not None or client_gone():
            return woken
        state = None  # its deadline has passed: read it again (EXPIRED, or claimed just before)


def answer_when_ended(ctx: ApiContext, service: str, request_id: str, wait: int) -> Response:
    """`Prefer: wait=<n>`: 200 with the sink record if the request ends within n seconds, else 202 with its
    id, as a submit answers without the header. The caller holds a waiting client's place."""
    state = wait_until_ended(ctx, service, request_id, wait)
    response = jsonify(state.record()) if state else Response(request_id, status=202, mimetype="text/plain")
    response.headers[forwarding.REQUEST_ID_HEADER] = request_id
    response.headers["Preference-Applied"] = f"wait={wait}"
    return response


# RFC 7240's grammar: `Prefer: 1#( token [ BWS "=" BWS word ] *( OWS ";" [ OWS parameter ] ) )`.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_PREFERENCE_NAME = re.compile(rf"[ \t]*({_TOKEN})")
_PREFERENCE = re.compile(rf"[ \t]*{_TOKEN}(?:[ \t]*=[ \t]*({_TOKEN}|{_QUOTED}))?[ \t]*(?:;.*)?", re.DOTALL)
_DELTA_SECONDS = re.compile(r"[0-9]+")  # ASCII digits only: `1e3`, `1.5`, `-1` and `²` are not seconds


def _list_elements(header: str) -> Iterator[str]:
    """The comma-separated elements of a header, a comma inside a quoted string kept, in one pass: a
    regex for this backtracked quadratically on `"a\\` repeated (8 KB took 0.8 s of a worker)."""
    start, quoted, escaped = 0, False, False
    for at, char in enumerate(header):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            yield header[start:at]
            start = at + 1
    yield header[start:]


def preferred_wait() -> int:
    """Seconds from `Prefer: wait=<n>` (RFC 7240: n is delta-seconds, plain digits, quoted or not), at most
    query.MAX_WAIT; 0 without it. A preference is a hint: a larger n is honoured up to that, and a malformed
    one (`1e3` was read as 1) is ignored, as is any `wait` after the first (the RFC's rules)."""
    for element in _list_elements(", ".join(request.headers.getlist("Prefer"))):
        name = _PREFERENCE_NAME.match(element)
        if name is None or name[1].lower() != "wait":
            continue
        preference = _PREFERENCE.fullmatch(element)
        value = (preference[1] or "").removeprefix('"').removesuffix('"') if preference else ""
        if not _DELTA_SECONDS.fullmatch(value):
            return 0
        value, most = value.lstrip("0") or "0", int(query.MAX_WAIT)  # `wait=0000000` is 0
        return most if len(value) > 6 else min(int(value), most)  # no int() of 5,000 digits
    return 0


@bp.get(SINK_RULE)
def sink(service: str) -> tuple[Response, int] | Response:
    ctx = context()
    check_service(ctx.settings, service)
    if "_watch_" in request.args:  # a WebSocket watch is eas_sink.py's own route
        if not events.wants_events():
            raise ApiError(400, "a watch is a WebSocket, or Server-Sent Events with Accept: text/event-stream")
        return events.stream(ctx, service)
    if eas_sink.handles_sink_get():  # the EAS SDK's get, attributes, count
        return eas_sink.sink_get(ctx, service)
    request_id = sink_request_id(SINK_PARAMETERS, "the sink")
    wait, raw = query.wait(), query.flag("_raw_")
    state = known_state(ctx.connection, service, request_id)
    if wait and not state.status.ended:
        with ctx.notifier.client():  # a long-poll: answered the moment the request ends, or when the wait is over
            waited = wait_until_ended(ctx, service, request_id, wait, state)
            state = waited or known_state(ctx.connection, service, request_id)
    if raw:
        return raw_answer(state)
    return jsonify(state.record()), 200 if state.status.ended else 202


@bp.delete("/api/predict/<service>/sink")
def cancel(service: str) -> tuple[Response, int] | Response:
    ctx = context()
    check_service(ctx.settings, service)
    if eas_sink.handles_sink_delete():  # the EAS SDK's delete and truncate, by sink index
        return eas_sink.sink_delete(ctx, service)
    request_id = sink_request_id(ID_PARAMETERS, "cancel")
    known_state(ctx.connection, service, request_id)  # 404 unless it is this service's
    outcome = lifecycle.cancel(ctx.connection, request_id, ctx.settings.result_ttl)
    state = known_state(ctx.connection, service, request_id)
    if outcome == "running":
        raise ApiError(409, "request is being forwarded now; it cannot be canceled", status=state.status.value)
    if outcome != "canceled":
        raise ApiError(409, "request has already ended", status=state.status.value)
    return jsonify(state.record()), 200


@bp.put("/api/predict/<service>/sink")
def commit(service: str) -> Response:
    """The EAS SDK's commit: entries leave the sink queue (eas_sink.py)."""
    ctx = context()
    check_service(ctx.settings, service)
    return eas_sink.commit(ctx, service)


@bp.get("/api/predict/<service>")
def input_queue(service: str) -> Response:
    """The EAS SDK's attributes (and `_count_`) of the input queue (eas_sink.py)."""
    ctx = context()
    check_service(ctx.settings, service)
    return eas_sink.input_get(ctx, service)


@bp.route("/api/predict/<service>", methods=["PUT", "DELETE"])
def input_queue_indexes(service: str) -> NoReturn:
    """The EAS SDK's commit, delete and truncate on the input queue: 400, it has no indexes."""
    check_service(context().settings, service)
    eas_sink.input_indexes()


def options_answer(response: Response) -> Response:
    """Flask's automatic answer to OPTIONS (an empty 200 text/html) as 204 with `Allow` and neither body
    nor Content-Type. No CORS headers: the API does not serve other origins' pages."""
    response.status_code = 204
    del response.headers["Content-Type"]
    rule = request.url_rule
    if rule is not None and rule.rule == SINK_RULE:
        response.headers["Allow"] = SINK_METHODS
    return response


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    """Liveness: the process answers, whatever Redis does (an orchestrator must not restart every API
    process during a Redis outage)."""
    return jsonify(status="ok"), 200


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Readiness: Redis answers and accepts writes (a full, read-only or misconfigured Redis refuses them,
    and a submit would get 503)."""
    try:
        context().connection.set(keys.READINESS_PROBE, 1, ex=60)  # only a write shows that writes work
    except redis.RedisError as error:
        return jsonify(status="unavailable", error=redis_errors.describe(error)), 503
    return jsonify(status="ok"), 200


# --- reading a request ----------------------------------------------------------------------------


def check_service(settings: Settings, service: str) -> None:
    if not is_service_name(service):
        raise ApiError(400, "service name must be 1-128 letters, digits, '_', '-' or '.'")
    check_token(settings, service)  # first: the names of configured services are for token holders only
    lookalike = settings.lookalike_of(service)
    if lookalike:
        raise ApiError(400, f"service name differs from the configured service {lookalike!r} only by case or dots")
    if settings.listed_services_only and service not in settings.services:
        raise ApiError(404, f"unknown service {service!r}")


def _ttl(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        ttl = float(text)
    except ValueError:
        ttl = math.nan
    if not math.isfinite(ttl) or ttl <= 0:
        raise ApiError(400, "_ttl_ must be a positive number of seconds")
    return ttl


def submission_from_request(settings: Settings, service: str, subpath: str) -> queueing.Submission:
    args = request.args
    high, ttl = False, None
    if args:
        unknown = sorted(k for k in args if k.startswith("_") and k not in RESERVED_PARAMETERS)
        if unknown:
            raise ApiError(400, f"unknown reserved query parameter {unknown[0]!r} (known: _priority_, _ttl_)")
        high, ttl = query.priority() or False, _ttl(query.single("_ttl_"))
    headers = request.headers
    key = headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH and key.isascii() and key.isprintable()):
        raise ApiError(400, f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII characters")
    if subpath and not forwarding.is_subpath(subpath):
        raise ApiError(400, "subpath segments must be letters, digits, '_', '.', '~' or '-', and not '.' or '..'")
    callback = callback_url(settings, service, headers.get(CALLBACK_HEADER))
    body = read_body(settings.max_body_bytes)
    return queueing.Submission(
        service=service,
        subpath=subpath,
        query=tuple((k, v) for k, v in args.items(multi=True) if not k.startswith("_")) if args else (),
        content_type=headers.get("Content-Type"),
        body=body,
        priority=high,
        ttl=ttl,
        idempotency_key=key,
        raw_query=forwarding.forwarded_query(request.query_string),
        content_encoding=headers.get("Content-Encoding"),
        callback_url=callback,
    )


def callback_url(settings: Settings, service: str, header: str | None) -> str | None:
    """The request's completion webhook: the header's, else its service's; 400 unless callback_urls allows it."""
    url = header if header is not None else (settings.services.get(service) or Service()).callback_url
    if url is None:
        return None
    try:
        callback_urls.check_url(url, settings.callback_allowed_hosts, settings.redis_endpoints())
    except callback_urls.CallbackRefused as error:
        raise ApiError(400, f"{CALLBACK_HEADER}: {error}") from None
    return url


def read_body(limit: int) -> bytes:
    """The body, or 408 once no byte of it has arrived for BODY_IDLE_TIMEOUT seconds: under gevent a stalled
    client would otherwise hold its greenlet (and its connection) for ever. A slow upload that keeps moving
    is not cut off. Bounded through the connection's socket, which gunicorn puts in the environ."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return _read_body(limit)
    previous = sock.gettimeout()
    sock.settimeout(BODY_IDLE_TIMEOUT)
    try:
        return _read_body(limit)
    except TimeoutError:
        raise ApiError(408, f"no part of the body arrived for {BODY_IDLE_TIMEOUT:g} seconds") from None
    except gunicorn.http.errors.ParseException as error:  # a malformed chunked body: the stream is unusable
        raise ApiError(400, f"malformed body: {type(error).__name__}") from None  # gunicorn then closes
    finally:
        sock.settimeout(previous)


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


def sink_request_id(allowed: set[str], where: str) -> str:
    query.only(allowed, where)
    request_id = query.request_id()
    if not request_id:
        raise ApiError(400, "request_id query parameter is required")
    return request_id


def client_gone() -> bool:
    """Whether the client of this request has closed its connection (it can send nothing more while it
    waits, so a readable socket with no byte to read is one the client closed)."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return False  # not under gunicorn (a test client): cannot tell
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


_HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?")


def raw_answer(state: lifecycle.RequestState) -> tuple[Response, int] | Response:
    """`_raw_=true`: the model's own status code, content type and body once the request succeeded; 202
    and no body until it ends; the JSON record for a request that ended otherwise."""
    if state.status == lifecycle.RequestStatus.SUCCESS:
        code, content_type, body = forwarding.decode_answer(state.result)
        # The model's answer is served from the API's origin (where /rq lives too): never as a page that runs
        # (a model that echoes its input would let a client plant script), nor with a status that is not an
        # answer's (a 1xx would confuse a proxy in front).
        response = Response(body, status=code if 200 <= code < 600 else 502)
        # A model's Content-Type that is no valid header value (control or non-ASCII characters) is not sent.
        response.headers["Content-Type"] = (
            content_type if _HEADER_VALUE.fullmatch(content_type) else "application/octet-stream"
        )
        response.headers.update(RAW_ANSWER_HEADERS)
    elif state.status.ended:
        response = jsonify(state.record())
    else:
        response = Response(b"", status=202)
    response.headers["X-Eas-Queueservice-Status"] = state.status.value
    return response


def known_state(connection: redis.Redis, service: str, request_id: str) -> lifecycle.RequestState:
    state = lifecycle.read_state(connection, request_id)
    if state is None or state.service != service:
        raise ApiError(404, "no such request for this service (unknown, expired or another service's)")
    return state
