"""Results pushed to the client: Server-Sent Events on the sink, and `Prefer: wait` on submit. Against the
running stack: gunicorn with gevent, QueueWorker processes, the model server."""

import json
import socket

import requests

from tests.conftest import AUTH, TOKEN

STREAM_HEADERS = {**AUTH, "Accept": "text/event-stream"}


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
        params={"delay": "5"},
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
