"""The EAS queue protocol, as the eas-prediction SDK's QueueClient speaks it, over the sink log (sink_log.py).

api.py's routes hand a request here when it carries EAS's parameters (`_index_`, `_length_`,
`_auto_delete_`, `_raw_=false`, `_attrs_`, `_count_`, `_search_`, `_indexes_`, `_trunc_`); the WebSocket
of `watch` is this module's own route. Frames are queueservice.proto's DataFrameProto (eas_protocol.py):
`index` (the sink index), `tags` (the request's tags, `requestId`, `lastCode`), `data` (the model's
answer) and `message` (the status). Removing an entry from the sink queue (auto-delete, commit, delete,
truncate) never deletes the request: the JSON sink answers for it until `result_ttl`.

api.py imports this module and this module uses api's helpers at call time (a plain `import api` cycle,
which Python resolves: neither touches the other's names while being imported).
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import redis
from flask import Blueprint, Response, g, jsonify, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed, Server
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection
from wsproto.events import Request as WsRequest
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason

import api
import eas_protocol
import forwarding
import keys
import lifecycle
import query
import queue_reads
import redis_errors
import sink_log
from errors import ApiError

log = logging.getLogger("eas_queue")
bp = Blueprint("eas", __name__)
sock = Sock()

MAX_LENGTH = 100  # frames one get answers at most (`_length_`)
MAX_WINDOW = 1000  # frames a watch may hold uncommitted (`_window_`)
LONG_POLL_MARGIN = 0.5  # a long-poll answers this much before `_timeout_` (see wait_for)
WATCH_IDLE = 15.0  # seconds a watch waits for an end before it looks whether its client is still there
WATCH_CHECK = 1.0  # seconds between a full window's checks for commits (they come by PUT, not on the socket)
SCAN_LIMIT = 10_000  # most requests read per queue to count a service's waiting ones

GET_PARAMETERS = {"_index_", "_length_", "_timeout_", "_raw_", "_auto_delete_", "requestId", "request_id"}
WATCH_PARAMETERS = {"_watch_", "_index_", "_window_", "_index_only_", "_auto_commit_"}
_FRAME_TRIGGERS = ("_index_", "_length_", "_auto_delete_")
_MODEL_CODE = re.compile(r"the model answered HTTP ([0-9]{3})")
WEBSOCKET_VERSION = "13"
_NO_INPUT_INDEXES = (
    "the input queue has no indexes: a put answers the request id, not an index; read a request at "
    "/api/predict/<service>/sink?requestId=<id>, cancel it with DELETE there"
)


# --- dispatch: which requests are EAS protocol calls -----------------------------------------------------


def handles_sink_get() -> bool:
    """A GET on the sink that asks for frames, attributes or a count (the SDK's get sends `_raw_=false`
    and `_index_`); anything else is the JSON sink's."""
    args = request.args
    if "_attrs_" in args or "_count_" in args or "_search_" in args:
        return True
    return args.get("_raw_", "").lower() in query.FALSE_WORDS or any(name in args for name in _FRAME_TRIGGERS)


def handles_sink_delete() -> bool:
    """A DELETE on the sink by index (`_indexes_`, or `_index_` with `_trunc_`); by request id is a cancel."""
    return "request_id" not in request.args and "requestId" not in request.args


# --- frames ---------------------------------------------------------------------------------------------


def frame_for(entry_index: int, status: lifecycle.RequestStatus, request_id: str, state: Any, data: bool) -> Any:
    """The DataFrameProto of one ended request: `state` is its RequestState (None once its result has
    expired: the frame then says only what the sink log knows)."""
    tags = dict(getattr(state, "tags", None) or {})
    tags["requestId"] = request_id
    code, body = _answer(state) if state is not None else (None, b"")
    if code is not None:
        tags["lastCode"] = str(code)
    return eas_protocol.frame(entry_index, tags, body if data else b"", status.value)


def _answer(state: lifecycle.RequestState) -> tuple[int | None, bytes]:
    """The model's status code and answer: its body for a success, the cause for a failure (the model's
    own error answer is not kept, only its start, in the cause); nothing for a request never forwarded."""
    if state.status == lifecycle.RequestStatus.SUCCESS:
        code, _, body = forwarding.decode_answer(state.result)
        return code, body
    if state.status == lifecycle.RequestStatus.FAILURE:
        found = _MODEL_CODE.match(state.error or "")
        return (int(found[1]) if found else None), (state.error or "").encode()
    return None, b""


def frames_for(connection: redis.Redis, entries: list[sink_log.SinkEntry], data: bool = True) -> list[Any]:
    """The frames of sink-log entries, each with its request's current state."""
    return [
        frame_for(e.index, e.status, e.request_id, lifecycle.read_state(connection, e.request_id), data)
        for e in entries
    ]


def _frames_answer(frames: list[Any]) -> Response:
    if eas_protocol.wants_protobuf(request.headers.get("Accept")):
        return Response(eas_protocol.encode_list(frames), 200, content_type=eas_protocol.PROTOBUF_MEDIA_TYPE)
    return jsonify([eas_protocol.as_json(f) for f in frames])


# --- GET on the sink: frames, attributes, count ---------------------------------------------------------


def sink_get(ctx: api.ApiContext, service: str) -> Response:
    """The EAS calls that GET the sink queue: attributes, count, or frames (get)."""
    args = request.args
    if "_attrs_" in args:
        query.only({"_attrs_"}, "_attrs_")
        return jsonify(sink_attributes(ctx, service))
    if "_count_" in args:
        query.only({"_count_"}, "_count_")
        return jsonify(sink_log.length(ctx.connection, service))
    if "_search_" in args:
        raise ApiError(400, "_search_ is not supported on the sink: an entry there has ended; read it with get")
    return get_frames(ctx, service)


@dataclass(frozen=True)
class GetParameters:
    request_id: str | None
    index: int
    length: int
    wait: float
    auto_delete: bool


def _get_parameters() -> GetParameters:
    query.only(GET_PARAMETERS, "get")
    if query.flag("_raw_"):
        raise ApiError(400, "_raw_=true reads one request: use it with requestId alone")
    return GetParameters(
        request_id=query.request_id(),
        index=query.whole_number("_index_", 0, 0),
        length=query.whole_number("_length_", 1, 1, MAX_LENGTH),
        wait=query.wait(),
        auto_delete=query.flag("_auto_delete_", False),
    )


def wait_for(wait: float) -> float:
    """How long a long-poll waits for `_timeout_`: a little less, so that a client whose HTTP timeout
    equals `_timeout_` (the SDK's defaults: 5s and 5,000 ms) gets the empty answer, not its own timeout."""
    return max(0.0, wait - min(LONG_POLL_MARGIN, wait / 10))


def get_frames(ctx: api.ApiContext, service: str) -> Response:
    """The SDK's get: one request's frame once it has ended (requestId), or up to `_length_` entries from
    `_index_` on; either waits up to `_timeout_` for something to answer."""
    params = _get_parameters()
    if params.request_id is not None:
        frames = _frame_of_request(ctx, service, params)
    else:
        with ctx.notifier.client():
            entries = ctx.notifier.wait_until(
                lambda: sink_log.read(ctx.connection, service, params.index, params.length) or None,
                wait_for(params.wait),
                service=service,
                gone=api.client_gone,
            )
        frames = frames_for(ctx.connection, entries or [])
    if params.auto_delete and frames:
        sink_log.delete(ctx.connection, service, [f.index for f in frames if f.index])
    return _frames_answer(frames)


def _frame_of_request(ctx: api.ApiContext, service: str, params: GetParameters) -> list[Any]:
    """The request's frame once it has ended (from its state: it answers after its entry is removed, until
    `result_ttl`), or none if it has not ended in time; 404 if unknown."""
    request_id = params.request_id
    assert request_id is not None
    state = api.known_state(ctx.connection, service, request_id)
    if not state.status.ended:
        with ctx.notifier.client():
            state = api.wait_until_ended(ctx, service, request_id, wait_for(params.wait), state) or state
    if not state.status.ended:
        return []
    return [frame_for(state.sink_index or 0, state.status, request_id, state, True)]


# --- attributes and counts ------------------------------------------------------------------------------


def _ours(connection: redis.Redis) -> dict[str, str]:
    """What waits in each queue (all services) and the live workers: the figures /metrics shows."""
    snapshot = queue_reads.read_snapshot(connection)
    ours = {f"queue.{name}.length": str(depth.waiting) for name, depth in snapshot.queues.items()}
    ours["workers.live"] = str(snapshot.live_workers)
    return ours


def sink_attributes(ctx: api.ApiContext, service: str) -> dict[str, str]:
    """EAS's attribute names for the sink queue, plus ours."""
    connection = ctx.connection
    oldest = sink_log.read(connection, service, 0, 1)
    return {
        "meta.name": f"{service}/sink",
        "meta.maxPayloadBytes": str(ctx.settings.max_result_bytes),
        "stream.length": str(sink_log.length(connection, service)),
        "stream.approxMaxLength": "0",  # no length cap: entries are trimmed by age (result_ttl)
        "stream.maxAgeSeconds": str(ctx.settings.result_ttl),
        "stream.firstEntry": str(oldest[0].index if oldest else 0),
        "stream.lastEntry": str(sink_log.last_index(connection, service) or 0),
        **_ours(connection),
    }


def waiting_requests(connection: redis.Redis, service: str, queue_names: tuple[str, ...]) -> list[str]:
    """The ids of `service`'s requests waiting in these queues, oldest first per queue: there is no index
    by service, so this reads the `eas_service` of up to SCAN_LIMIT requests per queue."""
    found: list[str] = []
    for name in queue_names:
        ids = [i.decode() for i in connection.lrange(keys.queue_keys(name).queue, 0, SCAN_LIMIT - 1)]
        owners = queue_reads.job_fields(connection, ids, keys.SERVICE_FIELD)
        found += [i for i, (owner,) in zip(ids, owners, strict=True) if owner == service]
    return found


def input_attributes(ctx: api.ApiContext, service: str) -> dict[str, str]:
    """EAS's attribute names for the input queue, plus ours. `stream.lastEntry` is the id of the service's
    newest waiting request (the input queue has no indexes)."""
    high, default = (waiting_requests(ctx.connection, service, (name,)) for name in keys.QUEUE_NAMES)
    newest = (default or high or [""])[-1]
    return {
        "meta.name": service,
        "meta.maxPayloadBytes": str(ctx.settings.max_body_bytes),
        "stream.length": str(len(high) + len(default)),
        "stream.approxMaxLength": str(ctx.settings.max_queue_length),
        "stream.lastEntry": newest,
        **_ours(ctx.connection),
    }


def input_get(ctx: api.ApiContext, service: str) -> Response:
    """GET on the input queue: attributes, or how many of the service's requests wait (`_count_`, with
    `_priority_=1` for the high queue only, `_priority_=0` for the normal one)."""
    args = request.args
    if "_search_" in args:
        raise ApiError(400, f"_search_ is not supported: {_NO_INPUT_INDEXES}")
    if "_attrs_" in args:
        query.only({"_attrs_"}, "_attrs_")
        return jsonify(input_attributes(ctx, service))
    if "_count_" in args:
        query.only({"_count_", "_priority_"}, "_count_")
        high = query.priority()
        names = keys.QUEUE_NAMES if high is None else (keys.QUEUE_NAMES[0 if high else 1],)
        return jsonify(len(waiting_requests(ctx.connection, service, names)))
    raise ApiError(400, "GET on the input queue takes _attrs_=true or _count_=true; submit with POST")


def input_indexes() -> NoReturn:
    """PUT or DELETE on the input queue (the SDK's commit, delete, truncate there): never applicable."""
    raise ApiError(400, f"not supported on the input queue: {_NO_INPUT_INDEXES}")


# --- commit, delete, truncate ---------------------------------------------------------------------------


def _ok() -> Response:
    """EAS answers these with the text OK, which the SDK's delete and truncate return to the caller."""
    return Response("OK", 200, mimetype="text/plain")


def commit(ctx: api.ApiContext, service: str) -> Response:
    """PUT `_indexes_`: these entries are done with; they leave the sink queue."""
    query.only({"_indexes_", "_negative_"}, "commit")
    if query.flag("_negative_", False):
        raise ApiError(400, "_negative_ (nack) is not supported: an entry stays in the sink queue until committed")
    sink_log.delete(ctx.connection, service, query.indexes())
    return _ok()


def sink_delete(ctx: api.ApiContext, service: str) -> Response:
    """DELETE `_indexes_` (delete) or `_index_=N&_trunc_=true` (truncate: every entry below N)."""
    if "_indexes_" in request.args:
        query.only({"_indexes_"}, "delete")
        sink_log.delete(ctx.connection, service, query.indexes())
        return _ok()
    query.only({"_index_", "_trunc_"}, "truncate")
    if not query.flag("_trunc_", False) or "_index_" not in request.args:
        raise ApiError(400, "DELETE on the sink takes request_id (cancel), _indexes_, or _index_ with _trunc_=true")
    sink_log.truncate(ctx.connection, service, query.whole_number("_index_", 0, 0))
    return _ok()


# --- watch: the WebSocket -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WatchParameters:
    index: int
    window: int
    index_only: bool
    auto_commit: bool


def _watch_parameters() -> WatchParameters:
    query.only(WATCH_PARAMETERS, "watch")
    if not query.flag("_watch_", False):
        raise ApiError(400, "a WebSocket on the sink is a watch: add _watch_=true")
    return WatchParameters(
        index=query.whole_number("_index_", 0, 0),
        window=query.whole_number("_window_", 1, 1, MAX_WINDOW),
        index_only=query.flag("_index_only_", False),
        auto_commit=query.flag("_auto_commit_", False),
    )


@bp.before_request
def _check_watch() -> None:
    """Everything that can refuse a watch is checked before the WebSocket handshake, so that a refusal is a
    plain JSON 4xx (or 503): token, parameters, the handshake's headers, and that Redis answers (a client
    that reconnects during an outage, as the SDK's watcher does at once, gets a 503 and waits, instead of a
    handshake and a close in a tight loop)."""
    api.check_service(api.context().settings, request.view_args["service"])
    params = _watch_parameters()
    _check_handshake(request.environ)
    sink_log.read(api.context().connection, request.view_args["service"], params.index, 1)
    g.watch_release = api.context().notifier.admit()  # a watch is one of the waiting clients (503 beyond)


@bp.teardown_request
def _release_watch(_: BaseException | None) -> None:
    release = g.pop("watch_release", None)
    if release is not None:
        release()


def _check_handshake(environ: Mapping[str, Any]) -> None:
    """400 (426 for another version) for an upgrade that simple_websocket's handshake would fail on: it
    raises from inside flask-sock's view, which would answer a 500 with a traceback."""
    version = environ.get("HTTP_SEC_WEBSOCKET_VERSION")
    if version != WEBSOCKET_VERSION:
        code = 426 if version else 400
        headers = {"Sec-WebSocket-Version": WEBSOCKET_VERSION}
        raise ApiError(code, f"a WebSocket here needs Sec-WebSocket-Version: {WEBSOCKET_VERSION}", headers)
    try:
        key_ok = len(base64.b64decode(environ.get("HTTP_SEC_WEBSOCKET_KEY", ""), validate=True)) == 16
    except (binascii.Error, ValueError):
        key_ok = False
    if not key_ok:
        raise ApiError(400, "Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455)")
    problem = _handshake_problem(environ)
    if problem:
        raise ApiError(400, f"WebSocket handshake refused: {problem}")


def _handshake_problem(environ: Mapping[str, Any]) -> str | None:
    """Runs the handshake simple_websocket.Server will run (the same bytes, built from the environ as it
    builds them, and the same extension offer) on a throwaway connection; what fails, or None."""
    connection = WSConnection(ConnectionType.SERVER)
    try:
        lines = [b"GET / HTTP/1.1\r\n"]
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                lines.append(f"{'-'.join(p.capitalize() for p in key[5:].split('_'))}: {value}\r\n".encode())
        connection.receive_data(b"".join(lines) + b"\r\n")
        for event in connection.events():
            if isinstance(event, WsRequest):
                connection.send(AcceptConnection(extensions=[PerMessageDeflate()]))
                return None
    except Exception as error:  # wsproto's protocol errors, and ValueError from a bad extension offer
        return str(error) or type(error).__name__
    return "incomplete upgrade request"


@sock.route("/api/predict/<service>/sink", bp=bp)
def watch(ws: Server, service: str) -> None:
    """The SDK's watch: frames of the service's ended requests in index order from `_index_` (0: the
    oldest still in the sink queue), then live as requests end; at most `_window_` sent and not
    committed; `_auto_commit_` commits each as it is sent."""
    Watch(api.context(), service, _watch_parameters(), ws).run()


class Watch:
    """One watching client. Once the handshake is done, nothing may escape `run`: flask-sock would hand an
    exception to Flask, whose error answer (HTTP bytes) would go into the open WebSocket while
    simple_websocket's reader still holds the socket. Every failure ends as a close frame instead."""

    def __init__(self, ctx: api.ApiContext, service: str, params: WatchParameters, ws: Server) -> None:
        self.ctx, self.service, self.params, self.ws = ctx, service, params, ws
        self.next_index = params.index
        self.held: list[int] = []  # sent and not yet committed

    def run(self) -> None:
        try:
            self._serve()
        except (ConnectionClosed, OSError):  # the client went away (redis-py raises its own errors, not OSError)
            pass
        except redis.RedisError as error:
            log.warning("watch of %s closed (1013): %s", self.service, redis_errors.describe(error))
            self._close(CloseReason.TRY_AGAIN_LATER, "Redis unavailable; retry later")
        except Exception as error:  # one line per watcher, not a traceback each: where it failed is enough
            where = traceback.extract_tb(error.__traceback__)[-1]
            log.error(
                "watch of %s closed (1011): %s: %s at %s:%s",
                self.service,
                type(error).__name__,
                error,
                where.filename,
                where.lineno,
            )
            self._close(CloseReason.INTERNAL_ERROR, "internal error")

    def _serve(self) -> None:
        while self.ws.connected:
            room = self.params.window - len(self._still_held())
            if room <= 0:
                self.ws.receive(timeout=WATCH_CHECK)  # wait for commits; notices a close at once
                continue
            self._send(self._next_entries(room))

    def _close(self, code: int, reason: str) -> None:
        try:
            self.ws.close(code, reason)
        except (ConnectionClosed, OSError):
            pass  # the client has gone already

    def _next_entries(self, count: int) -> list[sink_log.SinkEntry]:
        """The next entries, waiting up to WATCH_IDLE for one. Redis is read when the wait begins (the
        notifier has registered us by then, so nothing that ends later is missed) and each time a request
        of the service ends: an idle watcher costs one read per WATCH_IDLE."""

        def ready() -> list[sink_log.SinkEntry] | None:
            return sink_log.read(self.ctx.connection, self.service, self.next_index, count) or None

        return self.ctx.notifier.wait_until(ready, WATCH_IDLE, service=self.service) or []

    def _send(self, entries: list[sink_log.SinkEntry]) -> None:
        sent: list[int] = []
        try:
            for proto in frames_for(self.ctx.connection, entries, data=not self.params.index_only):
                self.ws.send(proto.SerializeToString())
                sent.append(proto.index)
                self.next_index = proto.index + 1
        finally:  # what reached the socket; a frame whose send failed is sent again after a reconnect
            if self.params.auto_commit:
                sink_log.delete(self.ctx.connection, self.service, sent)
            else:
                self.held += sent

    def _still_held(self) -> list[int]:
        """The sent entries still in the sink queue (the client commits them with PUT _indexes_)."""
        if self.held:
            first, last = self.held[0], self.held[-1]
            present = {e.index for e in sink_log.read(self.ctx.connection, self.service, first, last - first + 1)}
            self.held = [i for i in self.held if i in present]
        return self.held
