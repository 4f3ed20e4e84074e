"""The admin CLI run as an operator runs it: `flask --app eas_queue queue ...` in the project root, against a
real redis-server, real workers and the test model."""

from __future__ import annotations

import json
import subprocess

import pytest
import requests

import keys
from tests.conftest import BIN, ROOT, TOKEN, free_port, service_env

FAIL_ONCE = {"fail_first": "1", "fail_status": "400"}  # the model refuses the first attempt (final), then answers


@pytest.fixture
def cli(redis_server, model):
    def run(*args: str, stdin: str | None = None, redis_url: str | None = None) -> subprocess.CompletedProcess:
        env = service_env(redis_url or redis_server.url, model.url)
        command = [str(BIN / "flask"), "--app", "eas_queue", "queue", *args]
        return subprocess.run(command, cwd=ROOT, env=env, input=stdin or "", capture_output=True, text=True, timeout=60)

    return run


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def refused(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stderr.strip().splitlines() == [f"Error: {message}"], result.stderr


def fail_requests(api, services: list[str]) -> list[str]:
    """One request per service that the model refuses once (FAILURE); each succeeds if it runs again."""
    ids = [api.submit_ok(service, params=FAIL_ONCE) for service in services]
    for request_id, service in zip(ids, services, strict=True):
        api.wait_status(request_id, "FAILURE", service=service)
    return ids


def test_requeue_failed_of_one_service_runs_only_those_again(api, workers, db, model, cli):
    workers.start()
    alpha = fail_requests(api, ["alpha", "alpha", "beta"])
    beta = alpha.pop()
    workers.stop_all()

    status = json.loads(ok(cli("status", "--json")))
    assert status["queues"]["default"]["failed"] == 3
    assert status["services"] == {"alpha": {"waiting": 0, "failed": 2}, "beta": {"waiting": 0, "failed": 1}}
    shown = json.loads(ok(cli("show", alpha[0])))
    assert shown["request"] == api.state(alpha[0], "alpha")
    assert (shown["queue"], shown["rq_status"], shown["registries"]) == ("default", "failed", ["failed"])

    declined = cli("requeue-failed", "--service", "alpha", stdin="n\n")
    assert declined.returncode != 0 and "Requeue 2 failed requests of service alpha" in declined.stdout
    assert api.state(alpha[0], "alpha")["status"] == "FAILURE"

    out = ok(cli("requeue-failed", "--service", "alpha", "--yes"))
    assert out.strip() == "requeued 2 failed requests of service alpha on high and default"
    for request_id in alpha:
        assert api.state(request_id, "alpha")["status"] == "PENDING"
        assert db.zscore(keys.OPEN_REQUESTS, request_id) is not None  # the crash sweep covers it again
    assert api.state(beta, "beta")["status"] == "FAILURE"

    workers.start()
    for request_id in alpha:
        assert api.wait_status(request_id, "SUCCESS", service="alpha")["attempts"] == 2
    assert api.state(beta, "beta")["status"] == "FAILURE"
    assert [r.request_id for r in model.received].count(beta) == 1
    assert ok(cli("requeue-failed", "--service", "alpha", "--yes")).strip() == (
        "no failed requests of service alpha on high and default"
    )


def test_a_requeued_request_lost_by_a_crash_is_found_by_the_sweep(api, workers, db, cli):
    """Requeued, then popped by a worker that dies before recording it: the sweep puts it back."""
    workers.start()
    (request_id,) = fail_requests(api, ["svc"])
    workers.stop_all()
    ok(cli("requeue-failed", "--yes"))
    assert db.lpop(keys.queue_keys("default").queue).decode() == request_id  # the crash: in no queue now
    workers.start()
    assert api.wait_status(request_id, "SUCCESS", timeout=45)["attempts"] == 2


def test_dashboard_requeue_puts_the_request_back_in_the_open_index(api, workers, db):
    workers.start()
    (request_id,) = fail_requests(api, ["svc"])
    workers.stop_all()
    assert db.zscore(keys.OPEN_REQUESTS, request_id) is None
    answer = requests.post(
        f"{api.url}/rq/job/{request_id}/requeue", auth=("ops", TOKEN), headers={"Origin": api.url}, timeout=5
    )
    assert answer.status_code == 200, answer.text
    assert db.zscore(keys.OPEN_REQUESTS, request_id) is not None


def test_status_counts_waiting_per_queue_and_service(api, db, cli):
    first = api.submit_ok("alpha")
    api.submit_ok("alpha")
    api.submit_ok("beta", params={"_priority_": "1"})
    status = json.loads(ok(cli("status", "--json")))
    assert [status["queues"][q]["waiting"] for q in ("high", "default")] == [1, 2]
    assert status["services"] == {"alpha": {"waiting": 2, "failed": 0}, "beta": {"waiting": 1, "failed": 0}}
    assert status["queues"]["default"]["oldest_waiting_seconds"] >= 0
    assert status["complete"] is True
    partial = json.loads(ok(cli("status", "--json", "--scan-limit", "1")))
    assert partial["complete"] is False
    assert partial["services"]["alpha"]["waiting"] == 1

    text = ok(cli("status"))
    assert text.splitlines()[0].split() == [
        *("queue", "waiting", "started", "retrying", "failed", "finished", "canceled", "oldest", "waiting")
    ]
    assert text.splitlines()[2].split()[:2] == ["default", "2"]
    shown = json.loads(ok(cli("show", first)))
    assert shown["request"]["status"] == "PENDING"
    assert (shown["registries"], shown["position"]) == (["queue"], 0)


def test_purge_cancels_the_waiting_requests(api, db, cli):
    waiting = [api.submit_ok() for _ in range(3)]
    urgent = api.submit_ok(params={"_priority_": "1"})

    declined = cli("purge", "default", stdin="n\n")
    assert declined.returncode != 0 and "Cancel 3 requests waiting in queue default?" in declined.stdout
    assert db.llen(keys.queue_keys("default").queue) == 3

    assert ok(cli("purge", "default", "--yes")).strip() == "canceled 3 requests waiting in queue default"
    for request_id in waiting:
        assert api.state(request_id)["status"] == "CANCELED"
        assert db.zscore(keys.OPEN_REQUESTS, request_id) is None
    assert db.llen(keys.queue_keys("default").queue) == 0
    assert api.state(urgent)["status"] == "PENDING"
    assert json.loads(ok(cli("show", waiting[0])))["registries"] == ["canceled"]
    assert ok(cli("purge", "default", "--yes")).strip() == "queue default is empty"


def test_bad_arguments_and_unknown_ids_exit_non_zero_with_one_line(db, cli):
    unknown = "00000000-0000-4000-8000-000000000000"
    refused(cli("show", "not-an-id"), 2, "not a request id: 'not-an-id' (request ids are lowercase UUIDs)")
    refused(cli("show", unknown), 1, f"unknown request id {unknown} (never accepted, or its record expired)")
    refused(cli("purge", "low", "--yes"), 2, "Invalid value for 'QUEUE': 'low' is not one of 'high', 'default'.")
    refused(
        cli("requeue-failed", "--queue", "low"),
        2,
        "Invalid value for '--queue': 'low' is not one of 'high', 'default'.",
    )
    refused(
        cli("requeue-failed", "--service", "a b"), 2, "not a service name: 'a b' (1-128 letters, digits, '_', '-', '.')"
    )
    refused(cli("stats"), 2, "No such command 'stats'. Did you mean 'status'?")
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    refused(cli("status", redis_url=nobody), 1, "the queue's storage (Redis) is unavailable (ConnectionError)")
    assert db.dbsize() == 0
