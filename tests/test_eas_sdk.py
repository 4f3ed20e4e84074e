"""The eas-prediction SDK's QueueClient, unchanged, against the running stack: redis-server, the API under
gunicorn's gevent workers, QueueWorker processes and the model server. Every SDK call the README lists
as supported is driven here; the few plain HTTP calls check what the SDK never sends (bad parameters)."""

from __future__ import annotations

import queue
import re
import threading
import warnings
from datetime import UTC, datetime

import pytest
import requests
import websocket
from google.protobuf import descriptor_pb2

with warnings.catch_warnings():  # the SDK's other modules build descriptors the way protobuf 3.20 deprecates
    warnings.simplefilter("ignore", DeprecationWarning)
    from eas_prediction import QueueClient
    from eas_prediction.exception import PredictException
    from eas_prediction.queue_types import queueservice_pb2

import eas_protocol
from tests.conftest import AUTH, ROOT, TOKEN

SERVICE = "svc"
WAIT = 30  # seconds any step may take before the test fails


def client(api, name: str, http_timeout_ms: int = 30_000) -> QueueClient:
    """A QueueClient as a user makes one: `host:port` and the queue's name, a token, init()."""
    made = QueueClient(api.url.removeprefix("http://"), name)
    made.set_token(TOKEN)
    made.set_timeout(http_timeout_ms)  # above every `_timeout_` these tests ask the server to wait
    made.init()
    return made


@pytest.fixture
def inq(api):
    made = client(api, SERVICE)
    yield made
    made.destroy()


@pytest.fixture
def sink(api):
    made = client(api, f"{SERVICE}/sink")
    yield made
    made.destroy()


def ended(api, request_ids: list[str]) -> list[dict]:
    return [api.wait_status(rid, ("SUCCESS", "FAILURE", "CANCELED", "EXPIRED"), WAIT) for rid in request_ids]


def put_all(inq, count: int, **tags: str) -> list[str]:
    return [inq.put(f'{{"n": {n}}}'.encode(), {"echo": "1", "n": str(n), **tags})[1] for n in range(count)]


class Taker:
    """Takes frames off an SDK watcher in a thread, so a test waits for them with a deadline. Takes exactly
    `count` and stops: the SDK's watcher reconnects for ever once its socket is closed."""

    def __init__(self, watcher, count: int) -> None:
        self.frames: queue.Queue = queue.Queue()
        stream = watcher.run()
        self.thread = threading.Thread(target=lambda: [self.frames.put(next(stream)) for _ in range(count)])
        self.thread.daemon = True
        self.thread.start()

    def take(self, count: int) -> list:
        return [self.frames.get(timeout=WAIT) for _ in range(count)]


def test_the_messages_are_the_sdks():
    """eas_protocol builds, from queueservice.proto, exactly the descriptor the SDK's queueservice_pb2 holds."""
    sdks = descriptor_pb2.FileDescriptorProto()
    queueservice_pb2.DESCRIPTOR.CopyToProto(sdks)
    assert eas_protocol.FILE == sdks


def test_put_then_get_by_request_id(api, workers, inq, sink):
    workers.start(1)
    body = b'{"key": "value", "input": [1, 2, 3]}'
    index_text, request_id = inq.put(body, {"echo": "1", "batch": "7"})
    assert index_text == request_id  # the original design: put answers the request id

    frames = sink.get(request_id=request_id, timeout="20s")

    assert len(frames) == 1
    frame = frames[0]
    assert frame.data == body  # the model echoed it: its answer, byte for byte
    assert frame.message == "SUCCESS"
    assert dict(frame.tags) == {"echo": "1", "batch": "7", "requestId": request_id, "lastCode": "200"}
    state = api.state(request_id)
    assert frame.index == state["index"] > 0
    assert state["tags"] == {"echo": "1", "batch": "7"}
    # auto_delete (the SDK's default) took it off the sink queue; the request itself is still there
    assert sink.attributes()["stream.length"] == "0"
    assert sink.get(request_id=request_id, timeout="0s")[0].data == body
    assert api.sink(request_id).status_code == 200


def test_long_poll_returns_the_result_once_there(api, workers, inq, sink):
    """The model takes 1 s; get waits up to 20 s and comes back with the result, not empty."""
    workers.start(1)
    asked = datetime.now(UTC)
    request_id = inq.put(b"{}", {"delay": "1"})[1]

    frames = sink.get(request_id=request_id, timeout="20s")

    assert [f.message for f in frames] == ["SUCCESS"]
    ended_at = datetime.fromisoformat(api.state(request_id)["ended_at"].replace("Z", "+00:00"))
    assert (ended_at - asked).total_seconds() < 20


def test_get_answers_empty_when_not_ended_in_time(api, db, inq, sink):
    request_id = inq.put(b"{}")[1]  # no worker: it stays queued
    assert sink.get(request_id=request_id, timeout="1s") == []
    assert sink.get(index=0, length=5, timeout="1s") == []


def test_get_by_index_commit_delete_truncate(api, workers, inq, sink):
    workers.start(1)
    ids = put_all(inq, 4)
    states = ended(api, ids)
    indexes = sorted(s["index"] for s in states)

    first_two = sink.get(index=0, length=2, auto_delete=False)
    assert [f.index for f in first_two] == indexes[:2]  # from the oldest, in index order
    later = sink.get(index=indexes[1] + 1, length=10, timeout="0s", auto_delete=False)
    assert [f.index for f in later] == indexes[2:]
    by_id = {s["request_id"]: s["index"] for s in states}
    for frame in first_two + later:
        assert frame.index == by_id[frame.tags["requestId"]]
        assert frame.data == f'{{"n": {frame.tags["n"]}}}'.encode()

    sink.commit([indexes[0]])
    assert sink.delete([indexes[1]]) == "OK"
    assert [f.index for f in sink.get(index=0, length=10, auto_delete=False)] == indexes[2:]
    assert sink.truncate(indexes[3]) == b"OK"  # removes every entry below it
    assert sink.attributes()["stream.length"] == "1"
    assert [f.index for f in sink.get(index=0, length=10)] == [indexes[3]]  # auto_delete
    assert sink.attributes()["stream.length"] == "0"
    for request_id in ids:  # out of the sink queue, still readable at the JSON sink
        assert api.sink(request_id).status_code == 200


def test_get_by_index_waits_for_the_next_entry(api, workers, inq, sink):
    workers.start(1)
    first = ended(api, put_all(inq, 1))[0]["index"]
    request_id = inq.put(b"{}", {"delay": "1"})[1]

    frames = sink.get(index=first + 1, length=5, timeout="20s")

    assert [f.tags["requestId"] for f in frames] == [request_id]


def test_failed_and_canceled_requests_reach_the_sink(api, workers, inq, sink):
    canceled = inq.put(b"{}")[1]
    assert api.cancel(canceled).status_code == 200
    workers.start(1)
    failed = inq.put(b"{}", {"status": "400", "answer": "no such input"})[1]

    frames = {f.tags["requestId"]: f for f in (sink.get(request_id=r, timeout="20s")[0] for r in (canceled, failed))}

    assert frames[canceled].message == "CANCELED" and "lastCode" not in frames[canceled].tags
    assert frames[failed].message == "FAILURE" and frames[failed].tags["lastCode"] == "400"
    assert b"no such input" in frames[failed].data


def test_watch_from_the_oldest_then_live_closed_and_resumed(api, workers, inq, sink):
    workers.start(1)
    before = put_all(inq, 2)
    ended(api, before)
    watcher = sink.watch(0, 10, auto_commit=True)
    taker = Taker(watcher, 4)
    old = taker.take(2)
    live = put_all(inq, 2, live="1")
    new = taker.take(2)
    watcher.close()
    assert {f.tags["requestId"] for f in old} == set(before)  # a worker forwards several at once: any order
    assert {f.tags["requestId"] for f in new} == set(live)
    indexes = [f.index for f in old + new]
    assert indexes == sorted(indexes)  # the order they ended in

    away = put_all(inq, 3, away="1")  # they end while no one watches
    ended(api, away)
    assert sink.attributes()["stream.length"] == "3"  # auto_commit removed what was sent, only that
    resumed = client(api, f"{SERVICE}/sink")
    watcher = resumed.watch(indexes[-1] + 1, 10, auto_commit=True)
    again = Taker(watcher, 3).take(3)
    watcher.close()
    assert {f.tags["requestId"] for f in again} == set(away)
    assert [f.index for f in again] == sorted(f.index for f in again) and again[0].index > indexes[-1]
    assert {f.data for f in again} == {f'{{"n": {n}}}'.encode() for n in range(3)}


def test_watch_holds_at_most_window_uncommitted(api, workers, inq, sink):
    workers.start(1)
    ids = put_all(inq, 3)
    api_states = ended(api, ids)
    watcher = sink.watch(0, 2, auto_commit=False)
    taker = Taker(watcher, 3)
    held = taker.take(2)
    assert taker.frames.empty()  # the window is full until one is committed
    sink.commit([held[0].index])
    third = taker.take(1)
    watcher.close()
    assert {f.tags["requestId"] for f in held + third} == set(ids)
    assert [f.index for f in held + third] == sorted(s["index"] for s in api_states)
    assert sink.attributes()["stream.length"] == "2"  # sent but not committed: still in the sink queue


def test_watch_index_only(api, workers, inq, sink):
    workers.start(1)
    ids = put_all(inq, 1)
    ended(api, ids)
    watcher = sink.watch(0, 5, index_only=True, auto_commit=True)
    (frame,) = Taker(watcher, 1).take(1)
    watcher.close()
    assert frame.tags["requestId"] == ids[0] and frame.data == b""


def test_watch_refuses_a_bad_token_before_the_handshake(api):
    url = api.url.replace("http://", "ws://") + f"/api/predict/{SERVICE}/sink?_watch_=true&_window_=1"
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(url, header={"Authorization": "wrong"}, timeout=10)
    assert refused.value.status_code == 403
    with pytest.raises(websocket.WebSocketBadStatusException) as bad:
        websocket.create_connection(url + "&_window_=0", header=AUTH, timeout=10)
    assert bad.value.status_code == 400


def test_attributes(api, workers, inq, sink):
    waiting = put_all(inq, 2) + [inq.put(b"{}", {"_priority_": "1"})[1]]
    requests.post(f"{api.url}/api/predict/other", data=b"{}", headers=AUTH, timeout=10)

    attributes = inq.attributes()

    assert attributes["meta.name"] == SERVICE
    assert attributes["stream.length"] == "3"  # this service's, not `other`'s
    assert attributes["queue.high.length"] == "1" and attributes["queue.default.length"] == "3"
    assert attributes["stream.lastEntry"] == waiting[1]  # the newest waiting request
    assert attributes["meta.maxPayloadBytes"].isdigit() and attributes["stream.approxMaxLength"].isdigit()
    assert attributes["workers.live"] == "0"
    count = requests.get(f"{api.url}/api/predict/{SERVICE}", params={"_count_": "true"}, headers=AUTH, timeout=10)
    assert count.json() == 3

    workers.start(1)
    ended(api, waiting)
    attributes = sink.attributes()
    assert attributes["meta.name"] == f"{SERVICE}/sink"
    assert attributes["stream.length"] == "3"
    assert int(attributes["stream.firstEntry"]) < int(attributes["stream.lastEntry"])
    assert attributes["workers.live"] == "1"


def test_json_frames_and_bad_parameters(api, workers, inq):
    workers.start(1)
    request_id = inq.put(b"hello", {"echo": "1"})[1]
    ended(api, [request_id])
    sink_url = f"{api.url}/api/predict/{SERVICE}/sink"

    listed = requests.get(sink_url, params={"_index_": "0", "_length_": "5"}, headers=AUTH, timeout=10)
    assert listed.status_code == 200
    assert listed.json()[0]["data"] == "aGVsbG8=" and listed.json()[0]["tags"]["requestId"] == request_id

    for params in (
        {"_index_": "x"},
        {"_length_": "0"},
        {"_index_": "0", "_timeout_": "2h"},
        {"_index_": "0", "_auto_delete_": "maybe"},
        {"_index_": "0", "tag": "filter"},
        {"_search_": "true", "_index_": "1"},
    ):
        bad = requests.get(sink_url, params=params, headers=AUTH, timeout=10)
        assert bad.status_code == 400 and "error" in bad.json(), params
    for method, params in (("PUT", {"_indexes_": "a,b"}), ("DELETE", {"_index_": "3"})):
        bad = requests.request(method, sink_url, params=params, headers=AUTH, timeout=10)
        assert bad.status_code == 400 and "error" in bad.json(), (method, params)
    search = requests.get(f"{api.url}/api/predict/{SERVICE}", params={"_search_": "true"}, headers=AUTH, timeout=10)
    assert search.status_code == 400 and "request id" in search.json()["error"]
    with pytest.raises(PredictException) as refused:  # the SDK retries a 400 like any other, then raises it
        inq.delete([1])
    assert refused.value.code == 400


def readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## EAS SDK") : readme.index("## Settings")]
    return re.findall(r"```python\n(.*?)```", section, re.S)[0]


def test_the_readme_example_runs(api, workers, capsys):
    workers.start(1)
    code = readme_example().replace("localhost:5000", api.url.removeprefix("http://")).replace("demo-token", TOKEN)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            exec(compile(code, "README.md (EAS SDK)", "exec"), {})
        except BaseException as error:  # reported by the assertions below
            failures.append(error)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(WAIT)
    assert not runner.is_alive(), "the README's example did not finish"
    assert not failures, failures
    printed = capsys.readouterr().out.splitlines()
    assert " SUCCESS 200 " in printed[0]
    assert printed[-1] == "0 2"  # nothing waits in the input queue; two requests have ended
