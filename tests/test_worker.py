"""QueueWorker run in the test process (`work(burst=True)`, as rq's and arq's own tests run their workers)
against a real redis-server and the real model server: the worker's logic, in milliseconds. The
process-level and fault tests (test_faults.py) run it the way users start it."""

import logging

import pytest
import redis
from rq import Queue
from rq.command import send_stop_job_command
from rq.job import Job, JobStatus

import keys
import lifecycle
from lifecycle import RequestStatus
from queueing import Enqueuer, Submission
from recovery import OrphanSweep
from settings import load_settings
from tests.conftest import wait_for
from worker import QueueWorker


@pytest.fixture
def settings(redis_server, model):
    return load_settings(
        {
            "EAS_QUEUE_REDIS_URL": redis_server.url,
            "EAS_QUEUE_TARGET_API_BASE_URL": model.url,
            "EAS_QUEUE_RETRY_INTERVALS": "0,0",
            "EAS_QUEUE_WORKER_CONCURRENCY": "4",
            "EAS_QUEUE_FORWARD_TIMEOUT": "5",
        }
    )


@pytest.fixture
def submit(db, settings):
    enqueuer = Enqueuer(db, settings)

    def enqueue(query: tuple = (), priority: bool = False, body: bytes = b"{}") -> str:
        submission = Submission("svc", "", query, "application/json", body, priority, None, None)
        return enqueuer.enqueue(submission).request_id

    return enqueue


@pytest.fixture
def run_worker(redis_server, settings):
    """Runs a QueueWorker in this process until the queues are empty and nothing is in flight."""

    def run(**work_options: object) -> QueueWorker:
        connection = redis.Redis.from_url(redis_server.url)
        worker = QueueWorker([Queue(n, connection=connection) for n in keys.QUEUE_NAMES], settings=settings)
        worker.work(burst=True, **work_options)
        return worker

    return run


def status(db, request_id: str) -> RequestStatus:
    state = lifecycle.read_state(db, request_id)
    assert state is not None
    return state.status


def test_burst_forwards_everything_high_first(db, model, submit, run_worker):
    low = [submit(query=(("n", str(n)),)) for n in range(6)]
    high = [submit(query=(("n", str(n)),), priority=True) for n in range(3)]
    worker = run_worker()
    assert [status(db, i) for i in low + high] == [RequestStatus.SUCCESS] * 9
    started = {i: Job.fetch(i, connection=db).started_at for i in low + high}
    assert max(started[i] for i in high) <= min(started[i] for i in low)  # claimed high first (or together)
    assert sorted(model.ids()) == sorted(low + high)  # each forwarded once
    assert db.zcard(keys.OPEN_REQUESTS) == 0
    assert db.hget(worker.key, "successful_job_count") == b"9"  # counted as RQ counts them


def test_a_4xx_fails_at_once_and_a_5xx_waits_for_its_retry(db, model, submit, run_worker):
    refused = submit(query=(("status", "400"),))
    flaky = submit(query=(("fail_first", "1"),))
    run_worker()
    assert status(db, refused) == RequestStatus.FAILURE
    assert lifecycle.read_state(db, refused).error.startswith("the model answered HTTP 400")
    assert status(db, flaky) in (RequestStatus.RETRY, RequestStatus.PENDING, RequestStatus.SUCCESS)
    wait_for(lambda: run_worker() and status(db, flaky) == RequestStatus.SUCCESS, 10, "the retry to succeed")
    assert len(model.requests_for(flaky)) == 2


def test_max_jobs_stops_after_that_many(db, submit, run_worker):
    ids = [submit() for _ in range(5)]
    run_worker(max_jobs=2)
    assert sorted(status(db, i) for i in ids).count(RequestStatus.SUCCESS) == 2
    assert db.llen(keys.queue_keys("default").queue) == 3


def test_another_job_function_runs_as_rq_would_run_it(db, redis_server, run_worker):
    job = Queue("default", connection=db).enqueue("builtins.len", "four")
    run_worker()
    assert Job.fetch(job.id, connection=db).return_value() == 4


def test_a_stopped_request_leaves_the_open_index(db, redis_server, model, settings, submit, workers):
    """RQ's `stop job` command ends a request STOPPED; the sink and the sweep both count it as ended, so it
    does not keep a place in the sweep's window of the oldest open requests."""
    request_id = submit(query=(("delay", "30"),))
    [plain] = workers.start(plain=True)
    wait_for(lambda: model.requests_for(request_id), 20, "the request to reach the model")
    send_stop_job_command(db, request_id)
    wait_for(lambda: Job.fetch(request_id, connection=db).get_status() == JobStatus.STOPPED, 20, "the stop")
    assert status(db, request_id) == RequestStatus.FAILURE
    assert db.zscore(keys.OPEN_REQUESTS, request_id) is not None
    sweep = OrphanSweep(db, [keys.queue_keys(n) for n in keys.QUEUE_NAMES], logging.getLogger("test"))
    sweep.age = 0
    sweep.run()
    assert db.zscore(keys.OPEN_REQUESTS, request_id) is None
    assert plain.poll() is None  # the plain worker lives on after stopping the job


def test_a_recovery_lock_that_expired_is_never_freed_for_another_worker(db):
    """A task that outlived its lock (60 s) must not delete the lock another worker has taken since."""
    import recovery

    with recovery.exclusive(db, "test-task", "worker-a") as mine:
        assert mine
        db.delete("eas:lock:test-task")  # as if it expired
        with recovery.exclusive(db, "test-task", "worker-b") as theirs:
            assert theirs
        db.set("eas:lock:test-task", "worker-c")  # taken by a third worker meanwhile
    assert db.get("eas:lock:test-task") == b"worker-c"  # worker-a's release left it alone
