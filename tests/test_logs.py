"""log_format = "json": the API (gunicorn) and a QueueWorker write one JSON object per line; one request's
submit and its attempts' outcomes carry its id, service, priority, attempt, status and duration (an
outcome also the model's status code and the attempt's seconds); no token and no body appears anywhere.
And the text lines carry the same fields as key=value."""

import json
import logging

from logs import EVENT_FIELDS, OUTCOME_FIELDS, TextFormatter
from tests.conftest import TOKEN, Api, service_env, wait_for

BODY_MARKER = "body-must-not-be-logged-7f3a"


def json_lines(path) -> list[dict]:
    """Every line of the file, each of which must be a JSON object."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def events(records: list[dict], request_id: str, name: str) -> list[dict]:
    return [r for r in records if r.get("message") == name and r.get("request_id") == request_id]


def test_json_lines_for_one_request_without_token_or_body(redis_server, model, workers, db, tmp_path):
    api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
    env = service_env(redis_server.url, model.url, log_format="json", retry_intervals="0.2")
    api = Api(env, output=api_log)
    try:
        body = json.dumps({"secret": BODY_MARKER})
        request_id = api.submit_ok("svc", body=body, params={"fail_first": "1"})
        refused = api.submit("svc", headers={"Authorization": "not-" + TOKEN})
        assert refused.status_code == 403
        workers.start(1, env={"EAS_QUEUE_LOG_FORMAT": "json"}, output=worker_log)
        api.wait_status(request_id, "SUCCESS")
        wait_for(lambda: events(json_lines(worker_log), request_id, "outcome")[1:], 10, "the outcome lines")
    finally:
        api.stop()
    workers.stop_all()  # its last lines written

    api_records, worker_records = json_lines(api_log), json_lines(worker_log)
    [submit] = events(api_records, request_id, "submit")
    assert submit["level"] == "INFO" and submit["logger"] == "eas_queue" and submit["time"]
    assert {k: submit[k] for k in ("service", "priority", "attempt", "status")} == {
        "service": "svc",
        "priority": "default",
        "attempt": 0,
        "status": 200,
    }
    assert submit["duration_seconds"] >= 0
    [forbidden] = [r for r in api_records if r.get("message") == "submit" and r["status"] == 403]
    assert forbidden["service"] == "" and forbidden["request_id"] == ""

    outcomes = events(worker_records, request_id, "outcome")
    assert [(o["attempt"], o["status"], o["model_status"]) for o in outcomes] == [
        (1, "RETRY", "503"),
        (2, "SUCCESS", "200"),
    ]
    assert not events(worker_records, request_id, "attempt")  # one line per attempt: its outcome
    for record in outcomes:
        assert set(EVENT_FIELDS + OUTCOME_FIELDS) <= set(record)
        assert (record["service"], record["priority"]) == ("svc", "default")
        assert record["attempt_seconds"] >= 0
    assert outcomes[1]["duration_seconds"] >= outcomes[1]["attempt_seconds"]  # since accepted, not one attempt
    assert any(r["logger"].startswith("rq.") for r in worker_records)  # RQ's own lines are JSON too

    for path in (api_log, worker_log):
        text = path.read_text()
        assert TOKEN not in text
        assert BODY_MARKER not in text


def test_text_lines_carry_the_fields_as_key_value():
    fields = {"request_id": "r1", "service": "svc", "priority": "high", "attempt": 2}
    fields.update(status="SUCCESS", duration_seconds=0.25, model_status="200", attempt_seconds=0.125)
    record = logging.LogRecord("eas_queue", logging.INFO, __file__, 1, "outcome", None, None)
    record.__dict__.update(fields)
    line = TextFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    expected = "request_id=r1 service=svc priority=high attempt=2 status=SUCCESS duration_seconds=0.25"
    assert line == "INFO eas_queue: outcome " + expected + " model_status=200 attempt_seconds=0.125"
