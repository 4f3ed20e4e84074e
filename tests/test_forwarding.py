"""Workers forward each request to the model: body byte for byte, retries, and the answer as the result."""

import base64
import json
import subprocess

from rq.job import Job

from tests.conftest import BIN, ROOT


def test_the_request_reaches_the_model_as_it_was_sent(api, workers, model, db):
    body = bytes(range(256)) * 8 + b"\x00\xff"
    request_id = api.submit_ok(
        "img-svc",
        body=body,
        subpath="v2/detect",
        headers={"Content-Type": "application/x-tensor"},
        params={"tag": "x y", "n": ["1", "2"], "_priority_": "1"},
    )
    workers.start()
    api.wait_status(request_id, "SUCCESS", service="img-svc")
    [seen] = model.requests_for(request_id)
    assert seen.path == "/api/predict/img-svc/v2/detect"
    assert seen.body == body
    assert seen.headers["Content-Type"] == "application/x-tensor"
    assert seen.headers["X-Eas-Queueservice-Request-Id"] == request_id
    assert seen.query == {"tag": ["x y"], "n": ["1", "2"]}  # reserved parameters stay with the queue
    assert "Authorization" not in seen.headers  # the client's token never leaves the queue


def test_http_connections_are_reused_across_jobs(api, workers, model, db):
    workers.start(env={"EAS_QUEUE_WORKER_CONCURRENCY": "2"})
    ids = [api.submit_ok() for _ in range(30)]
    for request_id in ids:
        api.wait_status(request_id, "SUCCESS")
    connections = {r.client for r in model.received}
    assert len(model.received) == 30
    assert len(connections) <= 2


def test_retry_then_success(api, workers, model, db):
    request_id = api.submit_ok(params={"fail_first": "2"})
    workers.start()
    state = api.wait_status(request_id, "SUCCESS")
    assert state["attempts"] == 3
    assert len(model.requests_for(request_id)) == 3
    assert state["result"]["body"]["attempt"] == 3


def test_429_is_retried_too(api, workers, model, db):
    request_id = api.submit_ok(params={"fail_first": "1", "fail_status": "429"})
    workers.start()
    assert api.wait_status(request_id, "SUCCESS")["attempts"] == 2


def test_a_4xx_answer_is_final_at_once(api, workers, model, db):
    request_id = api.submit_ok(params={"status": "400", "answer": "bad input: shape (3,) expected (4,)"})
    workers.start()
    state = api.wait_status(request_id, "FAILURE")
    assert state["attempts"] == 1
    assert state["error_info"] == "the model answered HTTP 400: bad input: shape (3,) expected (4,)"
    assert len(model.requests_for(request_id)) == 1


def test_retries_exhausted_end_in_failure_saying_why(api, workers, model, db):
    request_id = api.submit_ok(params={"status": "503"})
    workers.start()
    state = api.wait_status(request_id, "FAILURE", timeout=60)
    assert state["attempts"] == 4  # the first attempt and 3 retries (retry_intervals = 1,1,1)
    assert state["error_info"].startswith('the model answered HTTP 503: {"request_id": "')
    assert len(model.requests_for(request_id)) == 4
    assert Job.fetch(request_id, connection=db).get_status() == "failed"
    assert request_id in [i.decode() for i in db.zrange("rq:failed:default", 0, -1)]


def test_waiting_for_a_retry_is_reported_with_the_next_attempt(make_api, workers, model, db):
    api = make_api(retry_intervals="3")
    request_id = api.submit_ok(params={"fail_first": "1"})
    workers.start()
    state = api.wait_status(request_id, "RETRY")
    assert api.sink(request_id).status_code == 202
    assert state["attempts"] == 1
    assert state["next_attempt"] == 2
    assert state["retry_at"] > state["ended_at"][:19]
    assert state["last_error"].startswith("the model answered HTTP 503")
    assert api.wait_status(request_id, "SUCCESS")["attempts"] == 2


def test_an_unreachable_model_is_retried_then_fails_saying_why(make_api, workers, db):
    toml = '[services.gone]\ntarget_api_base_url = "http://127.0.0.1:9"\n'
    api = make_api(toml=toml, retry_intervals="1")  # the retry policy travels with the request
    request_id = api.submit_ok("gone")
    workers.start(env={"EAS_QUEUE_SETTINGS": api.env["EAS_QUEUE_SETTINGS"]})
    state = api.wait_status(request_id, "FAILURE", service="gone")
    assert state["attempts"] == 2
    assert state["error_info"].startswith("could not reach the model: NewConnectionError")


def test_a_slow_model_times_out_and_is_retried(make_api, workers, model, db):
    api = make_api(retry_intervals="1")
    request_id = api.submit_ok(params={"delay": "2"})
    workers.start(env={"EAS_QUEUE_FORWARD_TIMEOUT": "0.5"})
    state = api.wait_status(request_id, "FAILURE")
    assert state["attempts"] == 2
    assert state["error_info"] == "the model did not answer within 0.5s"


def test_answers_are_stored_as_json_text_or_base64(api, workers, model, db):
    as_json = api.submit_ok(params={"answer": '{"labels": ["cat"]}'})
    as_text = api.submit_ok(params={"answer": "plain words", "content_type": "text/plain; charset=utf-8"})
    binary = bytes([0, 159, 146, 150, 255])
    as_bytes = api.submit_ok(params={"echo": "1"}, body=binary, headers={"Content-Type": "image/png"})
    redirect = api.submit_ok(params={"status": "302", "answer": "moved", "content_type": "text/plain"})
    workers.start()
    result = api.wait_status(as_json, "SUCCESS")["result"]
    assert (result["body"], result["body_encoding"]) == ({"labels": ["cat"]}, "json")
    assert result["target_status_code"] == 200
    result = api.wait_status(as_text, "SUCCESS")["result"]
    assert (result["body"], result["body_encoding"], result["content_type"]) == (
        "plain words",
        "text",
        "text/plain; charset=utf-8",
    )
    result = api.wait_status(as_bytes, "SUCCESS")["result"]
    assert result["body_encoding"] == "base64"
    assert base64.b64decode(result["body"]) == binary
    result = api.wait_status(redirect, "SUCCESS")["result"]
    assert (result["target_status_code"], result["body"]) == (302, "moved")  # redirects are not followed


def test_plain_rq_worker_works_too(api, workers, model, db):
    """`rq worker high default`, the stock forking worker, runs the same job function."""
    ok = api.submit_ok(params={"echo": "1"}, body=b'{"a": 1}')
    final = api.submit_ok(params={"status": "404"})
    retried = api.submit_ok(params={"fail_first": "1"})
    workers.start(plain=True, args=("--with-scheduler",))
    state = api.wait_status(ok, "SUCCESS")
    assert state["result"]["body"] == {"a": 1}
    assert state["attempts"] == 1
    state = api.wait_status(final, "FAILURE")
    assert state["attempts"] == 1
    assert state["error_info"].startswith("the model answered HTTP 404")
    assert api.wait_status(retried, "SUCCESS", timeout=30)["attempts"] == 2


def test_a_job_result_is_readable_with_rq(api, workers, db):
    request_id = api.submit_ok(params={"answer": json.dumps({"k": 1})})
    workers.start()
    api.wait_status(request_id, "SUCCESS")
    job = Job.fetch(request_id, connection=db)
    assert job.get_status() == "finished"
    assert job.return_value()["body"] == {"k": 1}
    assert 0 < db.ttl(job.key) <= 86400


def test_the_documented_worker_command_reads_redis_from_the_settings(api, workers, db):
    """`rq worker --worker-class worker.QueueWorker --config worker high default`, no --url: RQ takes
    REDIS_URL from worker.py, which has it from the settings."""
    command = [
        str(BIN / "rq"),
        "worker",
        "--worker-class",
        "worker.QueueWorker",
        "--config",
        "worker",
        "high",
        "default",
    ]
    workers.processes.append(subprocess.Popen(command, cwd=ROOT, env=workers.env, start_new_session=True))
    request_id = api.submit_ok()
    assert api.wait_status(request_id, "SUCCESS")["attempts"] == 1
