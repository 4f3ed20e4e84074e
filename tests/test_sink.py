"""GET /api/predict/<service>/sink?request_id=<id>: status codes and the body of every state."""

import uuid

import requests

from tests.conftest import AUTH


def test_request_id_is_required_and_well_formed(api, db):
    for params in (
        {},
        {"request_id": ""},
        {"request_id": "not-an-id"},
        {"request_id": str(uuid.uuid4()).upper()},
        {"request_id": "../../etc"},
        {"request_id": str(uuid.uuid4()), "extra": "1"},
    ):
        response = requests.get(api.url + "/api/predict/svc/sink", params=params, headers=AUTH, timeout=5)
        assert response.status_code == 400, params
        assert "error" in response.json()
    repeated = requests.get(api.url + "/api/predict/svc/sink?request_id=a&request_id=b", headers=AUTH, timeout=5)
    assert repeated.status_code == 400


def test_sink_needs_a_token(api, db):
    request_id = api.submit_ok()
    assert api.sink(request_id, headers={}).status_code == 401
    assert api.sink(request_id, headers={"Authorization": "wrong"}).status_code == 403


def test_unknown_expired_or_foreign_ids_are_404(api, db):
    assert api.sink(str(uuid.uuid4())).status_code == 404
    mine = api.submit_ok("svc-a")
    foreign = api.sink(mine, service="svc-b")
    assert foreign.status_code == 404
    assert "error" in foreign.json()
    db.delete(f"rq:job:{mine}")  # what result_ttl / failure_ttl expiry does
    assert api.sink(mine, service="svc-a").status_code == 404


def test_pending_is_202_with_the_original_fields(api, db):
    request_id = api.submit_ok()
    response = api.sink(request_id)
    assert response.status_code == 202
    body = response.json()
    assert body["request_id"] == request_id
    assert body["status"] == "PENDING"
    assert body["service_name"] == "svc"
    assert body["message"] == "Request is queued."
    assert body["attempts"] == 0
    assert body["enqueued_at"].endswith("Z")
    assert body["started_at"] is None and body["ended_at"] is None


def test_started_is_202_then_success_is_200(api, workers, db):
    request_id = api.submit_ok(params={"delay": "1.5"})
    workers.start()
    state = api.wait_status(request_id, "STARTED")
    assert api.sink(request_id).status_code == 202
    assert state["attempts"] == 1 and state["started_at"]
    done = api.wait_status(request_id, "SUCCESS")
    response = api.sink(request_id)
    assert response.status_code == 200
    assert done["message"] == "Task completed successfully."
    assert done["result"]["status"] == "success"
    assert done["result"]["target_status_code"] == 200
    assert done["enqueued_at"] <= done["started_at"] <= done["ended_at"]


def test_failure_is_200_with_error_info(api, workers, db):
    request_id = api.submit_ok(params={"status": "422", "answer": "nope"})
    workers.start()
    state = api.wait_status(request_id, "FAILURE")
    assert api.sink(request_id).status_code == 200
    assert state["message"] == "Task failed."
    assert state["error_info"] == "the model answered HTTP 422: nope"
    assert "result" not in state


def test_a_request_id_with_a_trailing_newline_is_refused(api, db):
    request_id = api.submit_ok()
    for bad in (f"{request_id}%0A", f"{request_id}%0D%0A", f"%0A{request_id}"):
        response = requests.get(f"{api.url}/api/predict/svc/sink?request_id={bad}", headers=AUTH, timeout=5)
        assert response.status_code == 400, bad
        assert response.json()["error"].startswith("request_id is not a request id")


def test_flags_read_alike_on_every_sink_path(api, workers, db):
    """One rule for `_raw_`, `_watch_` and the EAS flags: true/1 or false/0 in any case, else a 400 naming
    the parameter; and `request_id` or `requestId` names a request on the JSON sink and the EAS get alike."""
    request_id = api.submit_ok()
    workers.start()
    answer_body = api.wait_status(request_id, "SUCCESS")["result"]["body"]
    sink = f"{api.url}/api/predict/svc/sink"
    protobuf = {**AUTH, "Accept": "application/vnd.google.protobuf"}
    for spelling in ("false", "FALSE", "0"):  # the EAS SDK's get: protobuf frames
        for name in ("requestId", "request_id"):
            answer = requests.get(sink, params={name: request_id, "_raw_": spelling}, headers=protobuf, timeout=10)
            assert answer.status_code == 200, (spelling, name, answer.text)
            assert answer.headers["Content-Type"].startswith("application/vnd.google.protobuf"), (spelling, name)
    for spelling in ("true", "True", "1"):  # the model's own answer
        answer = requests.get(sink, params={"request_id": request_id, "_raw_": spelling}, headers=AUTH, timeout=10)
        assert answer.status_code == 200 and answer.json() == answer_body, spelling
    for name, value in (("_raw_", "yes"), ("_auto_delete_", "2")):
        params = {"requestId": request_id, "_raw_": "false", name: value}
        answer = requests.get(sink, params=params, headers=AUTH, timeout=10)
        assert answer.status_code == 400 and name in answer.json()["error"], (name, answer.text)
    with requests.get(
        sink, params={"_watch_": "TRUE"}, headers={**AUTH, "Accept": "text/event-stream"}, stream=True, timeout=10
    ) as stream:
        assert stream.status_code == 200 and stream.headers["Content-Type"].startswith("text/event-stream")


def test_hostile_model_answers_never_give_the_sink_a_500(api, workers, db):
    """What an attack on the running stack found: JSON nested past Python's limit, NaN, a lone surrogate
    and a Content-Type that is no header value. The JSON record stays valid JSON any parser reads; the raw
    answer gives the model's bytes (a bad Content-Type becomes application/octet-stream)."""
    deep = "[" * 100_000 + "]" * 100_000
    cases = {
        "deep": (deep.encode(), "application/json"),
        "nan": (b'{"a": NaN}', "application/json"),
        "surrogate": (b'{"a": "\\ud800"}', "application/json"),
        "control": (b"hi", "text/plain\x01"),
    }
    ids = {
        name: api.submit_ok(params={"echo": "1"}, body=body, headers={"Content-Type": content_type})
        for name, (body, content_type) in cases.items()
        if name != "control"
    }
    ids["control"] = api.submit_ok(params={"answer": "hi", "content_type": "text/plain\x01"})
    workers.start()
    for name, request_id in ids.items():
        record = api.wait_status(request_id, "SUCCESS")
        assert record["result"]["body_encoding"] != "json" or name == "surrogate", name
        strict = requests.get(f"{api.url}/api/predict/svc/sink", params={"request_id": request_id}, headers=AUTH)
        assert strict.status_code == 200 and "NaN" not in strict.text, name
        raw = requests.get(
            f"{api.url}/api/predict/svc/sink", params={"request_id": request_id, "_raw_": "true"}, headers=AUTH
        )
        assert raw.status_code == 200, (name, raw.text[:200])
    assert raw.headers["Content-Type"] == "application/octet-stream"  # the control character's


def test_a_malformed_chunked_body_is_a_400_that_closes_the_connection(api, db):
    import socket

    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        head = f"POST /api/predict/svc HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
        sock.sendall(
            (
                head + "Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
            ).encode()
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 400 " in status_line and b"malformed body" in rest  # and the server closed it: recv() ended
    assert db.llen("rq:queue:default") == 0


def test_a_long_poll_that_runs_out_answers_the_state_of_that_moment(api, workers, db):
    request_id = api.submit_ok(params={"status": "503", "delay": "0.5"})
    workers.start()
    api.wait_status(request_id, "STARTED")
    answer = requests.get(
        f"{api.url}/api/predict/svc/sink", params={"request_id": request_id, "_timeout_": "3"}, headers=AUTH, timeout=30
    )
    assert answer.status_code == 202
    assert answer.json()["status"] in ("RETRY", "PENDING", "STARTED") and answer.json()["attempts"] >= 2


def test_request_id_and_request_id_camel_naming_different_requests_are_a_400(api, db):
    """`request_id=A&requestId=B` answered (or canceled) A and ignored B: now a 400 naming the conflict on the
    JSON sink, the EAS get and the cancel, which changes nothing. The same id under both names is fine."""
    first, second = api.submit_ok(), api.submit_ok()
    sink = f"{api.url}/api/predict/svc/sink"
    both = {"request_id": first, "requestId": second}
    for method, extra in (("GET", {}), ("GET", {"_raw_": "true"}), ("GET", {"_raw_": "false"}), ("DELETE", {})):
        answer = requests.request(method, sink, params={**both, **extra}, headers=AUTH, timeout=10)
        assert answer.status_code == 400, (method, extra, answer.status_code, answer.text)
        assert "request_id and requestId" in answer.json()["error"], (method, extra)
    assert api.state(first)["status"] == api.state(second)["status"] == "PENDING"  # the DELETE canceled nothing
    same = {"request_id": first, "requestId": first}
    json_sink = requests.get(sink, params=same, headers=AUTH, timeout=10)
    assert json_sink.status_code == 202 and json_sink.json()["request_id"] == first
    eas_get = requests.get(sink, params={**same, "_raw_": "false"}, headers=AUTH, timeout=10)
    assert eas_get.status_code == 200 and eas_get.json() == []  # not ended: no frame
    canceled = requests.delete(sink, params=same, headers=AUTH, timeout=10)
    assert canceled.status_code == 200 and canceled.json()["status"] == "CANCELED"
    assert api.state(second)["status"] == "PENDING"


def test_a_long_poll_on_a_request_that_expires_unclaimed_answers_expired(api, db):
    """No worker runs, so nothing publishes the end of a request whose `_ttl_` passes in the queue: the
    long-poll, the EAS get and `Prefer: wait` waited out their whole timeout (60 s here) although the sink
    reads EXPIRED from the deadline on. Each now answers EXPIRED at the deadline: within the HTTP
    timeout of 20 s, far below the 60 s asked for."""
    sink = f"{api.url}/api/predict/svc/sink"
    polled = api.submit_ok(params={"_ttl_": "1"})
    answer = requests.get(sink, params={"request_id": polled, "_timeout_": "60"}, headers=AUTH, timeout=20)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "EXPIRED" and answer.json()["attempts"] == 0
    got = api.submit_ok(params={"_ttl_": "1"})
    params = {"requestId": got, "_raw_": "false", "_timeout_": "60s"}
    frames = requests.get(sink, params=params, headers=AUTH, timeout=20)
    assert frames.status_code == 200, frames.text
    assert [frame["message"] for frame in frames.json()] == ["EXPIRED"]
    waited = api.submit(params={"_ttl_": "1"}, headers={"Prefer": "wait=60"})  # conftest's timeout: 10 s
    assert waited.status_code == 200, waited.text
    assert waited.json()["status"] == "EXPIRED" and waited.headers["Preference-Applied"] == "wait=60"
    pending = api.submit_ok(params={"_ttl_": "600"})  # a deadline after the wait: the wait runs out as before
    answer = requests.get(sink, params={"request_id": pending, "_timeout_": "1"}, headers=AUTH, timeout=20)
    assert answer.status_code == 202 and answer.json()["status"] == "PENDING"
