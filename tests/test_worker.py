"""QueueWorker run in the test process (`work(burst=True)`, as rq's and arq's own tests run their workers)
against a real redis-server and the real model server: the worker's logic, in milliseconds; and started as
users start it (`rq worker -w worker.QueueWorker`) for a SIGKILL, a warm shutdown and many in flight. The
fault tests (test_faults.py) run it against dying models and Redis servers."""

import asyncio
import logging
import os
import signal
import subprocess
import threading

import pytest
import redis
import redis.asyncio
from rq import Queue
from rq.command import send_stop_job_command
from rq.defaults import UNSERIALIZABLE_RETURN_VALUE_PAYLOAD
from rq.job import Job, JobStatus

import forwarding
import keys
import lifecycle
import recovery
import worker_upkeep
from async_commit import AsyncCommitter
from forwarding import Attempt
from lifecycle import RequestStatus
from outcomes import OutcomeRecorder
from queueing import Enqueuer, Submission
from recovery import OrphanSweep
from settings import load_settings
from tests.conftest import BIN, ROOT, wait_for
from worker import QueueWorker

WORKER_CLASS = "worker.QueueWorker"


@pytest.fixture
def settings(redis_server, model):
    return load_settings(
        {
            "EAS_QUEUE_REDIS_URL": redis_server.url,
            "EAS_QUEUE_TARGET_API_BASE_URL": model.url,
            "EAS_QUEUE_RETRY_INTERVALS": "0,0",
            "EAS_QUEUE_WORKER_CONCURRENCY": "4",
            "EAS_QUEUE_FORWARD_TIMEOUT": "2",
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


def test_a_slow_model_is_cut_off_at_forward_timeout(db, model, submit, run_worker):
    slow = submit(query=(("delay", "30"),))
    run_worker()
    wait_for(lambda: run_worker() and status(db, slow) == RequestStatus.FAILURE, 30, "the retries to run out")
    assert lifecycle.read_state(db, slow).error == "the model did not answer within 2s"


def test_the_raw_query_and_content_encoding_reach_the_model_byte_for_byte(db, model, settings, run_worker):
    query, raw = (("x", "?"), ("y", "1")), "x=%ff%fe&y=1"
    submission = Submission("svc", "a/b", query, "application/json", b"\x1f\x8b..", False, None, None, raw, "gzip")
    request_id = Enqueuer(db, settings).enqueue(submission).request_id
    run_worker()
    [seen] = model.requests_for(request_id)
    assert seen.raw_query == "x=%ff%fe&y=1"
    assert seen.path == "/api/predict/svc/a/b"
    assert seen.headers["Content-Encoding"] == "gzip"
    assert seen.body == b"\x1f\x8b.."


def test_max_jobs_stops_after_that_many(db, submit, run_worker):
    ids = [submit() for _ in range(5)]
    run_worker(max_jobs=2)
    assert sorted(status(db, i) for i in ids).count(RequestStatus.SUCCESS) == 2
    assert db.llen(keys.queue_keys("default").queue) == 3


def test_another_job_function_runs_as_rq_would_run_it(db, redis_server, run_worker):
    job = Queue("default", connection=db).enqueue("builtins.len", "four")
    run_worker()
    assert Job.fetch(job.id, connection=db).return_value() == 4


def start_worker(redis_server, model, **settings: str) -> subprocess.Popen:
    """`rq worker -w worker.QueueWorker high default`, as a user starts it."""
    env = {**os.environ, "EAS_QUEUE_REDIS_URL": redis_server.url, "EAS_QUEUE_TARGET_API_BASE_URL": model.url}
    env.update({f"EAS_QUEUE_{k.upper()}": v for k, v in settings.items()})
    command = [str(BIN / "rq"), "worker", "-w", WORKER_CLASS, "high", "default", "--url", redis_server.url]
    return subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)


def test_a_sigkilled_worker_s_requests_are_retried_by_another(db, redis_server, model, submit):
    ids = [submit(query=(("delay", "2"),)) for _ in range(20)]
    first = start_worker(redis_server, model, worker_concurrency="2000", retry_intervals="0")
    wait_for(lambda: len({r for r in model.ids() if r in ids}) == 20, 20, "every request at the model")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    second = start_worker(redis_server, model, retry_intervals="0")
    try:
        wait_for(lambda: all(status(db, i) == RequestStatus.SUCCESS for i in ids), 60, "every request to succeed")
    finally:
        os.killpg(second.pid, signal.SIGKILL)
        second.wait()
    assert all(lifecycle.read_state(db, i).attempts == 2 for i in ids)  # the killed attempt counts


def test_sigterm_finishes_what_is_in_flight(db, redis_server, model, submit):
    ids = [submit(query=(("delay", "2"),)) for _ in range(40)]
    worker = start_worker(redis_server, model, worker_concurrency="1000")
    wait_for(lambda: len({r for r in model.ids() if r in ids}) == 40, 30, "40 requests at the model at once")
    os.killpg(worker.pid, signal.SIGTERM)
    assert worker.wait(30) == 0
    assert all(status(db, i) == RequestStatus.SUCCESS for i in ids)
    assert sorted(model.ids()) == sorted(ids)  # each forwarded once


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


def test_the_sweep_suspects_only_requests_in_no_queue_or_registry(db, submit):
    """Queued requests are looked for among the head of their queue, then (one queued deeper, as a retry
    is) by LPOS, and in RQ's intermediate list; one in none of them, one scheduled outside the
    ScheduledJobRegistry and one started with no live Execution are suspects, and the rest are not."""
    waiting, popped, lost, scheduled, started, deep = (submit() for _ in range(6))
    default = keys.queue_keys("default")
    for request_id in (popped, lost, scheduled, started, deep):
        db.lrem(default.queue, 0, request_id)
    db.rpush(default.intermediate, popped)  # where stock RQ's worker keeps what it has popped
    db.hset(keys.job_key(scheduled), "status", "scheduled")
    db.hset(keys.job_key(started), "status", "started")
    sweep = OrphanSweep(db, [keys.queue_keys(n) for n in keys.QUEUE_NAMES], logging.getLogger("test"))
    sweep.age = 0
    db.rpush(default.queue, *(f"newer-{n}" for n in range(sweep.batch)), deep)  # past the head sweeps read
    suspects = sweep.find_lost(sweep.oldest_open())
    assert sorted((s.request_id, s.status) for s in suspects) == sorted(
        [(lost, "queued"), (scheduled, "scheduled"), (started, "started")]
    )


def test_a_recovery_lock_that_expired_is_never_freed_for_another_worker(db):
    """A task that outlived its lock (60 s) must not delete the lock another worker has taken since."""
    with recovery.exclusive(db, "test-task", "worker-a") as mine:
        assert mine
        db.delete("eas:lock:test-task")  # as if it expired
        with recovery.exclusive(db, "test-task", "worker-b") as theirs:
            assert theirs
        db.set("eas:lock:test-task", "worker-c")  # taken by a third worker meanwhile
    assert db.get("eas:lock:test-task") == b"worker-c"  # worker-a's release left it alone


def test_an_unserializable_return_value_is_recorded_as_rq_records_it(db, redis_server, run_worker):
    """Another job function may return what pickle refuses: the job still finishes, its Result says so
    (RQ's own placeholder), and the rest of the batch is recorded with it."""
    queue = Queue("default", connection=db)
    odd, plain = queue.enqueue("builtins.eval", "lambda: 1"), queue.enqueue("builtins.len", "four")
    run_worker()
    assert Job.fetch(odd.id, connection=db).get_status() == JobStatus.FINISHED
    assert Job.fetch(odd.id, connection=db).return_value() == UNSERIALIZABLE_RETURN_VALUE_PAYLOAD
    assert Job.fetch(plain.id, connection=db).return_value() == 4


def test_a_failing_upkeep_step_is_logged_and_upkeep_goes_on(db, submit, run_worker, monkeypatch, caplog):
    """Upkeep runs RQ's own calls in a helper thread; one that raises must not end the upkeep task, which
    also heartbeats the requests in flight (without it, recovery would take them from this worker)."""
    real, calls = worker_upkeep.upkeep, []

    def failing_once(worker: QueueWorker, in_flight: list) -> None:
        calls.append(len(in_flight))
        if len(calls) == 1:
            raise ValueError("a bug in one upkeep step")
        real(worker, in_flight)

    monkeypatch.setattr(worker_upkeep, "upkeep", failing_once)
    request_id = submit(query=(("delay", "1.5"),))
    run_worker()
    assert status(db, request_id) == RequestStatus.SUCCESS
    assert len(calls) > 1  # upkeep went on after the failure
    assert "upkeep failed" in caplog.text and "a bug in one upkeep step" in caplog.text


def test_large_answers_are_encoded_off_the_loop_and_recorded_in_bounded_batches(
    db, model, submit, run_worker, monkeypatch
):
    """Every request in flight shares the event loop: a large answer is compressed and encoded in a thread,
    and a batch of outcomes holds at most 8 MB of answers (or one larger answer), so neither the loop nor
    one Redis call is held up by many large answers at once (issue 13 note: 25 8 MB answers)."""
    threads, batches = [], []
    real_judge, real_record = forwarding.judge, AsyncCommitter._record

    def judge(*args: object) -> Attempt:
        threads.append(threading.current_thread() is threading.main_thread())
        return real_judge(*args)

    async def record(committer: AsyncCommitter, batch: list) -> None:
        batches.append([attempt.answer_bytes for _, attempt in batch])
        await real_record(committer, batch)

    monkeypatch.setattr(forwarding, "judge", judge)
    monkeypatch.setattr(AsyncCommitter, "_record", record)
    size = 3 * 1024 * 1024
    large = [submit(query=(("size", str(size)),)) for _ in range(6)]
    small = submit()
    run_worker()
    for request_id in large:
        state = lifecycle.read_state(db, request_id)
        assert state is not None and state.status == RequestStatus.SUCCESS
        assert forwarding.decode_answer(state.result)[2] == b"x" * size
    assert status(db, small) == RequestStatus.SUCCESS
    assert threads.count(False) == 6 and threads.count(True) == 1  # only the small answer on the loop
    assert sum(len(batch) for batch in batches) == 7
    assert all(sum(batch) <= 8 * 1024 * 1024 or len(batch) == 1 for batch in batches)


def test_a_batch_of_outcomes_is_bounded_by_count_and_by_answer_bytes(redis_server):
    """The committer takes the oldest outcomes in order: at most `batch_size`, at most `batch_bytes` of
    answers, and a larger answer alone."""
    connection = redis.asyncio.Redis.from_url(redis_server.url)  # no command is sent
    recorder = OutcomeRecorder(redis.Redis.from_url(redis_server.url), load_settings({}), "w", "x", "y")
    committer = AsyncCommitter(connection, recorder, logging.getLogger(), lambda items: None, 3, batch_bytes=10)
    sizes = [4, 4, 4, 20, 1, 1, 1, 1, 0]
    for n, size in enumerate(sizes):
        committer.put(n, Attempt(result={}, answer_bytes=size))  # type: ignore[arg-type]
    batches = []
    while committer._outcomes:
        batches.append([attempt.answer_bytes for _, attempt in committer.next_batch()])
    assert batches == [[4, 4], [4], [20], [1, 1, 1], [1, 0]]


@pytest.fixture
def writes_held(redis_server, settings, monkeypatch):
    """A QueueWorker to run in a thread (`work(burst=True)`), whose committer writes nothing until the
    test sets the returned gate (the write waits off the worker's loop)."""
    gate, real_record = threading.Event(), AsyncCommitter._record

    async def record(committer: AsyncCommitter, batch: list) -> None:
        await asyncio.to_thread(gate.wait)
        await real_record(committer, batch)

    monkeypatch.setattr(AsyncCommitter, "_record", record)
    connection = redis.Redis.from_url(redis_server.url)
    worker = QueueWorker([Queue(n, connection=connection) for n in keys.QUEUE_NAMES], settings=settings)
    monkeypatch.setattr(worker, "_install_signal_handlers", lambda: None)  # signals are the main thread's
    yield worker, gate
    gate.set()


def test_a_slot_frees_when_the_model_answers_and_unwritten_outcomes_are_bounded(
    db, model, submit, writes_held, monkeypatch
):
    """A slot is for an attempt at the model: the next request goes out while the last outcome is being
    written. While the committer cannot write, at most `worker_concurrency` (4 here) more outcomes wait
    beside the 4 slots, then claiming stops; once written, every request ends, and the model never had
    more than 4 at once."""
    ids = [submit() for _ in range(20)]
    worker, gate = writes_held
    worker.idle_wait = 0.05  # the claim loop goes round every 50 ms while it has no free slot
    rounds, real_free_slots = [], worker._free_slots

    async def free_slots() -> int:
        rounds.append(await real_free_slots())
        return rounds[-1]

    monkeypatch.setattr(worker, "_free_slots", free_slots)
    thread = threading.Thread(target=worker.work, kwargs={"burst": True})
    thread.start()
    try:
        wait_for(lambda: len(worker.in_flight) >= 8, 20, "8 outcomes waiting")
        seen = len(rounds)
        wait_for(lambda: len(rounds) >= seen + 5, 20, "the claim loop to go round 5 more times")
        assert rounds[seen:] and all(free <= 0 for free in rounds[seen:])  # no free slot all that while
        assert len(worker.in_flight) == len(model.ids()) == 8  # twice the slots, nothing written
        assert db.llen(keys.queue_keys("default").queue) == 12  # and nothing more claimed
    finally:
        gate.set()
        thread.join(60)
    assert not thread.is_alive()
    assert all(status(db, i) == RequestStatus.SUCCESS for i in ids)
    assert sorted(model.ids()) == sorted(ids)
    assert model.most_at_once(ids) <= 4


def test_a_slot_freed_while_outcomes_wait_is_claimed_for_at_once(db, model, submit, writes_held):
    """One attempt ends while the others are still at the model and nothing can be written: its slot goes
    to the next request without waiting for the write or for `idle_wait`."""
    slow = [submit(query=(("delay", "1.5"),)) for _ in range(3)]  # within forward_timeout (2 s)
    quick, waiting = submit(), submit()
    worker, gate = writes_held
    worker.idle_wait = 60  # so only the freed slot can wake the claim loop in time
    thread = threading.Thread(target=worker.work, kwargs={"burst": True})
    thread.start()
    try:
        wait_for(lambda: waiting in model.ids(), 20, "the fifth request to reach the model")
        arrived = model.requests_for(waiting)[0].at
        answers = [model.requests_for(i)[0].answered_at for i in slow]
        assert all(answered is None or arrived < answered for answered in answers)  # they were still there
    finally:
        gate.set()
        thread.join(60)
    assert all(status(db, i) == RequestStatus.SUCCESS for i in [*slow, quick, waiting])


def test_one_claim_takes_at_most_claim_limit_requests(db, redis_server, settings, submit):
    """Redis runs a claim while every other client waits: however many slots are free, one claim call
    takes at most `claim_limit` requests, and the rest come in the next calls."""
    ids = [submit() for _ in range(10)]
    connection = redis.Redis.from_url(redis_server.url)
    worker = QueueWorker([Queue(n, connection=connection) for n in keys.QUEUE_NAMES], settings=settings)
    worker.claim_limit = 3
    asked, real_claim = [], worker._claim

    async def claim(count: int, adopted: tuple[int, str] | None = None) -> list:
        asked.append(count)
        return await real_claim(count, adopted)

    worker._claim = claim  # type: ignore[method-assign]
    worker.work(burst=True)
    assert all(status(db, i) == RequestStatus.SUCCESS for i in ids)
    assert asked and max(asked) == 3  # settings: 4 slots
