"""What a security probe found in eas_sink.py, against the real stack (redis-server, the API under gunicorn's
gevent workers, the model server): a Redis error in a watch must end as a WebSocket close frame, never as
HTTP bytes after the 101; numbers are ASCII digits that fit a stream id, else a JSON 400 and nothing changes;
a bad WebSocket upgrade is a JSON 4xx, not a 500; an idle watcher costs Redis nothing until a request of its
service ends. Raw sockets where the exact bytes on the wire are the point."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
import redis
import requests
import websocket

import eas_protocol
import eas_sink
import keys
from tests.conftest import AUTH, TOKEN, Api, RedisServer, service_env, wait_for
from tests.model_server import ModelServer

SERVICE = "svc"
WAIT = 30  # seconds any step may take before the test fails
SINK = f"/api/predict/{SERVICE}/sink"


# --- raw WebSocket helpers ------------------------------------------------------------------------------


def upgrade(api: Api, query: str, **headers: str | None) -> socket.socket:
    """Sends a WebSocket upgrade for the sink with these query and headers (a None value leaves the header
    out); the socket, for the answer to be read raw."""
    fields = {
        "Host": f"127.0.0.1:{api.port}",
        "Authorization": TOKEN,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    fields.update({name.replace("_", "-"): value for name, value in headers.items()})
    lines = [f"GET {SINK}?{query} HTTP/1.1"] + [f"{k}: {v}" for k, v in fields.items() if v is not None]
    connection = socket.create_connection(("127.0.0.1", api.port), timeout=WAIT)
    connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return connection


def read_head(connection: socket.socket) -> tuple[bytes, bytes]:
    """The answer's status line and headers, and whatever bytes came after them."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        assert chunk, f"connection closed inside the answer's head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def read_to_end(connection: socket.socket) -> bytes:
    """Every byte until the server closes the connection (the socket's timeout is the deadline)."""
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    return data


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """Server-to-client WebSocket frames (unmasked, RFC 6455 section 5.2) as (opcode, payload); fails on any
    byte that is not part of a frame, such as an HTTP answer written into the socket."""
    found = []
    while data:
        assert len(data) >= 2, f"a partial frame: {data!r}"
        opcode, length, at = data[0] & 0x0F, data[1] & 0x7F, 2
        assert data[0] & 0x70 == 0 and data[1] & 0x80 == 0 and opcode in (0x1, 0x2, 0x8, 0x9, 0xA), data[:40]
        if length == 126:
            (length,), at = struct.unpack("!H", data[2:4]), 4
        elif length == 127:
            (length,), at = struct.unpack("!Q", data[2:10]), 10
        assert len(data) >= at + length, f"a frame cut short: {data!r}"
        found.append((opcode, data[at : at + length]))
        data = data[at + length :]
    return found


def http_answer(connection: socket.socket) -> tuple[int, http.client.HTTPMessage, bytes]:
    answer = http.client.HTTPResponse(connection)
    answer.begin()
    return answer.status, answer.headers, answer.read()


@pytest.fixture
def own_stack(tmp_path: Path, model: ModelServer) -> Iterator[tuple[RedisServer, Api, Path]]:
    """A private redis-server and API (nothing else talks to this Redis), and the API's log."""
    server = RedisServer(tmp_path / "redis").start()
    log = tmp_path / "api.log"
    api = Api(service_env(server.url, model.url), output=log)
    try:
        yield server, api, log
    finally:
        api.stop()
        server.kill()


def ended_by_cancel(api: Api) -> str:
    """A request that has ended, so has a sink entry, with no worker running: queued, then canceled."""
    request_id = api.submit_ok(SERVICE)
    assert api.cancel(request_id, SERVICE).status_code == 200
    return request_id


# --- M2: a Redis error in a watch -----------------------------------------------------------------------


def test_redis_going_away_during_a_watch_closes_it_with_1013(own_stack):
    server, api, log = own_stack
    request_id = ended_by_cancel(api)
    watcher = upgrade(api, "_watch_=true&_window_=1")  # window full after one frame: it checks commits
    head, rest = read_head(watcher)
    assert head.startswith(b"HTTP/1.1 101 ")
    while not rest:
        rest += watcher.recv(65536)

    server.kill()
    after_handshake = rest + read_to_end(watcher)
    watcher.close()

    assert b"HTTP/" not in after_handshake
    (first, frame), (closing, reason) = frames(after_handshake)
    assert first == 0x2 and eas_protocol.DataFrameProto.FromString(frame).tags["requestId"] == request_id
    assert closing == 0x8 and struct.unpack("!H", reason[:2])[0] == 1013 and b"Redis" in reason[2:]
    wait_for(lambda: "watch of svc closed (1013)" in log.read_text(), WAIT, "the watch's log line")
    text = log.read_text()
    assert "Traceback" not in text and "ConcurrentObjectUseError" not in text

    # A watch asked for while Redis is away is refused before its handshake: a JSON 503, no 101
    refused = upgrade(api, "_watch_=true")
    status, headers, body = http_answer(refused)
    refused.close()
    assert status == 503 and "error" in json.loads(body) and int(headers["Retry-After"]) > 0


# --- L1/L2: numbers ---------------------------------------------------------------------------------------


BAD_NUMBERS = ["²", "١٢", "-1", str(2**64), "1" * 19, ""]
NUMBER_IDS = ["superscript", "arabic-indic", "negative", "2^64", "19-digits", "empty"]
CALLS = [  # method, query with N for the number, the parameter the 400 must name
    ("GET", {"_index_": "N"}, "_index_"),
    ("GET", {"_index_": "0", "_length_": "N"}, "_length_"),
    ("PUT", {"_indexes_": "1,N"}, "_indexes_"),
    ("DELETE", {"_indexes_": "N"}, "_indexes_"),
    ("DELETE", {"_index_": "N", "_trunc_": "true"}, "_index_"),
    ("WATCH", {"_watch_": "true", "_window_": "N"}, "_window_"),
    ("WATCH", {"_watch_": "true", "_index_": "N"}, "_index_"),
]


@pytest.mark.parametrize("number", BAD_NUMBERS, ids=NUMBER_IDS)
@pytest.mark.parametrize(("method", "query", "name"), CALLS, ids=lambda c: c if isinstance(c, str) else None)
def test_a_number_that_is_not_plain_digits_or_too_big_is_a_json_400(api, db, method, query, name, number):
    for _ in range(2):
        ended_by_cancel(api)
    log_key = keys.sink_log_key(SERVICE)
    before = (db.xrange(log_key), db.dbsize())
    params = {k: v.replace("N", number) for k, v in query.items()}

    if method == "WATCH":
        url = api.url.replace("http://", "ws://") + f"{SINK}?{urlencode(params)}"
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(url, header=AUTH, timeout=WAIT)
        status, body = refused.value.status_code, refused.value.resp_body
    else:
        answer = requests.request(method, api.url + SINK, params=params, headers=AUTH, timeout=WAIT)
        status, body = answer.status_code, answer.content

    assert status == 400, body
    assert name in json.loads(body)["error"]
    assert (db.xrange(log_key), db.dbsize()) == before


def test_the_largest_number_taken_still_works(api, db):
    """18 digits is the limit: an index that large is a valid (empty) read, not a Redis error."""
    answer = requests.get(api.url + SINK, params={"_index_": "9" * 18}, headers=AUTH, timeout=WAIT)
    assert answer.status_code == 200 and answer.json() == []


# --- L3: bad WebSocket upgrades ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Sec_WebSocket_Version": None}, 400),
        ({"Sec_WebSocket_Key": None}, 400),
        ({"Sec_WebSocket_Key": "not a key"}, 400),
        ({"Sec_WebSocket_Version": "8"}, 426),
        ({"Sec_WebSocket_Extensions": "permessage-deflate; client_max_window_bits=abc"}, 400),
    ],
    ids=["no-version", "no-key", "bad-key", "version-8", "bad-extension"],
)
def test_a_bad_websocket_upgrade_is_a_json_4xx(api, db, headers, status):
    connection = upgrade(api, "_watch_=true", **headers)
    code, answer_headers, body = http_answer(connection)
    connection.close()
    assert code == status, body
    assert "error" in json.loads(body)
    if status == 426:
        assert answer_headers["Sec-WebSocket-Version"] == "13"


def test_a_good_raw_upgrade_still_works(api, db):
    """The checks before the handshake refuse only what the handshake would fail on."""
    connection = upgrade(api, "_watch_=true")
    head, _ = read_head(connection)
    connection.close()
    assert head.startswith(b"HTTP/1.1 101 ")


# --- L7: idle watchers -------------------------------------------------------------------------------------


IDLE_WATCHERS = 20
IDLE_SECONDS = 5.0


def xrange_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_xrange", {}).get("calls", 0))


def test_idle_watchers_cost_redis_nothing_until_a_request_ends(own_stack):
    server, api, _ = own_stack
    client = server.client()
    client.config_resetstat()
    url = api.url.replace("http://", "ws://") + f"{SINK}?_watch_=true&_window_=5"
    watchers = [websocket.create_connection(url, header=AUTH, timeout=WAIT) for _ in range(IDLE_WATCHERS)]
    try:
        # Each watch reads the sink log as it starts: once before its handshake, once registered for wakes.
        wait_for(lambda: xrange_calls(client) >= 2 * IDLE_WATCHERS, WAIT, "every watch's first reads")
        before = int(client.info("stats")["total_commands_processed"])
        time.sleep(IDLE_SECONDS)  # the window measured, not a wait for something to happen
        spent = int(client.info("stats")["total_commands_processed"]) - before - 1  # less the INFO above
        assert spent < IDLE_WATCHERS, f"{IDLE_WATCHERS} idle watchers made {spent} Redis commands"

        request_id = ended_by_cancel(api)
        for watcher in watchers:  # woken by the request's end, well before their idle wait runs out
            watcher.settimeout(eas_sink.WATCH_IDLE / 3)
            frame = eas_protocol.DataFrameProto.FromString(watcher.recv())
            assert frame.tags["requestId"] == request_id and frame.message == "CANCELED"
    finally:
        for watcher in watchers:
            watcher.close()
