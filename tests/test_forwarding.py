"""Workers forward each request to the model: body, query and Content-Encoding byte for byte, retries, the
answer as the result, capped at max_result_bytes, and each attempt within forward_timeout."""

import asyncio
import base64
import gzip
import http.client
import json
import subprocess
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rq.job import Job
from urllib3.util import parse_url

import async_forwarding
from forwarding import forwarded_query, model_url
from queueing import Enqueuer, Submission
from settings import load_settings
from tests.conftest import AUTH, BIN, ROOT, wait_for


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


# --- the model's answer is capped, the attempt has one deadline, the request goes out byte for byte ---

MiB = 1024 * 1024
BIG = 64 * MiB  # more than loopback's socket buffers can swallow, so a worker that stops reading shows


def start_workers(workers, kind, env):
    """A QueueWorker or a plain `rq worker` (with RQ's scheduler, which moves its retries back)."""
    if kind == "plain":
        return workers.start(plain=True, env=env, args=("--with-scheduler",))
    return workers.start(env=env)


def finished_answers(model, request_id, count=1):
    """The model's records of this request, once it has sent (or failed to send) `count` answers."""

    def done():
        records = model.requests_for(request_id)
        return len(records) >= count and all(r.finished is not None for r in records) and records

    return wait_for(done, 30, f"the model to finish answering {request_id}")


@pytest.mark.parametrize("kind", ["queue", "plain"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_answer_over_max_result_bytes_fails_at_once_and_is_not_read(api, workers, model, db, kind, framing):
    params = {"size": str(BIG), **({"chunked": "1"} if framing == "chunked" else {})}
    request_id = api.submit_ok(params=params)
    start_workers(workers, kind, {"EAS_QUEUE_MAX_RESULT_BYTES": str(MiB)})
    state = api.wait_status(request_id, ("SUCCESS", "FAILURE"), timeout=60)
    assert state["status"] == "FAILURE"
    assert state["error_info"] == f"the model's answer is larger than max_result_bytes ({MiB} bytes)"
    assert state["attempts"] == 1  # final: the model would send the same answer again
    [seen] = finished_answers(model, request_id)
    assert seen.finished is False and seen.sent < BIG  # the worker hung up instead of reading on


def test_an_answer_of_exactly_max_result_bytes_is_kept(api, workers, model, db):
    plain = api.submit_ok(params={"size": str(MiB)})
    chunked = api.submit_ok(params={"size": str(MiB), "chunked": "1"})
    workers.start(env={"EAS_QUEUE_MAX_RESULT_BYTES": str(MiB)})
    for request_id in (plain, chunked):
        result = api.wait_status(request_id, "SUCCESS")["result"]
        assert base64.b64decode(result["body"]) == b"x" * MiB


def test_an_oversize_error_answer_still_reports_the_status(api, workers, model, db):
    request_id = api.submit_ok(params={"size": str(BIG), "status": "400"})
    workers.start(env={"EAS_QUEUE_MAX_RESULT_BYTES": str(MiB)})
    state = api.wait_status(request_id, "FAILURE", timeout=60)
    assert state["error_info"] == "the model answered HTTP 400: " + "x" * 200  # the start of its answer
    [seen] = finished_answers(model, request_id)
    assert seen.finished is False


@pytest.mark.parametrize("kind", ["queue", "plain"])
@pytest.mark.parametrize("where", ["body", "head"])
def test_forward_timeout_is_one_deadline_for_the_whole_attempt(make_api, workers, model, db, kind, where):
    """A model that sends a byte every 0.4 s never lets one read wait 1.5 s, yet the attempt ends at 1.5 s."""
    api = make_api(retry_intervals="1")
    params = {"drip": "0.4", **({"drip_head": "1"} if where == "head" else {})}
    request_id = api.submit_ok(params=params)
    start_workers(workers, kind, {"EAS_QUEUE_FORWARD_TIMEOUT": "1.5"})
    state = api.wait_status(request_id, ("SUCCESS", "FAILURE"), timeout=90)
    assert state["status"] == "FAILURE"
    assert state["error_info"] == "the model did not answer within 1.5s"
    assert state["attempts"] == 2  # retried, as timeouts are
    seen = finished_answers(model, request_id, count=2)
    assert [r.finished for r in seen] == [False, False]  # each attempt hung up on the model mid-answer


def raw_submit(api, target, body, headers):
    """POSTs to `target` (path and query) exactly as written: requests would re-quote the query."""
    connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    connection.request("POST", target, body=body, headers={**AUTH, **headers})
    response = connection.getresponse()
    answer = response.read().decode()
    assert response.status == 200, answer
    return answer


@pytest.mark.parametrize("kind", ["queue", "plain"])
def test_the_query_and_content_encoding_reach_the_model_byte_for_byte(api, workers, model, db, kind):
    body = gzip.compress(b'{"input": [1, 2, 3]}')
    query = "a=%ff%fe&b=x+y&_priority_=1&c&%5Fttl_=60&d=%7e%2F&e=caf%C3%A9&&f=1;g=2&echo=1"
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    request_id = raw_submit(api, "/api/predict/svc?" + query, body, headers)
    assert db.lrange("rq:queue:high", 0, -1) == [request_id.encode()]  # _priority_ was read by the queue
    start_workers(workers, kind, {})
    api.wait_status(request_id, "SUCCESS")
    [seen] = model.requests_for(request_id)
    assert seen.raw_query == "a=%ff%fe&b=x+y&c&d=%7e%2F&e=caf%C3%A9&&f=1;g=2&echo=1"  # no _name_ parameter
    assert seen.headers["Content-Encoding"] == "gzip"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.body == body


@pytest.mark.parametrize("kind", ["queue", "plain"])
def test_a_job_queued_with_the_old_five_arguments_still_forwards(redis_server, workers, api, model, db, kind):
    """Jobs in Redis from before raw queries and content encodings: worker.forward(service, subpath,
    ((key, value), ...), content_type, body)."""
    settings = load_settings({"EAS_QUEUE_REDIS_URL": redis_server.url, "EAS_QUEUE_TOKENS": "test-token"})
    old = Submission("svc", "v1", (("a", "1"), ("b", "x y"), ("echo", "1")), "text/plain", b"old", False, None, None)
    request_id = Enqueuer(db, settings).enqueue(old).request_id
    assert Job.fetch(request_id, connection=db).args == (
        "svc",
        "v1",
        (("a", "1"), ("b", "x y"), ("echo", "1")),
        "text/plain",
        b"old",
    )
    start_workers(workers, kind, {})
    assert api.wait_status(request_id, "SUCCESS")["result"]["body"] == "old"
    [seen] = model.requests_for(request_id)
    assert (seen.path, seen.raw_query, seen.body) == ("/api/predict/svc/v1", "a=1&b=x+y&echo=1", b"old")
    assert "Content-Encoding" not in seen.headers


QUERY_ALPHABET = st.sampled_from([*"aZ09-._~!$&'()*+,;=:@/?%#[] \\\"<>^`{|}\x00\x7f", "%2F", "%5F", "_", "%ff", "é"])


@given(raw=st.binary(max_size=80) | st.lists(QUERY_ALPHABET, max_size=30).map("".join).map(str.encode))
def test_no_raw_query_changes_the_host_or_path_or_carries_a_reserved_parameter(raw):
    forwarded = forwarded_query(raw)
    url = model_url("http://model.internal:8080/base", "svc", "a/b", forwarded)
    for parts in (urlsplit(url), parse_url(url)):
        assert parts.scheme == "http" and parts.path == "/base/api/predict/svc/a/b" and not parts.fragment
    assert (urlsplit(url).netloc, parse_url(url).host) == ("model.internal:8080", "model.internal")
    assert not any(key.startswith("_") for key, _ in parse_qsl(forwarded, keep_blank_values=True))
    assert urlsplit(url).query == forwarded
    assert model_url("http://m", "s", "", forwarded) == "http://m/api/predict/s" + (
        f"?{forwarded}" if forwarded else ""
    )


@given(raw=st.text(max_size=60))
def test_a_queued_raw_query_string_cannot_change_the_host_either(raw):
    url = model_url("http://model.internal:8080", "svc", "", raw)
    assert (urlsplit(url).netloc, urlsplit(url).path, urlsplit(url).fragment) == (
        "model.internal:8080",
        "/api/predict/svc",
        "",
    )


@given(raw=st.lists(st.sampled_from(["a", "=", "&", "+", "%41", "%ff", "%2F", "~", "b=c"]), max_size=20).map("".join))
def test_a_valid_query_without_reserved_parameters_goes_out_unchanged(raw):
    assert forwarded_query(raw.encode()) == raw


def test_one_timer_keeps_every_attempt_s_deadline_and_lets_other_cancellations_through():
    """async_forwarding.Deadlines: an attempt still running at its deadline ends with TimeoutError and its
    task is not left cancelled; one that ends in time is untouched; a cancellation from elsewhere (a warm
    shutdown's) passes through as a cancellation."""

    async def scenario() -> None:
        deadlines = async_forwarding.Deadlines(0.3)

        async def attempt(seconds: float) -> str:
            with deadlines.start():
                await asyncio.sleep(seconds)
            await asyncio.sleep(0)  # the task goes on after its attempt: nothing cancels it now
            return "answered"

        late, quick = asyncio.create_task(attempt(30)), asyncio.create_task(attempt(0.01))
        stopped = asyncio.create_task(attempt(30))
        assert await quick == "answered"
        stopped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopped
        with pytest.raises(TimeoutError):
            await late
        assert not late.cancelled() and late.cancelling() == 0
        assert await attempt(0.01) == "answered"  # a deadline after the others went works as well

    asyncio.run(scenario())
