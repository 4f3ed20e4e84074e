"""Results pushed to the client: Server-Sent Events on the sink, and `Prefer: wait` on submit. Against the
running stack: gunicorn with gevent, QueueWorker processes, the model server."""

import json
import socket

import pytest
import requests

from tests.conftest import AUTH, TOKEN, Api, RedisServer, Workers, service_env, wait_for

STREAM_HEADERS = {**AUTH, "Accept": "text/event-stream"}


@pytest.fixture
def small_api(redis_server, model, db):
    """One API process holding at most 3 waiting clients: which process takes a connection is then known."""
    started = Api(service_env(redis_server.url, model.url, max_waiting_clients=3), args=("--workers", "1"))
    yield started
    started.stop()


def waiting_clients(api) -> float:
    """The API's own gauge of clients waiting now (GET /metrics)."""
    text = requests.get(f"{api.url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("eas_queue_waiting_clients"))


def sink(api, params: dict) -> requests.Response:
    return requests.get(f"{api.url}/api/predict/svc/sink", params=params, headers=AUTH, timeout=30)


class EventStream:
    """A client of the sink's event stream, reading `id:`/`data:` events and `:` comments."""

    def __init__(self, api, headers: dict | None = None, params: dict | None = None) -> None:
        self.response = requests.get(
            f"{api.url}/api/predict/svc/sink",
            params={"_watch_": "true", **(params or {})},
            headers={**STREAM_HEADERS, **(headers or {})},
            stream=True,
            timeout=30,
        )
        self.lines = self.response.iter_lines(decode_unicode=True)
        self.comments = 0

    def next_event(self) -> dict:
        event: dict = {}
        for line in self.lines:
            if line.startswith(":"):
                self.comments += 1
            elif line.startswith("id: "):
                event["id"] = int(line[4:])
            elif line.startswith("data: "):
                event["data"] = json.loads(line[6:])
            elif not line and event:
                return event
        raise AssertionError("the stream ended")

    def close(self) -> None:
        self.response.close()


def test_events_stream_as_requests_end_and_a_reconnect_misses_nothing(api, workers, db):
    stream = EventStream(api)
    assert stream.response.status_code == 200
    assert stream.response.headers["Content-Type"].startswith("text/event-stream")
    first = [api.submit_ok(params={"n": str(n)}) for n in range(3)]
    workers.start()
    seen = [stream.next_event() for _ in first]
    assert sorted(e["data"]["request_id"] for e in seen) == sorted(first)
    assert all(e["data"]["status"] == "SUCCESS" and e["data"]["index"] == e["id"] for e in seen)
    assert [e["id"] for e in seen] == sorted(e["id"] for e in seen)
    stream.close()

    # While no one listens, more requests end.
    missed = [api.submit_ok(params={"status": "400"}) for _ in range(2)] + [api.submit_ok()]
    for request_id in missed:
        api.wait_status(request_id, ("SUCCESS", "FAILURE"))
    resumed = EventStream(api, headers={"Last-Event-ID": str(seen[-1]["id"])})
    caught_up = [resumed.next_event() for _ in missed]
    assert sorted(e["data"]["request_id"] for e in caught_up) == sorted(missed)
    assert [e["id"] for e in caught_up] == [seen[-1]["id"] + 1, seen[-1]["id"] + 2, seen[-1]["id"] + 3]
    live = api.submit_ok()
    assert resumed.next_event()["data"]["request_id"] == live  # then live ones
    resumed.close()


def test_a_stream_can_start_at_an_index_and_refuses_bad_ones(api, workers, db):
    ids = [api.submit_ok() for _ in range(3)]
    workers.start()
    for request_id in ids:
        api.wait_status(request_id, "SUCCESS")
    stream = EventStream(api, params={"_index_": "2"})
    assert [stream.next_event()["id"] for _ in range(2)] == [2, 3]
    stream.close()
    for params, headers in (({"_index_": "x"}, {}), ({}, {"Last-Event-ID": "-1"}), ({"_index_": "1", "n": "1"}, {})):
        refused = requests.get(
            f"{api.url}/api/predict/svc/sink",
            params={"_watch_": "true", **params},
            headers={**STREAM_HEADERS, **headers},
            timeout=10,
        )
        assert refused.status_code == 400, (params, headers)
        assert "error" in refused.json()
    no_accept = requests.get(f"{api.url}/api/predict/svc/sink", params={"_watch_": "true"}, headers=AUTH, timeout=10)
    assert no_accept.status_code == 400
    wrong_token = requests.get(
        f"{api.url}/api/predict/svc/sink",
        params={"_watch_": "true"},
        headers={"Authorization": "nope", "Accept": "text/event-stream"},
        timeout=10,
    )
    assert wrong_token.status_code == 403


def test_an_idle_stream_gets_keep_alive_comments(api, db):
    """Read raw from the socket: the first comment comes at once, the next after events.KEEPALIVE (15 s)."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=40) as client:
        client.sendall(
            b"GET /api/predict/svc/sink?_watch_=true HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: {TOKEN}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        received = b""
        while b": keep-alive" not in received:
            chunk = client.recv(4096)
            assert chunk, received
            received += chunk
    assert b"200 OK" in received and b": keep-alive" in received


def test_prefer_wait_answers_the_record_for_a_fast_model_and_202_for_a_slow_one(api, workers, db):
    workers.start()
    fast = requests.post(f"{api.url}/api/predict/svc", data=b"{}", headers={**AUTH, "Prefer": "wait=20"}, timeout=30)
    assert fast.status_code == 200
    assert fast.headers["Preference-Applied"] == "wait=20"
    assert fast.json()["status"] == "SUCCESS"
    assert fast.headers["X-Eas-Queueservice-Request-Id"] == fast.json()["request_id"]
    slow = requests.post(
        f"{api.url}/api/predict/svc",
        params={"delay": "3"},
        data=b"{}",
        headers={**AUTH, "Prefer": "respond-async, wait=1"},
        timeout=30,
    )
    assert slow.status_code == 202
    assert slow.text == slow.headers["X-Eas-Queueservice-Request-Id"]  # the request id, as without the header
    assert api.state(slow.text)["status"] in ("PENDING", "STARTED")  # answered before the model did
    assert api.wait_status(slow.text, "SUCCESS")["status"] == "SUCCESS"
    plain = requests.post(f"{api.url}/api/predict/svc", data=b"{}", headers=AUTH, timeout=30)
    assert plain.status_code == 200 and "Preference-Applied" not in plain.headers


IGNORED_WAITS = ("wait=1e3", "wait=1.5", "wait=-1", "wait=+5", "wait=10s", "wait=0x10", "wait=", 'wait="1e3"')
IGNORED_WAITS += ("wait=1 2", "wait=\u00b2", "respond-async; wait=1", "nowait=5", "wait=0", "wait=1e3, wait=20")
APPLIED_WAITS = {'wait="20"': 20, "WAIT = 20": 20, "respond-async, wait=20": 20, 'foo="a, wait=1", wait=20': 20}
APPLIED_WAITS |= {"wait=20, wait=1": 20, "wait=99999999999999": 60}
# A probe: `wait=0000000` waited 60 s (seven digits read as "long"), and 8 KB of `"a\` held a worker 0.8 s
# in a backtracking regex (now one pass over the header).
IGNORED_WAITS += ("wait=0000000", '"a\\' * 2700)
APPLIED_WAITS |= {"wait=00000020": 20}


def test_a_malformed_prefer_wait_is_ignored_and_a_wellformed_one_is_read_whole(api, workers, db):
    """`wait=1e3` was read as 1 second (the parser took the leading digits): now only delta-seconds (RFC 7240:
    ASCII digits, quoted or not) is a wait; anything else is ignored, and the submit answers as without it.
    A `wait` that is a parameter of another preference (after `;`) is not the wait preference; the first
    `wait` counts."""
    workers.start()
    submit = f"{api.url}/api/predict/svc"
    for prefer in IGNORED_WAITS:
        answer = requests.post(submit, data=b"{}", headers={**AUTH, "Prefer": prefer}, timeout=30)
        assert answer.status_code == 200, (prefer, answer.text)
        assert "Preference-Applied" not in answer.headers, (prefer, answer.headers["Preference-Applied"])
        assert answer.headers["Content-Type"].startswith("text/plain"), prefer
        assert answer.text == answer.headers["X-Eas-Queueservice-Request-Id"], prefer
    for prefer, applied in APPLIED_WAITS.items():
        answer = requests.post(submit, data=b"{}", headers={**AUTH, "Prefer": prefer}, timeout=90)
        assert answer.headers.get("Preference-Applied") == f"wait={applied}", prefer
        assert answer.status_code == 200 and answer.json()["status"] == "SUCCESS", prefer


def test_waiting_clients_beyond_the_limit_get_503_and_the_api_still_answers(small_api, db):
    """A probe's 2,000 event streams took every connection of the API and /healthz stopped answering: each
    process now holds at most `max_waiting_clients` (long-polls, streams, Prefer: wait) and refuses more."""
    api = small_api
    request_id = api.submit_ok(params={"delay": "30"})  # no worker: it stays PENDING
    held = [EventStream(api) for _ in range(3)]
    assert all(stream.response.status_code == 200 for stream in held)
    refused = EventStream(api).response
    assert refused.status_code == 503
    assert "waiting clients" in refused.json()["error"] and refused.headers["Retry-After"] == "1"
    # Whichever process is full refuses every kind of waiting client before doing anything else: a
    # `Prefer: wait` submit queues nothing, an EAS SDK long-poll gets no frames.
    queued = db.llen("rq:queue:default")
    waiting = [
        lambda: requests.post(
            f"{api.url}/api/predict/svc", data=b"{}", headers={**AUTH, "Prefer": "wait=1"}, timeout=30
        ),
        lambda: sink(api, {"_index_": "0", "_length_": "1", "_timeout_": "1s", "_raw_": "false"}),
    ]
    for attempt in waiting:
        answer = attempt()
        assert answer.status_code == 503, answer.text
        assert db.llen("rq:queue:default") == queued  # the refused submit queued nothing
    assert requests.get(api.url + "/healthz", timeout=5).status_code == 200
    assert api.submit().status_code == 200  # submits are not waiting clients
    for stream in held:
        stream.close()
    wait_for(lambda: sink(api, {"request_id": request_id, "_timeout_": "0.1"}).status_code == 202, 10, "a place")


def test_a_stream_survives_a_redis_restart(tmp_path, model):
    server = RedisServer(tmp_path / "redis", appendfsync="always").start()
    env = service_env(server.url, model.url)
    api = Api(env)
    pool = Workers(env, server.url)
    try:
        pool.start()
        stream = EventStream(api)
        before = api.submit_ok()
        assert stream.next_event()["data"]["request_id"] == before
        server.kill()
        assert ": waiting for Redis" in next(line for line in stream.lines if "Redis" in line)
        server = RedisServer(server.directory, appendfsync="always", port=server.port).start()
        after = api.submit_ok()
        assert stream.next_event()["data"]["request_id"] == after  # the same stream goes on
        stream.close()
    finally:
        pool.stop_all()
        api.stop()
        server.kill()


@pytest.mark.parametrize(
    "params, headers",
    [
        ({"_watch_": "false"}, {}),
        ({"_watch_": "true", "_index_": ["1", "abc"]}, {}),
        ({"_watch_": "true", "_index_": "\u00b2"}, {}),
        ({"_watch_": "true", "_index_": "\u0661\u0662"}, {}),
        ({"_watch_": "true", "_index_": "1" * 20}, {}),
        ({"_watch_": "true"}, {"Last-Event-ID": "\u00b2".encode().decode("latin-1")}),
        ({"_watch_": "true"}, {"Accept": "text/event-streamXXX"}),
    ],
)
def test_loose_stream_parameters_are_refused(api, db, params, headers):
    answer = requests.get(
        f"{api.url}/api/predict/svc/sink", params=params, headers={**STREAM_HEADERS, **headers}, timeout=10
    )
    assert answer.status_code == 400, (params, headers)
    assert "error" in answer.json()


def test_configured_service_names_are_not_told_to_clients_without_a_token(make_api, db):
    api = make_api(toml='[services.private]\ntokens = ["private-token"]\n')
    answer = requests.get(f"{api.url}/api/predict/PRIVATE/sink", timeout=10)
    assert answer.status_code == 401
    assert "private" not in answer.text.lower()


def test_websocket_watches_count_as_waiting_clients(small_api, db):
    import websocket  # websocket-client, as the eas-prediction SDK's watch uses it

    api = small_api
    url = f"ws://127.0.0.1:{api.port}/api/predict/svc/sink?_watch_=true&_window_=1"
    held = [websocket.create_connection(url, header=[f"Authorization: {TOKEN}"], timeout=10) for _ in range(3)]
    try:
        websocket.create_connection(url, header=[f"Authorization: {TOKEN}"], timeout=10)
        raise AssertionError("a fourth watch was let in")
    except websocket.WebSocketBadStatusException as refused:
        assert refused.status_code == 503
    for connection in held:
        connection.close()

    def admitted() -> bool:
        stream = EventStream(api)
        stream.close()
        return stream.response.status_code == 200

    wait_for(admitted, 20, "the watches' places to be given back")


def test_a_long_poll_whose_client_went_away_gives_its_place_back_at_once(small_api, db):
    """A probe aborted 2,000 long-polls and the API stayed full until each one's `_timeout_` ran out."""
    api = small_api
    request_id = api.submit_ok()  # no worker: it stays PENDING
    aborted = []
    for _ in range(3):
        client = socket.create_connection(("127.0.0.1", api.port), timeout=10)
        client.sendall(
            f"GET /api/predict/svc/sink?request_id={request_id}&_timeout_=60 HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {TOKEN}\r\n\r\n".encode()
        )
        aborted.append(client)
    wait_for(lambda: waiting_clients(api) == 3, 10, "the three long-polls to wait")
    assert sink(api, {"request_id": request_id, "_timeout_": "0.1"}).status_code == 503  # full
    for client in aborted:
        client.close()  # each waits 60 s unless the server notices
    wait_for(
        lambda: all(sink(api, {"request_id": request_id, "_timeout_": "0.1"}).status_code == 202 for _ in range(3)),
        10,
        "the places of the aborted long-polls to be given back",
    )
