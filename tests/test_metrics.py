"""/metrics scraped from a running stack (gunicorn with 2 gevent workers, a QueueWorker, the model server)
after real traffic: every count exact, and every scrape, whichever gunicorn worker answers it, the same."""

import threading

import requests
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue

import keys
from tests.conftest import AUTH, wait_for

SCRAPES = 8  # enough that both gunicorn workers answer some


def scrape(api) -> dict[tuple[str, frozenset], float]:
    response = requests.get(api.url + "/metrics", timeout=10)  # no token
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def expired_on_redis_clock(db, request_id: str) -> bool:
    seconds, micros = db.time()
    return seconds + micros / 1e6 > float(db.hget(keys.job_key(request_id), keys.EXPIRES_AT_FIELD))


def test_metrics_count_submits_outcomes_attempts_and_backlog_exactly(make_api, workers, db):
    api = make_api(retry_intervals="0.2,0.2")
    ok = [api.submit_ok("alpha") for _ in range(3)]
    ok.append(api.submit_ok("alpha", params={"_priority_": "1", "fail_first": "1"}))  # one retry, then SUCCESS
    refused_by_model = api.submit_ok("beta", params={"status": "400"})  # FAILURE, not retried
    always_503 = api.submit_ok("beta", params={"status": "503"})  # 1 attempt + 2 retries, FAILURE
    canceled = api.submit_ok("gamma")
    assert api.cancel(canceled, "gamma").status_code == 200
    expired = api.submit_ok("gamma", params={"_ttl_": "0.01"})
    wait_for(lambda: expired_on_redis_clock(db, expired), 5, "the request's queue deadline to pass")
    assert api.submit("alpha", headers={"Authorization": ""}).status_code == 401
    assert api.submit("alpha", headers={"Authorization": "wrong-token"}).status_code == 403
    assert api.submit("alpha", params={"_priority_": "2"}).status_code == 400
    assert api.submit("alpha", params={"_priorty_": "1"}).status_code == 400
    webhooks = Queue(keys.WEBHOOKS_QUEUE, connection=db)
    webhooks.enqueue("os.getpid")
    webhooks.enqueue("os.getpid")

    # Before any worker runs: the backlog, and a long-poll counted by whichever gunicorn worker holds it.
    poll = threading.Thread(
        target=requests.get,
        args=(f"{api.url}/api/predict/alpha/sink",),
        kwargs={"params": {"request_id": ok[0], "_timeout_": "30"}, "headers": AUTH, "timeout": 60},
    )
    poll.start()
    for _ in range(SCRAPES):
        samples = wait_for(lambda: (s := scrape(api)) and value(s, "eas_queue_waiting_clients") == 1 and s, 10)
        assert value(samples, "eas_queue_waiting_requests", priority="default") == 6  # 3 alpha, 2 beta, expired
        assert value(samples, "eas_queue_waiting_requests", priority="high") == 1
        assert value(samples, "eas_queue_oldest_waiting_age_seconds", priority="default") > 0
        assert value(samples, "eas_queue_webhook_deliveries_waiting") == 2
        assert value(samples, "eas_queue_workers") == 0
        assert value(samples, "eas_queue_redis_up") == 1

    workers.start(1)
    for request_id in ok:
        api.wait_status(request_id, "SUCCESS", service="alpha")
    for request_id in (refused_by_model, always_503):
        api.wait_status(request_id, "FAILURE", service="beta")
    api.wait_status(expired, "EXPIRED", service="gamma")
    poll.join(30)
    wait_for(lambda: value(scrape(api), "eas_queue_workers") == 1, 10, "the worker to count as live")

    scrapes = [scrape(api) for _ in range(SCRAPES)]
    assert all(s == scrapes[0] for s in scrapes), "gunicorn's workers disagree"
    samples = scrapes[0]
    submits = "eas_queue_submits_total"
    assert value(samples, submits, service="alpha", priority="default", code="200") == 3
    assert value(samples, submits, service="alpha", priority="high", code="200") == 1
    assert value(samples, submits, service="beta", priority="default", code="200") == 2
    assert value(samples, submits, service="gamma", priority="default", code="200") == 2
    assert value(samples, submits, service="", priority="default", code="401") == 1  # no token: no name
    assert value(samples, submits, service="", priority="default", code="403") == 1
    assert value(samples, submits, service="alpha", priority="default", code="400") == 2
    assert sum(v for (name, _), v in samples.items() if name == submits) == 12

    ended = "eas_queue_requests_ended_total"
    assert value(samples, ended, service="alpha", outcome="SUCCESS") == 4
    assert value(samples, ended, service="beta", outcome="FAILURE") == 2
    assert value(samples, ended, service="gamma", outcome="CANCELED") == 1
    assert value(samples, ended, service="gamma", outcome="EXPIRED") == 1
    assert sum(v for (name, _), v in samples.items() if name == ended) == 8

    attempts = "eas_queue_forward_attempts_total"
    assert value(samples, attempts, service="alpha", code="200") == 4
    assert value(samples, attempts, service="alpha", code="503") == 1
    assert value(samples, attempts, service="beta", code="400") == 1
    assert value(samples, attempts, service="beta", code="503") == 3
    assert sum(v for (name, _), v in samples.items() if name == attempts) == 9
    assert value(samples, "eas_queue_retries_total", service="alpha") == 1
    assert value(samples, "eas_queue_retries_total", service="beta") == 2

    histogram = "eas_queue_forward_duration_seconds"
    assert value(samples, histogram + "_count", service="alpha") == 5
    assert value(samples, histogram + "_bucket", service="alpha", le="+Inf") == 5
    assert value(samples, histogram + "_count", service="beta") == 4
    assert value(samples, histogram + "_sum", service="beta") > 0
    buckets = [
        v for (name, labels), v in samples.items() if name == histogram + "_bucket" and ("service", "beta") in labels
    ]
    assert len(buckets) == 14 and max(buckets) == 4

    assert value(samples, "eas_queue_waiting_requests", priority="default") == 0
    assert value(samples, "eas_queue_oldest_waiting_age_seconds", priority="default") == 0
    assert value(samples, "eas_queue_waiting_clients") == 0
    assert value(samples, "eas_queue_started_requests", priority="default") == 0
