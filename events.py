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
from collections.abc import Iterator
from typing import TYPE_CHECKING

import redis
from flask import Response, request, stream_with_context

import lifecycle
import sink_log
from errors import ApiError

if TYPE_CHECKING:
    from api import ApiContext

KEEPALIVE = 15.0  # seconds between comment lines on an idle stream
BATCH = 100  # entries read from the sink log per round trip
PARAMETERS = {"_watch_", "_index_"}
MEDIA_TYPE = "text/event-stream"


def wants_events() -> bool:
    return MEDIA_TYPE in request.headers.get("Accept", "")


def _first_index(connection: redis.Redis, service: str) -> int:
    """Where the stream starts: after Last-Event-ID, at `_index_`, or after the last entry so far."""
    unknown = sorted(set(request.args) - PARAMETERS)
    if unknown:
        raise ApiError(400, f"unknown query parameter {unknown[0]!r} (a stream takes _watch_ and _index_)")
    last_seen = request.headers.get("Last-Event-ID", "").strip()
    start = request.args.get("_index_")
    for name, text, offset in (("Last-Event-ID", last_seen, 1), ("_index_", start, 0)):
        if text:
            if not text.isdigit() or len(text) > 18:
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
    """The event stream for `service` (api.py has checked the token)."""
    connection, notifier = ctx.connection, ctx.notifier
    first = _first_index(connection, service)

    def events() -> Iterator[str]:
        position = first
        yield ": eas-queue sink events\n\n"  # sent at once, so the client knows the stream is open
        while True:
            entries = notifier.wait_until(
                lambda start=position: sink_log.read(connection, service, start, BATCH) or None,
                KEEPALIVE,
                service=service,
            )
            if not entries:
                yield ": keep-alive\n\n"
                continue
            for entry in entries:
                yield _event(connection, entry)
            position = entries[-1].index + 1

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer a stream
    return Response(stream_with_context(events()), mimetype=MEDIA_TYPE, headers=headers)
