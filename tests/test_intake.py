"""Intake rules that keep clients safe: idempotent retries, a hard queue cap, queue expiry, cancel,
and failed requests kept as dead letters that an operator can requeue."""

from concurrent.futures import ThreadPoolExecutor

import requests

from tests.conftest import TOKEN, wait_for


def jobs(db):
    return len(db.keys("rq:job:*"))


def test_the_same_idempotency_key_answers_the_same_request_id(api, workers, model, db):
    key = {"Idempotency-Key": "order-42"}
    first = api.submit_ok(body=b'{"n": 1}', headers=key)
    again = api.submit(body=b'{"n": 1}', headers=key)
    assert again.status_code == 200
    assert again.text == first and again.headers["X-Eas-Queueservice-Request-Id"] == first
    assert jobs(db) == 1
    other_service = api.submit_ok("other-svc", body=b'{"n": 1}', headers=key)
    assert other_service != first  # keys are per service
    workers.start()
    api.wait_status(first, "SUCCESS")
    assert api.submit(body=b'{"n": 1}', headers=key).text == first  # still the same after it ran
    assert model.ids().count(first) == 1


def test_the_same_idempotency_key_with_another_body_is_422(api, db):
    key = {"Idempotency-Key": "abc"}
    api.submit_ok(body=b"one", headers=key)
    for changed in (
        {"body": b"two"},
        {"body": b"one", "params": {"_priority_": "1"}},
        {"body": b"one", "subpath": "x"},
    ):
        response = api.submit(headers=key, **changed)
        assert response.status_code == 422, changed
        assert response.json() == {"error": "this Idempotency-Key was already used for a different request"}
    assert jobs(db) == 1
    for bad in ("", "x" * 256, "caf\u00e9"):
        response = requests.post(
            api.url + "/api/predict/svc",
            data=b"1",
            timeout=5,
            headers={"Authorization": TOKEN, "Idempotency-Key": bad.encode("utf-8")},
        )
        assert response.status_code == 400, bad
    assert jobs(db) == 1


def test_concurrent_retries_with_one_key_make_one_job(api, db):
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: api.submit(body=b"same", headers={"Idempotency-Key": "k"}), range(32)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.text for a in answers}) == 1
    assert jobs(db) == 1


def test_the_queue_cap_holds_under_32_concurrent_submitters(make_api, db):
    api = make_api(max_queue_length=50)
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda n: api.submit(body=str(n).encode()), range(400)))
    codes = [a.status_code for a in answers]
    assert codes.count(200) == 50
    assert codes.count(429) == 350
    assert db.llen("rq:queue:default") == 50
    assert jobs(db) == 50
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["Retry-After"] and "queue is full" in refused.json()["error"]


def test_a_request_not_started_within_its_ttl_expires_unforwarded(api, workers, model, db):
    short = api.submit_ok(params={"_ttl_": "1"})
    long = api.submit_ok(params={"_ttl_": "600"})
    for bad in ("0", "-1", "soon", "nan", "inf"):
        assert api.submit(params={"_ttl_": bad}).status_code == 400, bad
    api.wait_status(short, "EXPIRED", timeout=10)  # once its deadline passes, even with no worker
    assert api.sink(short).status_code == 200
    workers.start()
    api.wait_status(long, "SUCCESS")
    assert api.wait_status(short, "EXPIRED")["attempts"] == 0
    assert model.requests_for(short) == []
    assert db.zscore("rq:canceled:default", short) is not None


def test_queue_ttl_setting_and_ttl_parameter_can_only_shorten_it(make_api, workers, model, db):
    api = make_api(queue_ttl="1")
    capped = api.submit_ok(params={"_ttl_": "600"})  # asks for longer: the setting still wins
    api.wait_status(capped, "EXPIRED", timeout=10)
    workers.start()
    assert api.wait_status(capped, "EXPIRED")["status"] == "EXPIRED"
    fresh = api.submit_ok()
    api.wait_status(fresh, "SUCCESS")
    assert model.requests_for(capped) == []


def test_cancel_a_queued_request(api, workers, model, db):
    request_id = api.submit_ok()
    keep = api.submit_ok()
    canceled = api.cancel(request_id)
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "CANCELED"
    assert [i.decode() for i in db.lrange("rq:queue:default", 0, -1)] == [keep]
    workers.start()
    api.wait_status(keep, "SUCCESS")
    assert api.state(request_id)["status"] == "CANCELED"
    assert model.requests_for(request_id) == []
    again = api.cancel(request_id)
    assert again.status_code == 409


def test_cancel_a_request_waiting_for_its_retry(make_api, workers, model, db):
    api = make_api(retry_intervals="4")
    request_id = api.submit_ok(params={"fail_first": "1"})
    workers.start()
    api.wait_status(request_id, "RETRY")
    response = api.cancel(request_id)
    assert response.status_code == 200
    assert response.json()["status"] == "CANCELED"
    assert db.zcard("rq:scheduled:default") == 0
    later = api.submit_ok(params={"delay": "4.5"})  # outlives the retry time the canceled request had
    api.wait_status(later, "SUCCESS", timeout=30)
    assert len(model.requests_for(request_id)) == 1  # never forwarded again
    assert api.state(request_id)["status"] == "CANCELED"


def test_cancel_refuses_running_finished_and_unknown_requests(api, workers, db):
    running = api.submit_ok(params={"delay": "2"})
    workers.start()
    api.wait_status(running, "STARTED")
    refused = api.cancel(running)
    assert refused.status_code == 409
    assert refused.json()["status"] == "STARTED"
    assert api.wait_status(running, "SUCCESS")["status"] == "SUCCESS"
    assert api.cancel(running).status_code == 409
    assert api.cancel("00000000-0000-4000-8000-000000000000").status_code == 404
    assert api.cancel(running, service="another").status_code == 404
    assert api.cancel("nope").status_code == 400


def test_failed_requests_are_dead_letters_that_can_be_requeued_from_the_dashboard(api, workers, model, db):
    request_id = api.submit_ok(params={"fail_first": "1", "fail_status": "400"})
    workers.start()
    failed = api.wait_status(request_id, "FAILURE")
    assert "HTTP 400" in failed["error_info"]
    assert 0 < db.ttl(f"rq:job:{request_id}") <= 604800  # kept for failure_ttl
    failed_list = requests.get(
        f"{api.url}/rq/0/data/jobs/default/failed/8/asc/1.json", auth=("ops", TOKEN), timeout=5
    ).json()
    assert [job["id"] for job in failed_list["jobs"]] == [request_id]
    requeued = requests.post(
        f"{api.url}/rq/job/{request_id}/requeue", auth=("ops", TOKEN), timeout=5, headers={"Origin": api.url}
    )  # what the dashboard's own page sends
    assert requeued.status_code == 200 and requeued.json() == {"status": "OK"}
    state = api.wait_status(request_id, "SUCCESS")
    assert state["attempts"] == 2
    assert len(model.requests_for(request_id)) == 2
    wait_for(lambda: db.zcard("rq:failed:default") == 0, what="the failed registry to forget it")
