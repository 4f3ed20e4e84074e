"""POST /api/predict/<service>[/<subpath>]: who may submit, what is accepted, where it is queued."""

import http.client
import zlib

import requests
from rq.job import Job

from queueing import Enqueuer, Submission
from settings import load_settings
from tests.conftest import AUTH, TOKEN, wait_for


def queued(db, name):
    return [i.decode() for i in db.lrange(f"rq:queue:{name}", 0, -1)]


def nothing_enqueued(db):
    return not queued(db, "high") and not queued(db, "default") and not db.keys("rq:job:*")


def test_success_answers_the_request_id_as_body_and_header(api, db):
    response = api.submit()
    assert response.status_code == 200
    assert response.headers["X-Eas-Queueservice-Request-Id"] == response.text
    assert queued(db, "default") == [response.text]
    job = Job.fetch(response.text, connection=db)  # an RQ job whose id is the request id
    assert job.func_name == "worker.forward"
    assert job.get_status() == "queued"


def test_both_token_forms_are_accepted(api, db):
    assert api.submit(headers={"Authorization": TOKEN}).status_code == 200
    assert api.submit(headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert api.submit(headers={"Authorization": "second-token"}).status_code == 200


def test_missing_or_wrong_token_is_refused_with_json(api, db):
    missing = requests.post(api.url + "/api/predict/svc", data=b"{}", timeout=5)
    assert missing.status_code == 401
    assert "Authorization" in missing.json()["error"]
    for header in ("nope", "Bearer nope", "Bearer", f"Basic {TOKEN}x"):
        wrong = api.submit(headers={"Authorization": header})
        assert wrong.status_code == 403, header
        assert wrong.headers["Content-Type"] == "application/json"
        assert wrong.json() == {"error": "token not accepted"}
    assert nothing_enqueued(db)


def raw_post(api, path):
    """POSTs to `path` exactly as written (requests would resolve `..` and `.` before sending)."""
    connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    connection.request("POST", path, body=b"{}", headers=AUTH)
    response = connection.getresponse()
    return response.status, response.read()


def test_service_names(api, db):
    for name in ("a", "model_v2", "my-model.prod", "x" * 128, "v1.2"):
        assert api.submit(name).status_code == 200, name
    for name in ("x" * 129, "caf%C3%A9", "a%20b", "a$b", "a%40b"):
        response = api.submit(name)
        assert response.status_code == 400, name
        assert "service name" in response.json()["error"]
    for name in ("..", ".", "..."):
        status, body = raw_post(api, f"/api/predict/{name}")
        assert status == 400, name
    assert len(db.keys("rq:job:*")) == 5


def test_listed_services_only_refuses_others_with_404(make_api, db):
    listed = make_api(toml="listed_services_only = true\n[services.known]\n", listed_services_only="true")
    assert listed.submit("known").status_code == 200
    unknown = listed.submit("unknown")
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "unknown service 'unknown'"}


def test_a_service_can_have_its_own_tokens(make_api, db):
    api = make_api(toml='[services.private]\ntokens = ["private-token"]\n')
    assert api.submit("private", headers={"Authorization": "private-token"}).status_code == 200
    assert api.submit("private").status_code == 403  # the global token is not accepted there
    assert api.submit("public").status_code == 200
    assert api.submit("public", headers={"Authorization": "private-token"}).status_code == 403


def test_priority_chooses_the_queue(api, db):
    high = api.submit_ok(params={"_priority_": "1"})
    low = api.submit_ok(params={"_priority_": "0"})
    plain = api.submit_ok()
    assert queued(db, "high") == [high]
    assert queued(db, "default") == [low, plain]
    for bad in ("2", "yes", "", "01", "-1"):
        response = api.submit(params={"_priority_": bad})
        assert response.status_code == 400, bad
        assert response.json() == {"error": "_priority_ must be 0 or 1"}
    assert len(db.keys("rq:job:*")) == 3


def test_unknown_reserved_parameters_are_refused(api, db):
    response = api.submit(params={"_priorty_": "1"})
    assert response.status_code == 400
    assert "_priorty_" in response.json()["error"]
    assert nothing_enqueued(db)


def test_the_body_is_stored_as_bytes_whatever_its_type(api, db):
    body = bytes(range(256)) * 4
    request_id = api.submit_ok(
        body=body, headers={"Content-Type": "image/x-raw"}, subpath="v1/run", params={"tag": "a", "other": "b"}
    )
    service, subpath, query, content_type, stored = Job.fetch(request_id, connection=db).args
    assert (service, subpath, content_type, stored) == ("svc", "v1/run", "image/x-raw", body)
    assert query == "tag=a&other=b"  # the raw query string, as the model gets it
    empty = api.submit_ok(body=b"", headers={"Content-Type": ""})
    assert Job.fetch(empty, connection=db).args[4] == b""


def test_a_body_over_the_limit_is_refused_with_413_and_nothing_queued(make_api, db):
    api = make_api(max_body_bytes=1000)
    assert api.submit(body=b"x" * 1000).status_code == 200
    db.flushall()
    too_big = api.submit(body=b"x" * 1001)
    assert too_big.status_code == 413
    assert "1000 bytes" in too_big.json()["error"]

    def chunks():
        for _ in range(20):
            yield b"y" * 100

    chunked = requests.post(api.url + "/api/predict/svc", data=chunks(), headers=AUTH, timeout=10)
    assert chunked.status_code == 413
    assert nothing_enqueued(db)


def test_a_full_queue_answers_429_with_retry_after(make_api, db):
    api = make_api(max_queue_length=3)
    ids = [api.submit_ok() for _ in range(3)]
    full = api.submit()
    assert full.status_code == 429
    assert int(full.headers["Retry-After"]) > 0
    assert "queue is full" in full.json()["error"]
    assert queued(db, "default") == ids
    assert api.submit(params={"_priority_": "1"}).status_code == 200  # each queue has its own cap


def test_subpaths_that_could_escape_are_refused(api, db):
    for subpath in (
        "a/../b",
        "..",
        "../../admin",
        "a/./b",
        "a//b",
        "//evil.example/x",
        "a%2F..%2Fb",
        "a%5Cb",
        "a\\b",
        "user@evil.example",
        "a%00b",
        "%2e%2e/x",
        "x" * 1025,
    ):
        status, body = raw_post(api, "/api/predict/svc/" + subpath)
        assert status in (400, 404), subpath  # 404: no route takes a path segment that is empty
        assert b'"error"' in body
    assert nothing_enqueued(db)


def test_posting_to_the_sink_is_not_a_submit(api, db):
    response = api.submit(subpath="sink")
    assert response.status_code == 405
    assert response.json()["error"].startswith("the sink is read with GET")
    assert nothing_enqueued(db)


def test_other_methods_and_paths_answer_json(api, db):
    wrong_method = requests.patch(api.url + "/api/predict/svc", headers=AUTH, timeout=5)
    assert wrong_method.status_code == 405
    no_parameters = requests.get(api.url + "/api/predict/svc", headers=AUTH, timeout=5)  # GET: EAS's attributes
    assert no_parameters.status_code == 400 and "_attrs_" in no_parameters.json()["error"]
    assert wrong_method.headers["Content-Type"] == "application/json"
    nowhere = requests.get(api.url + "/nowhere", timeout=5)
    assert nowhere.status_code == 404
    assert "error" in nowhere.json()


def methods(header: str) -> set[str]:
    return {method.strip() for method in header.split(",")}


def test_options_answers_204_with_allow_and_no_body(api, db):
    """Flask's automatic OPTIONS answered an empty 200 text/html (and counted as a submit): now 204 with
    `Allow` and neither body nor Content-Type, with or without a token, and no CORS headers (there are none)."""
    expected = {
        "/api/predict/svc": {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"},
        "/api/predict/svc/sink": {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"},  # a POST there is a 405
        "/api/predict/svc/a/b": {"POST", "OPTIONS"},
        "/healthz": {"GET", "HEAD", "OPTIONS"},
        "/metrics": {"GET", "HEAD", "OPTIONS"},
    }
    for path, allowed in expected.items():
        for headers in (AUTH, {}, {"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"}):
            answer = requests.options(api.url + path, headers=headers, timeout=5)
            assert answer.status_code == 204, (path, headers, answer.status_code)
            assert methods(answer.headers["Allow"]) == allowed, (path, answer.headers["Allow"])
            assert answer.content == b"" and "Content-Type" not in answer.headers, (path, answer.headers)
            assert not [name for name in answer.headers if name.lower().startswith("access-control-")], path
    refused = api.submit(subpath="sink")
    assert refused.status_code == 405 and methods(refused.headers["Allow"]) == expected["/api/predict/svc/sink"]
    assert 'code="204"' not in requests.get(api.url + "/metrics", timeout=5).text  # OPTIONS is not a submit
    assert nothing_enqueued(db)


def test_health(api, db):
    assert requests.get(api.url + "/healthz", timeout=5).json() == {"status": "ok"}


def test_enqueue_keeps_rq_bookkeeping(api, db):
    request_id = api.submit_ok()
    assert db.sismember("rq:queues", "rq:queue:default")
    assert wait_for(lambda: db.zscore("eas:open", request_id) is not None, what="the open-requests index")


def test_the_job_hash_is_exactly_what_rq_would_write(redis_server, db):
    """Enqueuer builds the hash from a per-queue template for speed; it must equal RQ's own Job.to_dict."""
    settings = load_settings({"EAS_QUEUE_REDIS_URL": redis_server.url, "EAS_QUEUE_RETRY_INTERVALS": "1,2.5"})
    enqueuer = Enqueuer(db, settings)
    for priority in (False, True):
        submission = Submission("svc", "a/b", (("k", "v"),), "text/plain", b"\x00body", priority, None, None)
        job = enqueuer.build_job(submission)
        ours = enqueuer.job_fields(submission, job.created_at)
        rqs = {k: v for k, v in job.to_dict().items() if v != ""}
        assert zlib.decompress(ours.pop("data")) == zlib.decompress(rqs.pop("data"))  # compressed differently
        assert ours == rqs


def test_a_body_shorter_than_its_content_length_is_refused(api, db):
    import socket

    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as client:
        head = f"POST /api/predict/svc HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\nContent-Length: 100\r\n\r\n"
        client.sendall(head.encode() + b"only-part-of-it")
        client.shutdown(socket.SHUT_WR)  # the client goes away mid-body
        answer = b""
        while chunk := client.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"body ended after 15 of 100 bytes" in answer
    assert nothing_enqueued(db)


def test_the_job_is_what_rqs_own_enqueue_writes(redis_server, db):
    """The hash our Lua enqueue writes equals what RQ's Queue.enqueue_job writes for the same job."""
    from rq import Queue

    settings = load_settings({"EAS_QUEUE_REDIS_URL": redis_server.url})
    enqueuer = Enqueuer(db, settings)
    submission = Submission("svc", "", (), "application/json", b'{"a": 1}', False, None, None)
    request_id = enqueuer.enqueue(submission).request_id
    ours = db.hgetall(f"rq:job:{request_id}")
    job = enqueuer.build_job(submission)
    Queue("default", connection=db).enqueue_job(job)
    rqs = {k: v for k, v in db.hgetall(job.key).items() if v != b""}  # RQ also writes its empty fields
    ours.pop(b"eas_service")
    for moment in (b"created_at", b"enqueued_at"):  # written at different instants
        assert ours.pop(moment) and rqs.pop(moment)
    assert zlib.decompress(ours.pop(b"data")) == zlib.decompress(rqs.pop(b"data"))
    assert ours == rqs
    assert Job.fetch(request_id, connection=db).args == job.args


def test_names_that_only_look_like_a_configured_service_are_refused(make_api, db):
    """`PRIVATE` or `private.` would reach the same model as `private` without its own tokens."""
    api = make_api(toml='[services.private]\ntokens = ["private-token"]\n')
    for name in ("PRIVATE", "private.", "Private..", "pRivate"):
        response = api.submit(name)  # with a global token
        assert response.status_code == 400, name
        assert "'private'" in response.json()["error"]
    assert nothing_enqueued(db)


def test_control_characters_in_a_subpath_are_a_bad_request(api, db):
    for subpath in ("a%0D%0Ab", "a%0Ab", "%0D", "a/%0A/b"):
        status, body = raw_post(api, f"/api/predict/svc/{subpath}")
        assert status == 400, subpath
        assert b"subpath" in body
    assert nothing_enqueued(db)
