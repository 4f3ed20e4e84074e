"""Each service's sink log (sink_log.py) and waiting at the sink: `_timeout_` long-polls, `requestId`,
`_raw_`. Real redis-server, gunicorn with gevent, QueueWorker processes, the model server."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

import keys
import sink_log
from lifecycle import RequestStatus
from notifier import EndedNotifier
from redis_connection import MAX_CONNECTIONS
from tests.conftest import AUTH

API_PROCESSES = 2  # tests.conftest.Api runs gunicorn with two workers


def sink(api, params: dict, timeout: float = 30) -> requests.Response:
    return requests.get(f"{api.url}/api/predict/svc/sink", params=params, headers=AUTH, timeout=timeout)


def test_every_ending_is_appended_in_order_with_its_index(api, workers, db):
    ok = api.submit_ok()
    refused = api.submit_ok(params={"status": "400"})
    expired = api.submit_ok(params={"_ttl_": "0.001"})
    canceled = api.submit_ok(service="other")
    assert api.cancel(canceled, service="other").status_code == 200
    time.sleep(0.01)  # lets `expired` pass its 1 ms deadline: the deadline is what is tested, not a wait
    workers.start()
    for request_id, status in ((ok, "SUCCESS"), (refused, "FAILURE"), (expired, "EXPIRED")):
        api.wait_status(request_id, status)
    entries = sink_log.read(db, "svc", 0, 10)
    assert {(e.request_id, e.status) for e in entries} == {
        (ok, RequestStatus.SUCCESS),
        (refused, RequestStatus.FAILURE),
        (expired, RequestStatus.EXPIRED),
    }
    assert [e.index for e in entries] == [1, 2, 3]  # one more per ended request, in the order they ended
    assert [(e.request_id, e.status) for e in sink_log.read(db, "other", 0, 10)] == [(canceled, RequestStatus.CANCELED)]
    for entry in entries:
        assert api.state(entry.request_id)["index"] == entry.index  # the JSON sink shows it
    assert sink_log.last_index(db, "svc") == 3 and sink_log.length(db, "svc") == 3


def test_removing_entries_leaves_the_requests_readable(api, workers, db):
    ids = [api.submit_ok() for _ in range(5)]
    workers.start()
    for request_id in ids:
        api.wait_status(request_id, "SUCCESS")
    assert sink_log.delete(db, "svc", [2, 4, 99]) == 2
    assert [e.index for e in sink_log.read(db, "svc", 0, 10)] == [1, 3, 5]
    assert sink_log.truncate(db, "svc", 4) == 2  # removes 1 and 3
    assert [e.index for e in sink_log.read(db, "svc", 0, 10)] == [5]
    assert [e.index for e in sink_log.read(db, "svc", 5, 10)] == [5]
    assert all(api.state(i)["status"] == "SUCCESS" for i in ids)  # until result_ttl


def test_entries_older_than_result_ttl_are_trimmed(api, workers, db):
    ids = [api.submit_ok() for _ in range(3)]
    workers.start()
    for request_id in ids:
        api.wait_status(request_id, "SUCCESS")
    newest = sink_log.read(db, "svc", 3, 1)[0]
    older = [e for e in sink_log.read(db, "svc", 0, 10) if e.ended_at < newest.ended_at]
    assert sink_log.trim_expired(db, older_than=newest.ended_at) == len(older)
    left = sink_log.read(db, "svc", 0, 10)
    assert newest in left and all(e.ended_at >= newest.ended_at for e in left)


def test_a_long_poll_answers_when_the_request_ends(api, workers, db):
    request_id = api.submit_ok(params={"delay": "1"})
    workers.start()
    began = time.monotonic()
    answer = sink(api, {"requestId": request_id, "_timeout_": "20s"})
    assert answer.status_code == 200
    assert answer.json()["status"] == "SUCCESS"
    assert time.monotonic() - began < 20  # answered when it ended, not when the wait ran out


def test_a_long_poll_that_runs_out_answers_202(api, workers, db):
    request_id = api.submit_ok(params={"delay": "5"})
    workers.start()
    answer = sink(api, {"request_id": request_id, "_timeout_": "500ms"})
    assert answer.status_code == 202
    assert answer.json()["status"] in ("PENDING", "STARTED")


def test_bad_waits_are_refused(api, db):
    request_id = api.submit_ok()
    for bad in ("61", "5h", "-1", "soon", "1e3", "\u0661\u0662"):
        answer = sink(api, {"request_id": request_id, "_timeout_": bad})
        assert answer.status_code == 400, bad
        assert "_timeout_" in answer.json()["error"]
    for bad in ("yes", "truee", "2"):  # true/1/false/0 in any case are flags (test_sink.py)
        answer = sink(api, {"request_id": request_id, "_raw_": bad})
        assert answer.status_code == 400 and "_raw_" in answer.json()["error"]
    for method in (requests.delete,):  # cancel takes no waiting
        answer = method(
            f"{api.url}/api/predict/svc/sink", params={"request_id": request_id, "_timeout_": "1"}, headers=AUTH
        )
        assert answer.status_code == 400


def test_many_long_polls_share_the_processes_redis_connections(api, workers, db):
    """More waiting clients than the API's processes may open Redis connections (redis_connection.py):
    each waits on its process's one subscription, and the Redis calls take turns on a bounded pool."""
    polls_count = 150
    request_id = api.submit_ok(params={"delay": "3"})
    before = db.info("clients")["connected_clients"]
    with ThreadPoolExecutor(polls_count) as pool:
        polls = [pool.submit(sink, api, {"request_id": request_id, "_timeout_": "30"}) for _ in range(polls_count)]
        workers.start()
        answers = [poll.result() for poll in polls]
        during = db.info("clients")["connected_clients"]
    assert all(a.status_code == 200 and a.json()["status"] == "SUCCESS" for a in answers)
    bound = API_PROCESSES * (MAX_CONNECTIONS + 1)  # a pool and a subscription per process
    assert during - before <= bound + 2 < polls_count  # (+2: the worker's own)


@pytest.mark.parametrize(
    "params, code, content_type, body",
    [
        ({"answer": "plain words", "content_type": "text/plain; charset=utf-8", "status": "201"}, 201,
         "text/plain; charset=utf-8", b"plain words"),
        ({"answer": '{"labels": ["cat"]}'}, 200, "application/json", b'{"labels":["cat"]}'),
    ],
)  # fmt: skip
def test_raw_answers_with_the_models_own_status_type_and_body(api, workers, db, params, code, content_type, body):
    request_id = api.submit_ok(params={**params, "delay": "1"})
    early = sink(api, {"request_id": request_id, "_raw_": "true"})
    assert (early.status_code, early.content) == (202, b"")
    workers.start()
    answer = sink(api, {"request_id": request_id, "_raw_": "true", "_timeout_": "20"})
    assert (answer.status_code, answer.headers["Content-Type"], answer.content) == (code, content_type, body)
    assert answer.headers["X-Eas-Queueservice-Status"] == "SUCCESS"


def test_the_sink_log_is_keyed_per_service(db):
    assert keys.sink_log_key("svc") == "eas:sink:svc"


def test_a_raw_answer_never_runs_as_a_page_on_the_apis_origin(api, workers, db):
    """A probe had the model answer text/html (or no type, which Flask serves as text/html) and `_raw_=true`
    served it as a live page on the origin of /rq. Now it is sandboxed and never sniffed."""
    page = api.submit_ok(params={"answer": "<script>document.title='x'</script>", "content_type": "text/html"})
    untyped = api.submit_ok(params={"echo": "1"}, body=b"<script>1</script>", headers={"Content-Type": ""})
    workers.start()
    for request_id in (page, untyped):
        api.wait_status(request_id, "SUCCESS")
        answer = sink(api, {"request_id": request_id, "_raw_": "true"})
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
    assert sink(api, {"request_id": untyped, "_raw_": "true"}).headers["Content-Type"] == "application/octet-stream"


def test_a_garbled_notification_does_not_stop_the_waking_of_clients(api, workers, db):
    """The subscriber thread of each API process must outlive anything published on eas:ended."""
    for _ in range(4):  # each API process gets them
        db.publish("eas:ended", b"\xff\xfe not a notification")
    request_id = api.submit_ok(params={"delay": "1"})
    workers.start()
    answer = sink(api, {"request_id": request_id, "_timeout_": "20"})
    assert answer.status_code == 200 and answer.json()["status"] == "SUCCESS"


def test_one_notification_wakes_the_clients_of_every_request_it_names(redis_server):
    """A worker publishes a batch's ended requests in one message, a line each (lua/record_outcomes.lua)."""
    notifier = EndedNotifier(lambda: redis.Redis.from_url(redis_server.url))
    by_request, by_service, bystander = threading.Event(), threading.Event(), threading.Event()
    notifier._waiters = {"request:r1": {by_request}, "service:other": {by_service}, "request:r9": {bystander}}
    notifier._relay({"data": b"svc 1 r1\nother 2 r2"})
    assert by_request.is_set() and by_service.is_set() and not bystander.is_set()
