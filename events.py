"""Server-Sent Events on the sink: `GET /api/predict/<service>/sink?_watch_=true` with
`Accept: text/event-stream` streams the service's ended requests as they end, from its sink log
(sink_log.py).

Each event is `id: <sink index>` and `data: <the JSON sink record, one line>`. A client that reconnects with
`Last-Event-ID: <n>` (browsers' EventSource and SSE libraries do this by themselves) gets every entry after
n that is still in the sink log (within `result_ttl`), then live ones; `_index_=<n>` starts at n instead
(0: the oldest), and with neither the stream starts with the next request to end. A comment line every
KEEPALIVE seconds keeps idle connections (and the proxies between) open. A stream waits on its process's
one subscription (notifier.py), as a long-poll does: it holds no Redis connection while it waits.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import redis
from flask import Response, request, stream_with_context

import api
import lifecycle
import query
import redis_errors
import sink_log
from errors import ApiError

if TYPE_CHECKING:
    from api import ApiContext  # (api imports this module; `import api` above is used at call time only)

log = logging.getLogger("eas_queue")
KEEPALIVE = 15.0  # seconds between comment lines on an idle stream
BATCH = 100  # entries read from the sink log per round trip
PARAMETERS = {"_watch_", "_index_"}
MEDIA_TYPE = "text/event-stream"


RETRY_MS = 5000  # how long a client waits before it reconnects (the `retry:` field), e.g. while Redis is away


def wants_events() -> bool:
    media_types = (part.split(";")[0].strip().lower() for part in request.headers.get("Accept", "").split(","))
    return MEDIA_TYPE in media_types


def _first_index(connection: redis.Redis, service: str) -> int:
    """Where the stream starts: after Last-Event-ID, at `_index_`, or after the last entry so far."""
    query.only(PARAMETERS, "a stream")
    start = query.single("_index_")
    if not query.flag("_watch_"):
        raise ApiError(400, "a stream is asked for with _watch_=true")
    last_seen = request.headers.get("Last-Event-ID", "").strip()
    for name, text, offset in (("Last-Event-ID", last_seen, 1), ("_index_", start, 0)):
        if text:
            if not query.WHOLE_NUMBER.fullmatch(text):
                raise ApiError(400, f"{name} must be a sink index (a whole number)")
            return int(text) + offset
    return (sink_log.last_index(connection, service) or 0) + 1


def _event(connection: redis.Redis, entry: sink_log.SinkEntry) -> str:
    state = lifecycle.read_state(connection, entry.request_id)
    if state is None:  # its result has expired since; the log entry says how it ended
        record = {"request_id": entry.request_id, "status": entry.status.value, "index": entry.index}
    else:
        record = state.record()
    return f"id: {entry.index}\ndata: {json.dumps(record, separators=(',', ':'))}\n\n"


def stream(ctx: ApiContext, service: str) -> Response:
    """The event stream for `service` (api.py has checked the token). It counts as one of the process's
    waiting clients (`max_waiting_clients`; beyond them 503) from now until the response is closed."""
    first = _first_index(ctx.connection, service)
    release = ctx.notifier.admit()
    response = Response(stream_with_context(_events(ctx, service, first)), mimetype=MEDIA_TYPE)
    response.call_on_close(release)  # the server closes every response, read or not
    response.headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # no proxy may buffer it
    return response


def _events(ctx: ApiContext, service: str, position: int) -> Iterator[str]:
    connection, notifier = ctx.connection, ctx.notifier
    yield f"retry: {RETRY_MS}\n: eas-queue sink events\n\n"  # at once, so the client knows it is open
    failures = 0
    while True:
        try:
            entries = notifier.wait_until(
                lambda start=position: sink_log.read(connection, service, start, BATCH) or None,
                KEEPALIVE,
                service=service,
                gone=api.client_gone,  # a stream whose client left gives its place back within a second
            )
            with notifier.reading():
                chunk = "".join(_event(connection, entry) for entry in entries or ())
            failures = 0
        except redis.RedisError as error:
            # Redis away: the stream stays open and keeps its place; it goes on when Redis is back.
            failures += 1
            _log_outage(error)
            time.sleep(redis_errors.backoff(failures))
            yield ": waiting for Redis\n\n"
            continue
        if not entries:
            if api.client_gone():
                return
            yield ": keep-alive\n\n"
            continue
        yield chunk
        position = entries[-1].index + 1


_last_outage_log = 0.0


def _log_outage(error: redis.RedisError) -> None:
    """One line per process every 10 s, not one traceback per stream."""
    global _last_outage_log
    if time.monotonic() - _last_outage_log > 10:
        _last_outage_log = time.monotonic()
        log.warning("event streams wait for Redis: %s", redis_errors.describe(error))
