"""What RQ workers run.

`forward` is the job function behind every request (its path, `worker.forward`, is pickled into every
queued job); plain `rq worker high default` runs it, one fork per request. `QueueWorker` is the worker
class to run in production (`rq worker -w worker.QueueWorker --config worker high default`): it forwards
many requests at once from one process with pooled connections, claims requests from Redis atomically,
and runs the upkeep of recovery.py, so due retries and dead workers' requests are handled within seconds.

One QueueWorker process: the main thread claims requests (lua/claim.lua) and runs upkeep and heartbeats;
`Forwarders` threads make the HTTP calls; one `Committer` thread records outcomes in batches (outcomes.py).
"""

from __future__ import annotations

import time
import traceback
import uuid
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.executions import Execution
from rq.job import Job, get_current_job
from rq.utils import now, utcformat
from rq.worker import BaseWorker, WorkerStatus

import callbacks
import forwarding
import keys
import lifecycle
import logs
import metrics
import recovery
import redis_connection
import redis_errors
import redis_scripts
import sink_log
from forwarding import Attempt, ModelRequest
from inflight import InFlight, InFlightTable
from outcomes import OutcomeRecorder
from queueing import FORWARD_FUNCTION
from settings import Settings, get_settings
from worker_threads import Committer, Forwarders

# `rq worker --config worker` reads these: the queues in priority order, and Redis as the settings say
# (a redis+sentinel:// URL as RQ's SENTINEL dict, REDIS_URL then None: redis_connection.py).
QUEUES = list(keys.QUEUE_NAMES)
REDIS_URL, SENTINEL = redis_connection.rq_cli_settings(get_settings().redis_url, get_settings().redis_timeout)
# Before `rq worker` sets up RQ's log handler (it adds none when one exists), so that under
# log_format = "json" RQ's own lines are JSON too (logs.py).
logs.configure(get_settings().log_format)


class ForwardError(Exception):
    """An attempt failed; its message is the cause the sink reports."""


def attempt(settings: Settings, request_id: str, request: ModelRequest) -> Attempt:
    """One forwarding attempt, with the worker's settings for the service."""
    target = settings.target_for(request.service)
    return forwarding.send(target, request_id, request, settings.forward_timeout, settings.max_result_bytes)


def forward(
    service: str,
    subpath: str,
    query: forwarding.Query,
    content_type: str | None,
    body: bytes,
    content_encoding: str | None = None,
) -> dict[str, Any]:
    """The RQ job function: forwards one request once. RQ retries it (retry_intervals) when it raises.

    Used as is by plain `rq worker`; QueueWorker does the same steps itself, batched. Jobs queued before
    raw queries and content encodings were forwarded hold five arguments, `query` as (key, value) pairs.
    """
    job = get_current_job()
    assert job is not None, "worker.forward runs inside an RQ worker"
    with job.connection.pipeline() as pipe:
        pipe.hmget(job.key, keys.EXPIRES_AT_FIELD, keys.ATTEMPTS_FIELD)
        pipe.time()
        (expires_at, attempts), time_reply = pipe.execute()
    if lifecycle.has_expired(float(expires_at or 0), int(attempts or 0), lifecycle.clock_seconds(time_reply)):
        # RQ ends a job that raises as FAILED; the sink reports it EXPIRED, by this field (lifecycle.py).
        job.connection.hset(job.key, keys.OUTCOME_FIELD, "expired")
        job.retries_left = 0
        raise ForwardError("expired before it was started")
    job.connection.hincrby(job.key, keys.ATTEMPTS_FIELD, 1)
    request = ModelRequest(service, subpath, query, content_type, body, content_encoding)
    result = attempt(get_settings(), job.id, request)
    if result.result is not None:
        return result.result
    job.connection.hset(job.key, keys.LAST_ERROR_FIELD, result.error or "")
    if not result.retryable:
        job.retries_left = 0  # RQ would otherwise retry any exception
    raise ForwardError(result.error)


# The job fields lua/claim.lua returns: only what forwarding and recording need (parsing RQ's four
# timestamps per job cost more than forwarding it).
CLAIM_FIELDS = ("data", "origin", "retries_left", "retry_intervals", "result_ttl", "failure_ttl")
# Also returned, for the log lines and metrics (logs.py), and kept from RQ's restore, which would parse the time.
LOG_FIELDS = ("eas_attempts", "enqueued_at")


class QueueWorker(BaseWorker):
    """An RQ worker that forwards `worker_concurrency` requests at a time from one process, with no fork
    and no import per request, recording into RQ's own registries, results and retry schedule."""

    heartbeat_ttl = 15  # seconds a claimed request stays "started" without a heartbeat from its worker
    heartbeat_interval = 3.0
    promote_interval = 0.5
    recover_interval = 5.0
    orphan_interval = 5.0
    sink_trim_interval = 60.0  # entries of the sink logs older than result_ttl are dropped this often
    callback_interval = 0.5  # ended requests' webhooks are queued this often (callbacks.py)
    idle_wait = 1.0  # longest blocking wait for new requests, so upkeep keeps its pace
    batch_wait = 0.005  # longest wait for a bigger batch of free slots

    def __init__(self, *args: Any, settings: Settings | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings or get_settings()
        # Redis calls fail fast and are retried by this worker's own loops, never by redis-py behind its
        # back: a claim run twice would take a second batch. RQ sets a 415 s socket timeout for its long
        # BLPOP; ours waits at most `idle_wait`, so a dead link is noticed within seconds.
        self.connection.connection_pool.connection_kwargs.update(
            socket_timeout=10, socket_connect_timeout=5, retry=RedisRetry(NoBackoff(), 0)
        )
        self.connection.connection_pool.disconnect()
        self.queue_keys = [keys.queue_keys(q.name) for q in self.queues]
        self._queue_set = ",".join(q.name for q in self.queue_keys)  # recovery runs once per set of queues
        self.in_flight = InFlightTable(self.settings.worker_concurrency)
        self.schedule = recovery.Schedule()
        self._claim_script = redis_scripts.register(self.connection, "claim")
        self._claim_keys = [keys.OPEN_REQUESTS, self.executions_key, keys.METRICS]
        for q in self.queue_keys:
            self._claim_keys += [q.queue, q.started, q.canceled]
        self._promote_due = recovery.RetryPromoter(self.connection, self.queue_keys)
        self._orphans = recovery.OrphanSweep(self.connection, self.queue_keys, self.log, self.orphan_interval)
        recorder = OutcomeRecorder(self.connection, self.settings, self.name, self.executions_key, self.key)
        self._committer = Committer(recorder, self.in_flight, self.log)
        self._forwarders = Forwarders(self.settings.worker_concurrency, self._attempt, self._committer)

    # -- the work loop ----------------------------------------------------------------------------

    def work(
        self,
        burst: bool = False,
        logging_level: str | None = None,
        date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
        log_format: str = DEFAULT_LOGGING_FORMAT,
        max_jobs: int | None = None,
        max_idle_time: int | None = None,
        with_scheduler: bool = False,  # upkeep always promotes due retries: no separate scheduler
        **_: Any,
    ) -> bool:
        """Claims and forwards requests until stopped (or, with --burst, until the queues are empty)."""
        self._bootstrap(logging_level or "INFO", date_format, log_format)
        self._install_signal_handlers()
        self._committer.start()
        self._forwarders.start()
        started, failures, idle_since = 0, 0, time.monotonic()
        try:
            while not self._stop_requested:
                try:
                    self._upkeep()
                    free = self.in_flight.free_slots(self.batch_wait, self.idle_wait)
                    if max_jobs is not None:
                        free = min(free, max_jobs - started)
                    claimed = self._claim(free) if free > 0 else []
                    if free > 0 and not claimed:
                        if self._idle_enough(burst, max_idle_time, idle_since):
                            break
                        claimed = self._wait_for_request()
                    failures = 0
                except redis.RedisError as error:
                    failures += 1
                    self._after_redis_error(error, failures)
                    continue
                for item in claimed:
                    self._forwarders.put(item)
                if claimed:
                    started += len(claimed)
                    idle_since = time.monotonic()
                if max_jobs is not None and started >= max_jobs:
                    break
        finally:
            self._drain_and_stop()
            self._teardown_quietly()
        return started > 0

    def _idle_enough(self, burst: bool, max_idle_time: float | None, idle_since: float) -> bool:
        """Nothing to claim and nothing in flight: does --burst or --max-idle-time end the loop now?"""
        if len(self.in_flight):
            return False
        return burst or (max_idle_time is not None and time.monotonic() - idle_since > max_idle_time)

    def _after_redis_error(self, error: redis.RedisError, failures: int) -> None:
        """Redis is away, refuses writes, or failed otherwise: wait and try again, however long it takes.
        Heartbeats lapse meanwhile, so heartbeat first and give the other workers time to do the same
        before recovery may treat their requests as abandoned."""
        if redis_errors.passing(error):
            self.log.warning("Worker %s: %s", self.name, redis_errors.describe(error))
        else:
            self.log.exception("Worker %s: Redis error", self.name)
        self.schedule.run_next("heartbeat")
        self.schedule.hold_off(("recover", "orphans"), self.heartbeat_ttl)
        time.sleep(redis_errors.backoff(failures))

    def _bootstrap(self, logging_level: str, date_format: str, log_format: str) -> None:
        """RQ's bootstrap (register, subscribe), after waiting for Redis if it is away or refusing writes."""
        failures = 0
        while True:
            try:
                self.bootstrap(logging_level, date_format, log_format)
                return
            except redis.RedisError as error:
                failures += 1
                self.log.warning("Worker %s: waiting for Redis (%s)", self.name, redis_errors.describe(error))
                time.sleep(redis_errors.backoff(failures))

    # -- claiming ---------------------------------------------------------------------------------

    def _claim(self, count: int, adopted: tuple[int, str] | None = None) -> list[InFlight]:
        """Claims up to `count` requests (plus `adopted`, already popped) in one atomic call."""
        started_at = now()
        clock = time.time()
        args: list[Any] = [count, repr(clock), utcformat(started_at), repr(clock + self.heartbeat_ttl)]
        args += [self.heartbeat_ttl, self.name, self.settings.result_ttl]
        args += [keys.JOB_PREFIX, keys.EXECUTION_PREFIX, keys.EXECUTIONS_REGISTRY_PREFIX]
        args += [keys.SINK_INDEXES, keys.SINK_LOG_PREFIX, keys.ENDED_CHANNEL, keys.CALLBACK_OUTBOX]
        args += [adopted[0] if adopted else 0, adopted[1] if adopted else ""]
        args += [len(CLAIM_FIELDS) + len(LOG_FIELDS), *CLAIM_FIELDS, *LOG_FIELDS]
        args += [uuid.uuid4().hex for _ in range(count + (1 if adopted else 0))]
        claimed = []
        for queue_index, job_id, execution_id, values in self._claim_script(keys=self._claim_keys, args=args):
            job = Job(job_id.decode(), connection=self.connection)
            fields, (attempts, enqueued_at) = values[: len(CLAIM_FIELDS)], values[len(CLAIM_FIELDS) :]
            job.restore({name: value for name, value in zip(CLAIM_FIELDS, fields, strict=True) if value is not None})
            job.started_at = started_at
            execution = Execution(execution_id.decode(), job.id, connection=self.connection, worker_name=self.name)
            execution._job = job
            queue = self.queue_keys[queue_index - 1]
            claimed.append(InFlight(job, queue, execution, int(attempts or 0), enqueued_at and enqueued_at.decode()))
        self.in_flight.add(claimed)
        return claimed

    def _wait_for_request(self) -> list[InFlight]:
        """Blocks until a request arrives (BLPOP keeps the queues' priority order), then claims it."""
        timeout = max(0.01, min(self.idle_wait, self.schedule.next_due(self.idle_wait) - time.monotonic()))
        popped = self.connection.blpop([q.queue for q in self.queue_keys], timeout=timeout)
        if popped is None:
            return []
        key, job_id = popped[0].decode(), popped[1].decode()
        index = next(i for i, q in enumerate(self.queue_keys, start=1) if q.queue == key)
        # Between BLPOP and this claim the id is in no queue; if this process dies right here, the
        # orphan sweep (recovery.py) finds the request and queues it again.
        return self._claim(0, adopted=(index, job_id))

    def _attempt(self, item: InFlight) -> Attempt:
        """One attempt at one request, in a forwarder thread; never raises. Notes its duration and the
        model's status code on `item`, for the metrics and the log."""
        started = time.perf_counter()
        result = self._attempt_once(item.job)
        item.forward_seconds, item.model_code = time.perf_counter() - started, metrics.model_status(result)
        return result

    def _attempt_once(self, job: Job) -> Attempt:
        try:
            if job.func_name == FORWARD_FUNCTION:
                return attempt(self.settings, job.id, ModelRequest(*job.args))
            return Attempt(result=job.perform())  # another job function: run it as RQ would
        except Exception:
            return Attempt(error=traceback.format_exc(), retryable=True)

    # -- upkeep and heartbeats --------------------------------------------------------------------

    def _upkeep(self) -> None:
        if self.schedule.due("heartbeat", self.heartbeat_interval):
            self._heartbeat()
        if self.schedule.due("promote", self.promote_interval):
            self._promote_due()
        if self.schedule.due("recover", self.recover_interval):
            with recovery.exclusive(self.connection, f"recover:{self._queue_set}", self.name) as mine:
                if mine:
                    recovery.recover_abandoned(self.connection, self.queue_keys, self._exc_handlers)
        if self.schedule.due("orphans", self.orphan_interval):
            with recovery.exclusive(self.connection, f"orphans:{self._queue_set}", self.name) as mine:
                if mine:
                    self._orphans.run()
        if self.schedule.due("sink-trim", self.sink_trim_interval):
            with recovery.exclusive(self.connection, "sink-trim", self.name) as mine:
                if mine:
                    sink_log.trim_expired(self.connection, time.time() - self.settings.result_ttl)
        if self.schedule.due("callbacks", self.callback_interval):
            callbacks.run(self.connection, self.settings, self.name)
        if self.schedule.due("maintenance", self.maintenance_interval):
            # RQ's own maintenance, which RQ's work loop would run and ours replaces.
            self.clean_registries()
            recovery.clean_canceled(self.connection, self.queue_keys)

    def _heartbeat(self) -> None:
        deadline = time.time() + self.heartbeat_ttl
        in_flight = self.in_flight.snapshot()
        with self.connection.pipeline(transaction=False) as pipe:
            self.heartbeat(pipeline=pipe)
            self.set_state(WorkerStatus.BUSY if in_flight else WorkerStatus.IDLE, pipeline=pipe)
            for item in in_flight:
                # What RQ's Execution.heartbeat refreshes: the StartedJobRegistry entry, the Execution,
                # and the job's ExecutionRegistry (which the orphan sweep reads), 60 s past the deadline.
                execution, executions_key = item.execution, keys.EXECUTIONS_REGISTRY_PREFIX + item.job.id
                pipe.zadd(item.queue.started, {execution.composite_key: deadline}, xx=True)
                pipe.expire(execution.key, self.heartbeat_ttl)
                pipe.zadd(executions_key, {execution.id: deadline + 60}, xx=True)
                pipe.expire(executions_key, self.heartbeat_ttl + 60)
            pipe.execute()

    # -- start and end ----------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Warm shutdown (SIGTERM, first Ctrl+C): stop claiming, finish what is claimed. Unlike RQ's
        default this never raises inside the loop, so a claim in progress is never lost half-way."""
        self._stop_requested = True

    def _drain_and_stop(self) -> None:
        """Lets claimed requests finish and be recorded, heartbeating meanwhile, then ends the threads."""
        deadline = time.monotonic() + self.settings.forward_timeout + 10
        while len(self.in_flight) and time.monotonic() < deadline:
            if not self.in_flight.wait_until_empty(min(self.heartbeat_interval, deadline - time.monotonic())):
                try:
                    self._heartbeat()
                except redis.RedisError:
                    pass  # recorded outcomes need no heartbeat; the rest are recovered if Redis stays away
        self._forwarders.stop()
        self._committer.stop()
        self._committer.join(timeout=5)

    def _teardown_quietly(self) -> None:
        try:
            self.teardown()
        except redis.RedisError as error:
            self.log.warning(
                "Worker %s: Redis unavailable at shutdown (%s); its registration will expire",
                self.name,
                redis_errors.describe(error),
            )
