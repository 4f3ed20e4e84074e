"""The Lua scripts in lua/, run directly against a real redis-server (as rq's tests/test_scripts.py does),
and contract tests: what the claim and the record of an outcome write is what RQ's own worker writes."""

import time

import pytest
import redis
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from rq.results import Result
from rq.utils import now

import claiming
import keys
import recovery
import redis_scripts
import sink_log
from forwarding import Attempt
from inflight import InFlight
from outcomes import OutcomeRecorder
from queueing import Enqueuer, Submission
from settings import load_settings
from worker import QueueWorker


@pytest.fixture
def settings(redis_server, model):
    return load_settings(
        {
            "EAS_QUEUE_REDIS_URL": redis_server.url,
            "EAS_QUEUE_TARGET_API_BASE_URL": model.url,
            "EAS_QUEUE_RETRY_INTERVALS": "7",
        }
    )


@pytest.fixture
def enqueue(db, settings):
    enqueuer = Enqueuer(db, settings)

    def submit(priority: bool = False, ttl: float | None = None, key: str | None = None, body: bytes = b"{}") -> str:
        submission = Submission("svc", "", (), "application/json", body, priority, ttl, key)
        queued = enqueuer.enqueue(submission)
        assert queued.outcome in ("queued", "duplicate"), queued
        return queued.request_id

    return submit


def queue_worker(redis_server, settings) -> QueueWorker:
    connection = redis.Redis.from_url(redis_server.url)
    return QueueWorker([Queue(n, connection=connection) for n in keys.QUEUE_NAMES], settings=settings)


def claim(worker: QueueWorker, count: int) -> list[InFlight]:
    """lua/claim.lua as QueueWorker._claim calls it, through the synchronous client."""
    args, started_at = claiming.claim_args(worker, count, None)
    script = redis_scripts.register(worker.connection, "claim")
    return claiming.claimed(worker, script(keys=worker._claim_keys, args=args), started_at)


def record(recorder: OutcomeRecorder, batch: list) -> int:
    """lua/record_outcomes.lua as the committer calls it (async_commit.py): how many came too late."""
    script = redis_scripts.register(recorder.connection, "record_outcomes")
    return int(script(keys=recorder.keys, args=recorder.script_args(batch)))


def shape(db: redis.Redis, key: str) -> object:
    kind = db.type(key).decode()
    return (kind, sorted(db.hkeys(key))) if kind == "hash" else kind


def test_no_lua_lives_in_python_strings():
    service_modules = sorted(redis_scripts.LUA_DIR.parent.glob("*.py"))
    assert service_modules
    for module in service_modules:
        assert "redis.call(" not in module.read_text(), module.name
    assert {p.stem for p in redis_scripts.LUA_DIR.glob("*.lua")} == {
        "enqueue", "claim", "record_outcomes", "promote_due", "requeue_orphan", "sink_append", "sink_log_append"
    }  # fmt: skip


def test_the_shared_sink_log_append_is_written_once_and_included_where_named():
    """One copy of the sink-log steps in lua/; each script that ends requests gets it in place of its
    include line, and what reaches Redis has no include line left."""
    shared = redis_scripts.source("sink_log_append")
    for name in ("claim", "record_outcomes", "sink_append"):
        script = redis_scripts.source(name)
        assert shared in script and not redis_scripts.INCLUDE.search(script), name
        assert "redis.call('XADD', sink_log_prefix" not in (redis_scripts.LUA_DIR / f"{name}.lua").read_text()


def test_enqueue_refuses_a_full_queue_and_remembers_keys(db, settings, enqueue):
    first = enqueue(key="k1")
    assert enqueue(key="k1") == first  # same key, same request: the first id, nothing queued twice
    assert db.llen(keys.queue_keys("default").queue) == 1
    full = Enqueuer(db, load_settings({"EAS_QUEUE_REDIS_URL": settings.redis_url, "EAS_QUEUE_MAX_QUEUE_LENGTH": "1"}))
    refused = full.enqueue(Submission("svc", "", (), None, b"", False, None, None))
    assert refused.outcome == "full"
    assert not db.exists(keys.job_key(refused.request_id))


def test_claim_takes_high_before_default_and_writes_what_rq_writes(redis_server, db, settings, enqueue):
    low, high = enqueue(), enqueue(priority=True)
    worker = queue_worker(redis_server, settings)
    worker.register_birth()
    [first] = claim(worker, 1)
    assert first.id == high
    [second] = claim(worker, 5)
    assert second.id == low
    ours = {
        "job": shape(db, keys.job_key(low)),
        "execution": shape(db, f"{keys.EXECUTION_PREFIX}{low}:{second.execution_id}"),
    }
    started = keys.queue_keys("default").started
    assert db.zscore(started, f"{low}:{second.execution_id}") is not None
    assert db.zscore(keys.EXECUTIONS_REGISTRY_PREFIX + low, second.execution_id) is not None
    assert db.sismember(worker.executions_key, f"{low}:{second.execution_id}")
    assert db.hget(keys.job_key(low), "status") == b"started"

    # The same request started by RQ's own worker.
    db.flushall()
    reference = enqueue()
    rq_worker = SimpleWorker([Queue("default", connection=db)], connection=db)
    rq_worker.register_birth()
    job, _ = rq_worker.dequeue_job_and_maintain_ttl(1)
    execution = rq_worker.prepare_execution(job)
    rq_worker.prepare_job_execution(job)
    rqs = {
        "job": shape(db, keys.job_key(reference)),
        "execution": shape(db, f"{keys.EXECUTION_PREFIX}{reference}:{execution.id}"),
    }
    ours["job"][1].remove(b"eas_attempts")  # ours counts attempts as they start
    assert ours == rqs
    assert db.zscore(started, f"{reference}:{execution.id}") is not None
    assert db.zscore(keys.EXECUTIONS_REGISTRY_PREFIX + reference, execution.id) is not None


def test_claim_expires_a_request_past_its_deadline_unforwarded(redis_server, db, settings, enqueue):
    request_id = enqueue(ttl=0.01)
    time.sleep(0.05)  # the deadline itself is what is tested: 10 ms, judged on Redis's clock
    worker = queue_worker(redis_server, settings)
    assert claim(worker, 5) == []
    assert db.hmget(keys.job_key(request_id), "status", "eas_outcome") == [b"canceled", b"expired"]
    assert db.zscore(keys.queue_keys("default").canceled, request_id) is not None
    assert db.zscore(keys.OPEN_REQUESTS, request_id) is None


def test_record_writes_what_rq_writes_for_a_success(redis_server, db, settings, enqueue):
    request_id = enqueue()
    worker = queue_worker(redis_server, settings)
    worker.register_birth()
    [item] = claim(worker, 1)
    recorder = OutcomeRecorder(db, settings, worker.name, worker.executions_key, worker.key)
    answer = {"status": "success", "body": {"x": 1}}
    assert record(recorder, [(item, Attempt(result=answer))]) == 0
    job = Job.fetch(request_id, connection=db)
    assert job.get_status() == JobStatus.FINISHED
    assert job.return_value() == answer
    assert job.latest_result().type == Result.Type.SUCCESSFUL
    assert db.zscore(keys.queue_keys("default").finished, request_id) is not None
    assert db.zscore(keys.queue_keys("default").started, f"{request_id}:{item.execution_id}") is None
    assert not db.exists(f"{keys.EXECUTION_PREFIX}{request_id}:{item.execution_id}")
    assert db.zscore(keys.OPEN_REQUESTS, request_id) is None
    ours = db.xrange(keys.RESULTS_PREFIX + request_id)[0][1]
    assert db.ttl(keys.job_key(request_id)) > 0 and db.ttl(keys.RESULTS_PREFIX + request_id) > 0
    # A success's Result keeps its type and return value; who ran it and when stay on the job (outcomes.py).
    assert (job.worker_name, job.started_at is not None, job.ended_at is not None) == (worker.name, True, True)

    # The same success recorded by RQ's own worker.
    db.flushall()
    reference = enqueue()
    rq_worker = SimpleWorker([Queue("default", connection=db)], connection=db)
    rq_worker.register_birth()
    job, queue = rq_worker.dequeue_job_and_maintain_ttl(1)
    execution = rq_worker.prepare_execution(job)
    rq_worker.prepare_job_execution(job)
    job._result = answer
    job.started_at = job.ended_at = now()
    rq_worker.handle_job_success(job, queue, queue.started_job_registry, execution)
    rqs = db.xrange(keys.RESULTS_PREFIX + reference)[0][1]
    assert db.ttl(keys.job_key(reference)) > 0
    assert {name: ours[name] for name in (b"type", b"return_value")} == {
        name: rqs[name] for name in (b"type", b"return_value")
    }
    assert set(ours) == {b"type", b"return_value"} < set(rqs)
    assert db.zscore(keys.queue_keys("default").finished, reference) is not None


def test_a_late_outcome_is_dropped_and_a_retry_is_scheduled(redis_server, db, settings, enqueue):
    request_id = enqueue()
    worker = queue_worker(redis_server, settings)
    [item] = claim(worker, 1)
    recorder = OutcomeRecorder(db, settings, worker.name, worker.executions_key, worker.key)
    assert record(recorder, [(item, Attempt(error="the model answered HTTP 503", retryable=True))]) == 0
    job = Job.fetch(request_id, connection=db)
    assert job.get_status() == JobStatus.SCHEDULED
    assert job.retries_left == 0
    retry_at = db.zscore(keys.queue_keys("default").scheduled, request_id)
    assert retry_at == pytest.approx(time.time() + 7, abs=2)
    assert db.hget(keys.job_key(request_id), "eas_last_error") == b"the model answered HTTP 503"
    # Recording the same attempt again (a retry after a lost reply) changes nothing: it is no longer held.
    assert record(recorder, [(item, Attempt(result={"late": True}))]) == 1
    assert Job.fetch(request_id, connection=db).get_status() == JobStatus.SCHEDULED


def test_promote_due_moves_only_due_retries_that_are_still_scheduled(db, enqueue):
    due, later, canceled = enqueue(), enqueue(), enqueue()
    q = keys.queue_keys("default")
    db.delete(q.queue)
    db.hset(keys.job_key(due), "status", "scheduled")
    db.hset(keys.job_key(later), "status", "scheduled")
    db.hset(keys.job_key(canceled), "status", "canceled")
    db.zadd(q.scheduled, {due: time.time() - 1, canceled: time.time() - 1, later: time.time() + 60})
    promote = redis_scripts.register(db, "promote_due")
    assert promote(keys=[keys.queue_keys("high").scheduled, keys.queue_keys("high").queue, q.scheduled, q.queue],
                   args=[time.time(), keys.JOB_PREFIX]) == 1  # fmt: skip
    assert db.lrange(q.queue, 0, -1) == [due.encode()]
    assert db.hget(keys.job_key(due), "status") == b"queued"
    assert db.zrange(q.scheduled, 0, -1) == [later.encode()]


def test_requeue_orphan_checks_again_before_requeueing(db, enqueue):
    lost, waiting = enqueue(), enqueue()
    q = keys.queue_keys("default")
    db.lrem(q.queue, 1, lost)  # popped by a process that died before recording it
    requeue = redis_scripts.register(db, "requeue_orphan")

    def run(request_id, status):
        script_keys = [keys.job_key(request_id), q.queue, q.scheduled, keys.EXECUTIONS_REGISTRY_PREFIX + request_id]
        return requeue(keys=script_keys, args=[request_id, status])

    assert run(waiting, "queued") == 0  # still in its queue
    assert run(lost, "started") == 0  # its status moved on since the sweep saw it
    assert run(lost, "queued") == 1
    assert db.lrange(q.queue, 0, -1) == [lost.encode(), waiting.encode()]  # at the front


def test_a_finished_request_keeps_no_body_and_stays_readable(redis_server, db, settings, enqueue):
    """Issue: a finished request kept its body for result_ttl. Now it keeps its description, service and
    result; Job.fetch and the dashboard still work on it; a failed one keeps its body (it can be requeued)."""
    body = b'{"input": "' + b"x" * 2000 + b'"}'
    done, failed = enqueue(body=body), enqueue(body=body)
    worker = queue_worker(redis_server, settings)
    items = claim(worker, 2)
    recorder = OutcomeRecorder(db, settings, worker.name, worker.executions_key, worker.key)
    attempts = {done: Attempt(result={"status": "success"}), failed: Attempt(error="HTTP 400", retryable=False)}
    record(recorder, [(item, attempts[item.id]) for item in items])
    finished = Job.fetch(done, connection=db)
    assert finished.args == () and finished.func_name == "worker.forward"
    assert finished.description == "POST /api/predict/svc"
    assert finished.return_value() == {"status": "success"}
    assert db.object("encoding", keys.job_key(done)) == b"listpack"  # small again, so stored compactly
    assert db.ttl(keys.job_key(done)) > 0
    assert Job.fetch(failed, connection=db).args[4] == body


def test_another_job_is_recorded_as_rq_would_and_not_shrunk_or_counted(redis_server, db, settings):
    """A webhook delivery (or any other job function) keeps its own `data` when it finishes, and is neither
    a request's sink-log entry nor a forward in the metrics."""
    job = Queue("default", connection=db).enqueue("builtins.len", "four")
    worker = queue_worker(redis_server, settings)
    [item] = claim(worker, 1)
    recorder = OutcomeRecorder(db, settings, worker.name, worker.executions_key, worker.key)
    record(recorder, [(item, Attempt(result=4))])
    finished = Job.fetch(job.id, connection=db)
    assert (finished.func_name, finished.args, finished.return_value()) == ("builtins.len", ("four",), 4)
    assert not db.keys("eas:sink:*")
    assert not any(b"forwards|" in field for field in db.hkeys("eas:metrics"))


def test_a_batch_is_counted_and_published_once(redis_server, db, settings, enqueue):
    """A recorded batch adds its metrics up and publishes its ended requests in one message, a line each
    (`<service> <index> <request id>`), so each API process wakes once per batch, not once per request."""
    ids = [enqueue() for _ in range(3)]
    worker = queue_worker(redis_server, settings)
    items = claim(worker, 3)
    for item in items:
        item.forward_seconds = 0.25
    pubsub = db.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.ENDED_CHANNEL)
    assert pubsub.get_message(timeout=1) is None  # the subscription is confirmed
    recorder = OutcomeRecorder(db, settings, worker.name, worker.executions_key, worker.key)
    assert record(recorder, [(item, Attempt(result={"status": "success"}, status_code=200)) for item in items]) == 0
    message = pubsub.get_message(timeout=5)
    assert message is not None and pubsub.get_message(timeout=0.2) is None  # one message for the batch
    lines = message["data"].decode().splitlines()
    assert sorted(line.split(" ")[2] for line in lines) == sorted(ids)
    assert sorted(int(line.split(" ")[1]) for line in lines) == [1, 2, 3]
    metrics = {k.decode(): v.decode() for k, v in db.hgetall(keys.METRICS).items()}
    assert metrics["forwards|svc|200"] == "3" and metrics["ended|svc|SUCCESS"] == "3"
    assert float(metrics["forward_sum|svc"]) == pytest.approx(0.75)
    pubsub.close()


def test_a_request_recovery_fails_for_good_ends_at_the_sink_like_any_other(redis_server, db, settings, enqueue):
    """RQ's StartedJobRegistry.cleanup fails a request abandoned on its last attempt without our steps;
    recovery then gives it its sink-log entry, its count and its notification, and closes it."""
    request_id = enqueue()
    db.hset(keys.job_key(request_id), "retries_left", 0)
    worker = queue_worker(redis_server, settings)
    [item] = claim(worker, 1)
    started = keys.queue_keys("default").started
    db.zadd(started, {f"{request_id}:{item.execution_id}": time.time() - 60})  # its heartbeat lapsed
    pubsub = db.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.ENDED_CHANNEL)
    assert pubsub.get_message(timeout=1) is None  # the subscription is confirmed
    recovery.recover_abandoned(db, [keys.queue_keys("default")], [])
    assert Job.fetch(request_id, connection=db).get_status() == JobStatus.FAILED
    [entry] = sink_log.read(db, "svc", 0, 10)
    assert (entry.request_id, entry.status) == (request_id, "FAILURE")
    assert db.hget(keys.job_key(request_id), keys.SINK_INDEX_FIELD) == str(entry.index).encode()
    message = pubsub.get_message(timeout=5)
    assert message is not None and message["data"].decode() == f"svc {entry.index} {request_id}"
    assert db.hget(keys.METRICS, "ended|svc|FAILURE") == b"1"
    assert db.zscore(keys.OPEN_REQUESTS, request_id) is None
    recovery.recover_abandoned(db, [keys.queue_keys("default")], [])  # once only
    assert len(sink_log.read(db, "svc", 0, 10)) == 1
    pubsub.close()


def test_claimed_executions_get_distinct_ids_of_rqs_shape(redis_server, db, settings, enqueue):
    """One random prefix per claim call, a counter per execution: 32 hex digits, as RQ's uuid4().hex."""
    for _ in range(4):
        enqueue()
    worker = queue_worker(redis_server, settings)
    ids = [item.execution_id for item in claim(worker, 3) + claim(worker, 3)]
    assert len(ids) == len(set(ids)) == 4
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
