"""What RQ workers run.

`forward` is the job function behind every request; plain `rq worker high default` runs it (one fork per
request). `QueueWorker` is the worker class to run in production (`rq worker -w worker.QueueWorker ...`):
it forwards many requests at once from one process with pooled connections, claims requests from Redis
atomically, re-queues due retries itself, and recovers requests whose worker died, within seconds.
"""

from __future__ import annotations

import contextlib
import queue as stdlib_queue
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT, RQ_KEY_PREFIX
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus, get_current_job
from rq.queue import Queue
from rq.registry import StartedJobRegistry
from rq.results import Result
from rq.utils import now, utcformat
from rq.worker import BaseWorker, WorkerStatus

import forwarding
from queueing import (
    ATTEMPTS_FIELD,
    EXPIRES_AT_FIELD,
    FORWARD_FUNCTION,
    LAST_ERROR_FIELD,
    OPEN_REQUESTS_KEY,
    OUTCOME_FIELD,
    QUEUE_NAMES,
)
from settings import get_settings

ORPHAN_SUSPECTS_KEY = "eas:orphan-suspects"
EXECUTION_KEY_PREFIX = RQ_KEY_PREFIX + ":execution:"  # rq.executions.Execution.key
EXECUTIONS_REGISTRY_PREFIX = ExecutionRegistry.key_template.format("")  # one per job

# `rq worker -c worker` reads these: the queues in priority order, and Redis as the settings say.
QUEUES = list(QUEUE_NAMES)
REDIS_URL = get_settings().redis_url


def backoff(failures: int) -> float:
    """Seconds to wait after `failures` failures in a row: 0.25, 0.5, 1, then 2 at most."""
    return min(0.125 * 2**failures, 2.0)


class ForwardError(Exception):
    """An attempt failed; its message is the cause the sink reports."""


def forward(
    service: str, subpath: str, query: tuple[tuple[str, str], ...], content_type: str | None, body: bytes
) -> dict[str, Any]:
    """The RQ job function: forwards one request once. RQ retries it (retry_intervals) when it raises.

    Used as is by plain `rq worker`; QueueWorker does the same steps itself, batched.
    """
    job = get_current_job()
    assert job is not None, "worker.forward runs inside an RQ worker"
    settings = get_settings()
    with job.connection.pipeline() as pipe:
        pipe.hmget(job.key, EXPIRES_AT_FIELD, ATTEMPTS_FIELD)
        pipe.time()
        (expires_at, attempts), (seconds, micros) = pipe.execute()
    if not attempts and expires_at and seconds + micros / 1e6 > float(expires_at):
        # RQ ends a job that raises as FAILED; the sink reports it EXPIRED, by this field.
        job.connection.hset(job.key, OUTCOME_FIELD, "expired")
        job.retries_left = 0
        raise ForwardError("expired before it was started")
    job.connection.hincrby(job.key, ATTEMPTS_FIELD, 1)
    attempt = forwarding.send(
        settings.target_for(service), job.id, service, subpath, query, content_type, body, settings.forward_timeout
    )
    if attempt.result is not None:
        return attempt.result
    job.connection.hset(job.key, LAST_ERROR_FIELD, attempt.error or "")
    if not attempt.retryable:
        job.retries_left = 0  # RQ would otherwise retry any exception
    raise ForwardError(attempt.error)


# --- QueueWorker ----------------------------------------------------------------------------------

# Claims up to ARGV[1] queued requests, strictly in the order of the queues in KEYS, and records each as
# started (RQ status, StartedJobRegistry entry, Execution) in the same atomic step: no request is ever
# popped without a trace (the gap of rq issue 1716). A request whose queue deadline passed ends EXPIRED
# here, unforwarded. Returns {queue index, job id, execution id, the CLAIM_FIELDS of the job} per claimed
# request: only what forwarding needs (parsing RQ's four timestamps per job cost more than forwarding).
CLAIM_FIELDS = ("data", "origin", "retries_left", "retry_intervals", "result_ttl", "failure_ttl")
_CLAIM = """
-- KEYS: 1 open-requests index, 2 worker's execution set, then per queue: list, StartedJobRegistry, CanceledJobRegistry
-- ARGV: 1 how many, 2 now (unix), 3 now (RQ text), 4 heartbeat deadline, 5 heartbeat ttl, 6 worker name,
--       7 ttl of expired requests, 8 job key prefix, 9 execution key prefix, 10 executions registry prefix,
--       11 adopted queue index (0: none), 12 adopted job id, 13.. fresh execution ids
local want = tonumber(ARGV[1])
local ttl, expired_ttl = tonumber(ARGV[5]), tonumber(ARGV[7])
local clock = redis.call('TIME')  -- expiry is judged on Redis's clock, as the API and the sink judge it
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local next_execution = 13
local claimed = {}

local function take(q, id)
  local wip, canceled = KEYS[3 * q + 1], KEYS[3 * q + 2]
  local job_key = ARGV[8] .. id
  local state = redis.call('HMGET', job_key, 'status', 'eas_expires_at', 'eas_attempts')
  if state[1] ~= 'queued' then return end  -- canceled, deleted or already taken: skip
  local expires_at = tonumber(state[2])
  if expires_at and (tonumber(state[3]) or 0) == 0 and now > expires_at then
    redis.call('HSET', job_key, 'status', 'canceled', 'eas_outcome', 'expired', 'ended_at', ARGV[3])
    redis.call('EXPIRE', job_key, expired_ttl)
    redis.call('ZADD', canceled, now + expired_ttl, id)
    redis.call('ZREM', KEYS[1], id)
    return
  end
  local execution_id = ARGV[next_execution]
  next_execution = next_execution + 1
  local composite = id .. ':' .. execution_id
  redis.call('HSET', job_key, 'status', 'started', 'started_at', ARGV[3], 'last_heartbeat', ARGV[3],
             'worker_name', ARGV[6])
  redis.call('HINCRBY', job_key, 'eas_attempts', 1)
  redis.call('PERSIST', job_key)  -- as RQ does when a job starts (one requeued from failed has a ttl)
  redis.call('ZADD', wip, ARGV[4], composite)
  local execution_key = ARGV[9] .. composite
  redis.call('HSET', execution_key, 'id', execution_id, 'job_id', id, 'created_at', ARGV[2],
             'last_heartbeat', ARGV[2], 'worker_name', ARGV[6])
  redis.call('EXPIRE', execution_key, ttl)
  redis.call('ZADD', ARGV[10] .. id, tonumber(ARGV[4]) + 60, execution_id)
  redis.call('EXPIRE', ARGV[10] .. id, ttl + 60)
  redis.call('SADD', KEYS[2], composite)
  claimed[#claimed + 1] = {q, id, execution_id, redis.call('HMGET', job_key, CLAIM_FIELDS)}
end

local adopted = tonumber(ARGV[11])
if adopted > 0 then take(adopted, ARGV[12]) end
for q = 1, (#KEYS - 2) / 3 do
  while #claimed < want do
    local ids = redis.call('LPOP', KEYS[3 * q], want - #claimed)
    if not ids then break end
    for _, id in ipairs(ids) do take(q, id) end
  end
end
return claimed
""".replace("CLAIM_FIELDS", ", ".join(f"'{name}'" for name in CLAIM_FIELDS))

# Records a batch of outcomes, each as RQ's worker records it: status and end time; the registry it moves
# to (Finished, Failed, or Scheduled to wait for a retry); a Result stream entry (success or failure);
# the job's and result's expiry; the Execution removed; plus our index. One call instead of RQ's ten
# pipelined commands per request, and atomic, which RQ's Job.retry is not (it writes the status first).
# Only the worker that still holds a request (its StartedJobRegistry entry) may record it: if its
# heartbeat lapsed, recovery has retried or failed the request, and a late outcome must not undo that.
_RECORD_OUTCOMES = """
-- KEYS: 1 open-requests index, 2 worker's execution set, 3 worker hash
-- ARGV: 1 now (RQ text), 2 job key prefix, 3 results key prefix, 4 execution key prefix, 5 executions
--       registry prefix, then per request: status (finished, scheduled or failed), job id, execution id,
--       StartedJobRegistry key, the registry it moves to, its score there, ttl of job and result (0: keep),
--       last error ('': none), retries left ('': keep), result field count n, then n field/value pairs
local i, finished, failed, stale = 6, 0, 0, 0
while i <= #ARGV do
  local status, id, execution, wip, registry = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local score, ttl, last_error, retries = ARGV[i + 5], tonumber(ARGV[i + 6]), ARGV[i + 7], ARGV[i + 8]
  local fields = tonumber(ARGV[i + 9])
  local composite = id .. ':' .. execution
  if redis.call('ZREM', wip, composite) == 1 then
    local job_key = ARGV[2] .. id
    redis.call('HSET', job_key, 'status', status, 'ended_at', ARGV[1])
    if last_error ~= '' then redis.call('HSET', job_key, 'eas_last_error', last_error) end
    if retries ~= '' then redis.call('HSET', job_key, 'retries_left', retries) end
    redis.call('ZADD', registry, score, id)
    if fields > 0 then
      local results = ARGV[3] .. id
      redis.call('XADD', results, 'MAXLEN', 10, '*', unpack(ARGV, i + 10, i + 9 + 2 * fields))
      redis.call('EXPIRE', results, ttl)
    end
    if ttl > 0 then redis.call('EXPIRE', job_key, ttl) end
    if status ~= 'scheduled' then redis.call('ZREM', KEYS[1], id) end
    if status == 'finished' then finished = finished + 1 else failed = failed + 1 end
  else
    stale = stale + 1
  end
  redis.call('DEL', ARGV[4] .. composite)
  redis.call('ZREM', ARGV[5] .. id, execution)
  redis.call('SREM', KEYS[2], composite)
  i = i + 10 + 2 * fields
end
redis.call('HINCRBY', KEYS[3], 'successful_job_count', finished)
redis.call('HINCRBY', KEYS[3], 'failed_job_count', failed)
return stale
"""

# Moves retries whose wait is over from RQ's ScheduledJobRegistry back onto their queue, atomically,
# so a request canceled meanwhile (status no longer `scheduled`) is never re-queued.
_PROMOTE_DUE = """
-- KEYS: per queue: ScheduledJobRegistry, list.  ARGV: 1 now (unix), 2 job key prefix
local moved = 0
for q = 1, #KEYS / 2 do
  local registry, list = KEYS[2 * q - 1], KEYS[2 * q]
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', registry, '-inf', ARGV[1], 'LIMIT', 0, 1000)) do
    local job_key = ARGV[2] .. id
    if redis.call('HGET', job_key, 'status') == 'scheduled' then
      redis.call('HSET', job_key, 'status', 'queued')
      if redis.call('HGET', job_key, 'enqueue_at_front_on_retry') == '1' then
        redis.call('LPUSH', list, id)
      else
        redis.call('RPUSH', list, id)
      end
      moved = moved + 1
    end
    redis.call('ZREM', registry, id)
  end
end
return moved
"""

# Puts a request that a crash left outside every queue and registry back at the front of its queue, after
# checking again, atomically, that it is still where the sweep found it: `queued` but in no queue,
# `scheduled` but not in the ScheduledJobRegistry, or `started` with no live Execution.
_REQUEUE_ORPHAN = """
-- KEYS: 1 job hash, 2 queue list, 3 ScheduledJobRegistry, 4 the job's executions registry.  ARGV: 1 job id, 2 status
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= ARGV[2] then return 0 end
if status == 'queued' and redis.call('LPOS', KEYS[2], ARGV[1]) then return 0 end
if status == 'scheduled' and redis.call('ZSCORE', KEYS[3], ARGV[1]) then return 0 end
if status == 'started' and redis.call('ZCARD', KEYS[4]) > 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('LPUSH', KEYS[2], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Registries:
    """The keys of one queue's RQ registries."""

    started: str
    finished: str
    failed: str
    scheduled: str
    canceled: str


@dataclass
class InFlight:
    """A request this worker has claimed and not yet committed."""

    job: Job
    queue: Queue
    execution: Execution


class QueueWorker(BaseWorker):
    """An RQ worker that forwards `worker_concurrency` requests at a time from one process.

    Threads do the HTTP calls; the main thread claims requests (strict priority, atomically recorded as
    started) and keeps heartbeats; one committer thread records outcomes in batches, one Lua call each,
    into RQ's own registries, results and retry schedule. No fork and no import per job. It also does the
    upkeep that stock RQ leaves to `--with-scheduler` and a 10-minute maintenance cycle: due retries are
    re-queued within a second, and requests of a dead worker are retried once their heartbeat lapses.
    """

    heartbeat_ttl = 15  # seconds a claimed request stays "started" without a heartbeat from its worker
    heartbeat_interval = 3.0
    promote_interval = 0.5
    recover_interval = 5.0
    orphan_interval = 5.0
    orphan_age = 10.0  # seconds an accepted request must be old before it can count as lost
    orphan_batch = 1000  # open requests examined per sweep
    idle_wait = 1.0  # longest blocking wait for new requests, so upkeep keeps its pace
    batch_wait = 0.005  # longest wait for a bigger batch of free slots
    commit_batch = 256
    commit_attempts = 30  # tries at recording outcomes that Redis refuses (not: cannot be reached)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = get_settings()
        self.concurrency = self.settings.worker_concurrency
        # Redis calls fail fast and are retried by this worker's own loops, never by redis-py behind its
        # back: a claim run twice would take a second batch. RQ sets a 415 s socket timeout for its long
        # BLPOP; ours waits at most `idle_wait`, so a dead link is noticed within seconds.
        self.connection.connection_pool.connection_kwargs.update(
            socket_timeout=10, socket_connect_timeout=5, retry=RedisRetry(NoBackoff(), 0)
        )
        self.connection.connection_pool.disconnect()
        self._claim = self.connection.register_script(_CLAIM)
        self._record = self.connection.register_script(_RECORD_OUTCOMES)
        self._promote = self.connection.register_script(_PROMOTE_DUE)
        self._requeue_orphan = self.connection.register_script(_REQUEUE_ORPHAN)
        self._in_flight: dict[str, InFlight] = {}
        self._slots = threading.Condition()
        self._outcomes: stdlib_queue.SimpleQueue = stdlib_queue.SimpleQueue()
        self._queues_by_index = {i + 1: q for i, q in enumerate(self.queues)}
        # Registry keys per queue, worked out once: RQ builds a registry object for each lookup.
        self._claim_keys = [OPEN_REQUESTS_KEY, self.executions_key]
        self._registries: dict[str, Registries] = {}
        for q in self.queues:
            registries = Registries(
                q.started_job_registry.key,
                q.finished_job_registry.key,
                q.failed_job_registry.key,
                q.scheduled_job_registry.key,
                q.canceled_job_registry.key,
            )
            self._claim_keys += [q.key, registries.started, registries.canceled]
            self._registries[q.name] = registries
        self._due: dict[str, float] = {}
        self._threads: list[threading.Thread] = []

    # -- the work loop ----------------------------------------------------------------------------

    def work(
        self,
        burst: bool = False,
        logging_level: str | None = None,
        date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
        log_format: str = DEFAULT_LOGGING_FORMAT,
        max_jobs: int | None = None,
        max_idle_time: int | None = None,
        with_scheduler: bool = False,
        **_: Any,
    ) -> bool:
        """Claims and forwards requests until stopped (or, with --burst, until the queues are empty)."""
        self._bootstrap(logging_level or "INFO", date_format, log_format)
        self._install_signal_handlers()
        self._start_threads()
        started = 0
        idle_since = time.monotonic()
        failures = 0
        try:
            while not self._stop_requested:
                try:
                    self._upkeep()
                    free = self._free_slots()
                    if free == 0:
                        continue
                    if max_jobs is not None:
                        free = min(free, max_jobs - started)
                    claimed = self._claim_requests(free)
                    if not claimed:
                        if burst and not self._in_flight:
                            break
                        if max_idle_time is not None and not self._in_flight:
                            if time.monotonic() - idle_since > max_idle_time:
                                break
                        claimed = self._wait_for_request()
                    else:
                        idle_since = time.monotonic()
                    for item in claimed:
                        self._pool.put(item)
                    started += len(claimed)
                    if max_jobs is not None and started >= max_jobs:
                        break
                    failures = 0
                except (redis.ConnectionError, redis.TimeoutError) as error:
                    failures += 1
                    self.log.warning("Worker %s: Redis unavailable (%s)", self.name, error)
                    self._after_redis_outage()
                    time.sleep(backoff(failures))
        finally:
            self._drain_and_stop()
            self._teardown_quietly()
        return started > 0

    def _bootstrap(self, logging_level: str, date_format: str, log_format: str) -> None:
        """RQ's bootstrap (register, subscribe), after waiting for Redis if it is away at this moment."""
        failures = 0
        while True:
            try:
                self.connection.ping()
                break
            except (redis.ConnectionError, redis.TimeoutError) as error:
                failures += 1
                self.log.warning("Worker %s: waiting for Redis (%s)", self.name, error)
                time.sleep(backoff(failures))
        self.bootstrap(logging_level, date_format, log_format)

    def _free_slots(self) -> int:
        """How many more requests to claim now. While some are in flight, waits up to `batch_wait` for a
        quarter of the slots to be free: each claim is a round trip, so a few at a time costs CPU."""
        with self._slots:
            if len(self._in_flight) >= self.concurrency:
                self._slots.wait(timeout=self.idle_wait)
            if self._in_flight:
                batch = max(1, self.concurrency // 4)
                self._slots.wait_for(lambda: self.concurrency - len(self._in_flight) >= batch, self.batch_wait)
            return self.concurrency - len(self._in_flight)

    def _claim_requests(self, count: int, adopted: tuple[int, str] | None = None) -> list[InFlight]:
        """Claims up to `count` requests (plus `adopted`, already popped) in one atomic Redis call."""
        moment = now()
        stamp = time.time()
        execution_ids = [uuid.uuid4().hex for _ in range(count)]
        args = [
            count,
            repr(stamp),
            utcformat(moment),
            repr(stamp + self.heartbeat_ttl),
            self.heartbeat_ttl,
            self.name,
            self.settings.result_ttl,
            Job.redis_job_namespace_prefix,
            EXECUTION_KEY_PREFIX,
            EXECUTIONS_REGISTRY_PREFIX,
            adopted[0] if adopted else 0,
            adopted[1] if adopted else "",
            *execution_ids,
        ]
        claimed = []
        for queue_index, job_id, execution_id, values in self._claim(keys=self._claim_keys, args=args):
            job = Job(job_id.decode(), connection=self.connection)
            job.restore({name: value for name, value in zip(CLAIM_FIELDS, values, strict=True) if value is not None})
            job.started_at = moment
            execution = Execution(execution_id.decode(), job.id, connection=self.connection, worker_name=self.name)
            execution._job = job
            item = InFlight(job, self._queues_by_index[queue_index], execution)
            claimed.append(item)
        with self._slots:
            for item in claimed:
                self._in_flight[item.job.id] = item
        return claimed

    def _wait_for_request(self) -> list[InFlight]:
        """Blocks until a request arrives (BLPOP keeps the queues' priority order), then claims it."""
        timeout = max(0.01, min(self.idle_wait, self._next_due() - time.monotonic()))
        popped = self.connection.blpop([q.key for q in self.queues], timeout=timeout)
        if popped is None:
            return []
        key, job_id = popped[0].decode(), popped[1].decode()
        index = next(i for i, q in self._queues_by_index.items() if q.key == key)
        # Between BLPOP and this claim the id is in no queue; if this process dies right here, the
        # orphan sweep (_recover_orphans) finds the request and queues it again.
        return self._claim_requests(1, adopted=(index, job_id))

    # -- threads: forwarding and committing ------------------------------------------------------

    def _start_threads(self) -> None:
        self._pool: stdlib_queue.SimpleQueue = stdlib_queue.SimpleQueue()
        for n in range(self.concurrency):
            self._threads.append(threading.Thread(target=self._forward_loop, name=f"forward-{n}", daemon=True))
        self._committer = threading.Thread(target=self._commit_loop, name="commit", daemon=True)
        for thread in [*self._threads, self._committer]:
            thread.start()

    def _forward_loop(self) -> None:
        while True:
            item = self._pool.get()
            if item is None:
                return
            self._outcomes.put((item, self._run(item.job)))

    def _run(self, job: Job) -> forwarding.Attempt:
        """One attempt at one request; never raises."""
        try:
            if job.func_name == FORWARD_FUNCTION:
                service, subpath, query, content_type, body = job.args
                return forwarding.send(
                    self.settings.target_for(service),
                    job.id,
                    service,
                    subpath,
                    query,
                    content_type,
                    body,
                    self.settings.forward_timeout,
                )
            return forwarding.Attempt(result=job.perform())  # another job function: run it as RQ would
        except Exception:
            return forwarding.Attempt(error=traceback.format_exc(), retryable=True)

    def _commit_loop(self) -> None:
        while True:
            first = self._outcomes.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.commit_batch:
                try:
                    nxt = self._outcomes.get_nowait()
                except stdlib_queue.Empty:
                    break
                if nxt is None:
                    self._outcomes.put(None)
                    break
                batch.append(nxt)
            tries = refused = 0
            while True:
                try:
                    self._commit(batch)
                    break
                except (redis.ConnectionError, redis.TimeoutError) as error:
                    # Redis away: keep the outcomes until it is back (recording twice is harmless).
                    self.log.warning("Worker %s: cannot record %d outcomes yet (%s)", self.name, len(batch), error)
                except Exception:
                    # Redis refusing (READONLY after a failover, out of memory...): keep trying for a while,
                    # then let go; without heartbeats, recovery retries these requests.
                    refused += 1
                    self.log.exception("Worker %s: recording %d outcomes failed", self.name, len(batch))
                    if refused >= self.commit_attempts:
                        break
                tries += 1
                time.sleep(backoff(tries))
            with self._slots:
                for item, _ in batch:
                    self._in_flight.pop(item.job.id, None)
                self._slots.notify_all()

    def _commit(self, batch: list[tuple[InFlight, forwarding.Attempt]]) -> None:
        """Records a batch of outcomes in one atomic call (_RECORD_OUTCOMES); safe to repeat."""
        stamp, ended_at = time.time(), now()
        args: list[Any] = [utcformat(ended_at), Job.redis_job_namespace_prefix, Result.get_key("")]
        args += [EXECUTION_KEY_PREFIX, EXECUTIONS_REGISTRY_PREFIX]
        for item, attempt in batch:
            status, registry, score, ttl, last_error, retries, result = self._outcome(item, attempt, stamp, ended_at)
            started = self._registries[item.queue.name].started
            args += [status.value, item.job.id, item.execution.id, started, registry, score, ttl, last_error]
            args += [retries, len(result), *(part for pair in result.items() for part in pair)]
        stale = self._record(keys=[OPEN_REQUESTS_KEY, self.executions_key, self.key], args=args)
        if stale:
            self.log.warning("Worker %s: %d outcomes came after recovery had taken their requests", self.name, stale)

    def _outcome(self, item: InFlight, attempt: forwarding.Attempt, stamp: float, ended_at: datetime) -> tuple:
        """What to record: (status, registry it moves to, its score there, ttl, last error, retries left,
        Result entry), as RQ's worker would for a success, a retry and a failure."""
        job, registries = item.job, self._registries[item.queue.name]
        if attempt.result is not None:
            ttl = job.result_ttl or self.settings.result_ttl
            result = self._result(item, Result.Type.SUCCESSFUL, ended_at, return_value=attempt.result)
            return JobStatus.FINISHED, registries.finished, stamp + ttl, ttl, "", "", result
        error = (attempt.error or "failed").strip()
        last_error = error.splitlines()[-1]
        if attempt.retryable and job.retries_left:
            # RQ's retry: wait the next of retry_intervals in the ScheduledJobRegistry.
            wait = job.get_retry_interval()
            return JobStatus.SCHEDULED, registries.scheduled, stamp + wait, 0, last_error, job.retries_left - 1, {}
        ttl = job.failure_ttl or self.settings.failure_ttl
        result = self._result(item, Result.Type.FAILED, ended_at, exc_string=error)
        return JobStatus.FAILED, registries.failed, stamp + ttl, ttl, last_error, "", result

    def _result(self, item: InFlight, kind: Result.Type, ended_at: datetime, **outcome: Any) -> dict[str, Any]:
        """The fields of RQ's Result stream entry for this attempt."""
        return Result(
            item.job.id,
            kind,
            self.connection,
            worker_name=self.name,
            serializer=item.job.serializer,
            execution_id=item.execution.id,
            execution_started_at=item.execution.created_at,
            execution_ended_at=ended_at,
            **outcome,
        ).serialize()

    def _drain_and_stop(self) -> None:
        """Warm shutdown: lets claimed requests finish and be recorded before the threads end."""
        deadline = time.monotonic() + self.settings.forward_timeout + 10
        with self._slots:
            while self._in_flight and time.monotonic() < deadline:
                self._slots.wait(timeout=0.5)
        for _ in self._threads:
            self._pool.put(None)
        self._outcomes.put(None)

    # -- upkeep: heartbeats, due retries, recovery ------------------------------------------------

    def _next_due(self) -> float:
        return min(self._due.values(), default=time.monotonic() + self.idle_wait)

    def _every(self, name: str, interval: float) -> bool:
        moment = time.monotonic()
        if moment < self._due.get(name, 0):
            return False
        self._due[name] = moment + interval
        return True

    def _upkeep(self) -> None:
        if self._every("heartbeat", self.heartbeat_interval):
            self._heartbeat()
        if self._every("promote", self.promote_interval):
            self._promote(
                keys=[k for q in self.queues for k in (self._registries[q.name].scheduled, q.key)],
                args=[time.time(), Job.redis_job_namespace_prefix],
            )
        if self._every("recover", self.recover_interval):
            with self._lock("recover") as mine:
                for q in self.queues if mine else ():
                    # RQ's own recovery: a started request whose heartbeat lapsed is retried (if it has
                    # retries left) or failed. Stock RQ runs this every 10 minutes; we run it every 5 s.
                    StartedJobRegistry(q.name, connection=self.connection).cleanup(
                        exception_handlers=self._exc_handlers
                    )
        if self._every("orphans", self.orphan_interval):
            with self._lock("orphans") as mine:
                if mine:
                    self._recover_orphans()
        if self._every("maintenance", self.maintenance_interval):
            # RQ's own maintenance (expired entries of every registry, dead workers, stuck intermediate
            # queues), which RQ's work loop would run and ours replaces; plus the canceled registry,
            # whose entries we score by expiry.
            self.clean_registries()
            for q in self.queues:
                self.connection.zremrangebyscore(self._registries[q.name].canceled, 0, time.time())

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[bool]:
        """One worker at a time does each recovery task; yields whether this one holds the lock."""
        key = f"eas:lock:{name}"
        mine = bool(self.connection.set(key, self.name, nx=True, ex=60))
        try:
            yield mine
        finally:
            if mine:
                self.connection.delete(key)

    def _after_redis_outage(self) -> None:
        """Every worker's heartbeats lapsed while Redis was away. Heartbeat first, and give the other
        workers time to do the same before recovery may treat their requests as abandoned."""
        self._due["heartbeat"] = 0
        self._due["recover"] = self._due["orphans"] = time.monotonic() + self.heartbeat_ttl

    def _heartbeat(self) -> None:
        deadline = time.time() + self.heartbeat_ttl
        with self._slots:
            in_flight = list(self._in_flight.values())
        with self.connection.pipeline(transaction=False) as pipe:
            self.heartbeat(pipeline=pipe)
            self.set_state(WorkerStatus.BUSY if in_flight else WorkerStatus.IDLE, pipeline=pipe)
            for item in in_flight:
                # What RQ's Execution.heartbeat refreshes: the StartedJobRegistry entry, the Execution,
                # and the job's ExecutionRegistry (which the orphan sweep reads).
                execution, executions_key = item.execution, EXECUTIONS_REGISTRY_PREFIX + item.job.id
                pipe.zadd(self._registries[item.queue.name].started, {execution.composite_key: deadline}, xx=True)
                pipe.expire(execution.key, self.heartbeat_ttl)
                pipe.zadd(executions_key, {execution.id: deadline + 60}, xx=True)
                pipe.expire(executions_key, self.heartbeat_ttl + 60)
            pipe.execute()

    def _recover_orphans(self) -> None:
        """Re-queues requests that a crash left outside every queue and registry: `queued` but in no queue
        (popped by a worker that died before recording it: stock RQ's multi-queue BLPOP, rq issue 1716),
        `scheduled` but not waiting in the ScheduledJobRegistry, or `started` with no live Execution
        (RQ wrote the status and died before the rest). A request must look lost on two sweeps in a row,
        `orphan_interval` apart, before it is re-queued; requests that have ended leave the index."""
        seconds, micros = self.connection.time()  # the clock the index was written with
        cutoff = seconds + micros / 1e6 - self.orphan_age
        # The oldest open requests only: with a backlog those are queued at the front of their queue, and
        # a lost one is examined once the requests older than it have ended.
        oldest = self.connection.zrangebyscore(OPEN_REQUESTS_KEY, "-inf", cutoff, 0, self.orphan_batch)
        ids = [i.decode() for i in oldest]
        if not ids:
            return
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(Job.key_for(job_id), "status", "origin")
            states = pipe.execute()
        queues = {q.name: q for q in self.queues}
        ended, open_ = [], {}
        for job_id, (status, origin) in zip(ids, states, strict=True):
            if status is None or status.decode() in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED):
                ended.append(job_id)
            elif origin and origin.decode() in queues:
                open_[job_id] = (status.decode(), queues[origin.decode()])
        if ended:
            self.connection.zrem(OPEN_REQUESTS_KEY, *ended)
        with self.connection.pipeline(transaction=False) as pipe:
            for q in self.queues:
                pipe.lrange(q.key, 0, -1)
                pipe.lrange(q.intermediate_queue_key, 0, -1)
            waiting = {i.decode() for ids_in_list in pipe.execute() for i in ids_in_list}
            for job_id, (_, q) in open_.items():
                pipe.zscore(self._registries[q.name].scheduled, job_id)
                pipe.zcard(EXECUTIONS_REGISTRY_PREFIX + job_id)
            found = pipe.execute()
        suspects = set()
        for (job_id, (status, _)), retry_at, executions in zip(open_.items(), found[::2], found[1::2], strict=True):
            lost = (
                (status == JobStatus.QUEUED and job_id not in waiting)
                or (status == JobStatus.SCHEDULED and retry_at is None)
                or (status == JobStatus.STARTED and not executions)
            )
            if lost:
                suspects.add(f"{job_id}:{status}")
        # The previous sweep's suspects live in Redis, since the next sweep may run in another worker.
        with self.connection.pipeline() as pipe:
            pipe.smembers(ORPHAN_SUSPECTS_KEY)
            pipe.delete(ORPHAN_SUSPECTS_KEY)
            if suspects:
                pipe.sadd(ORPHAN_SUSPECTS_KEY, *suspects)
                pipe.expire(ORPHAN_SUSPECTS_KEY, int(self.orphan_interval * 3))
            previous = {i.decode() for i in pipe.execute()[0]}
        for suspect in suspects & previous:
            job_id, status = suspect.split(":")
            q = open_[job_id][1]
            keys = [Job.key_for(job_id), q.key, self._registries[q.name].scheduled, EXECUTIONS_REGISTRY_PREFIX + job_id]
            if self._requeue_orphan(keys=keys, args=[job_id, status]):
                self.log.warning(
                    "Worker %s: request %s (%s) was in no queue; queued it again", self.name, job_id, status
                )

    # -- start and end ----------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Warm shutdown (SIGTERM, first Ctrl+C): stop claiming, finish what is claimed. Unlike RQ's
        default this never raises inside the loop, so a claim in progress is never lost half-way."""
        self._stop_requested = True

    def _teardown_quietly(self) -> None:
        try:
            self.teardown()
        except (redis.ConnectionError, redis.TimeoutError):
            self.log.warning("Worker %s: Redis unavailable at shutdown; its registration will expire", self.name)
