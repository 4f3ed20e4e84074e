"""How a prediction request lives in Redis: as an RQ job in RQ's own data model.

The API and the workers share this module. A request is an RQ job (job id = request id) on the queue
`high` or `default`, calling `worker.forward`. Beyond RQ's fields, the job hash carries a few plain fields
of ours, prefixed `eas_`, because Lua scripts must read them atomically (RQ's `meta` is pickled):

  eas_service     the service name, so the sink can refuse another service's id
  eas_expires_at  unix time after which a request that never started ends EXPIRED (absent: never)
  eas_attempts    forwarding attempts so far, counted when an attempt starts (so a killed one counts)
  eas_last_error  why the last attempt failed, shown while the request waits for its retry
  eas_outcome     `canceled` or `expired` for requests that ended without being forwarded

One more structure goes beyond RQ: the sorted set `eas:open` (request id -> accept time) indexes requests
that have not ended. Workers sweep it to find requests that a crash left in no queue and no registry
(see worker.py); it is the one piece of bookkeeping RQ cannot give us.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry
from rq.job import Job, JobStatus, Retry
from rq.queue import Queue
from rq.registry import CanceledJobRegistry, ScheduledJobRegistry
from rq.results import Result
from rq.serializers import DefaultSerializer
from rq.utils import now, utcformat

from settings import Settings

QUEUE_NAMES = ("high", "default")  # strict priority order
FORWARD_FUNCTION = "worker.forward"
OPEN_REQUESTS_KEY = "eas:open"
IDEMPOTENCY_KEY_PREFIX = "eas:idempotency:"
SERVICE_FIELD = "eas_service"
EXPIRES_AT_FIELD = "eas_expires_at"
ATTEMPTS_FIELD = "eas_attempts"
LAST_ERROR_FIELD = "eas_last_error"
OUTCOME_FIELD = "eas_outcome"
REQUEST_ID_PATTERN = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# Extra seconds RQ's job timeout (the hard kill in plain `rq worker`) allows beyond one attempt.
JOB_TIMEOUT_MARGIN = 30


def connect(url: str, timeout: float) -> redis.Redis:
    """A Redis client that fails within about `timeout` seconds when Redis is away and reconnects by itself."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=RedisRetry(NoBackoff(), 1),
        health_check_interval=30,
    )


def queue_key(queue_name: str) -> str:
    return Queue.redis_queue_namespace_prefix + queue_name


# --- submit ---------------------------------------------------------------------------------------

_PER_REQUEST_FIELDS = ("created_at", "enqueued_at", "data", "description")

# One round trip: refuse a duplicate or a full queue, else store the job hash and push its id,
# exactly the writes RQ's Queue.enqueue makes (HSET job, RPUSH queue, SADD rq:queues), plus our index.
_ENQUEUE = """
-- KEYS: 1 queue list, 2 job hash, 3 rq:queues set, 4 open-requests index, 5 idempotency key (optional)
-- ARGV: 1 max queue length, 2 job id, 3 seconds it may wait to start ('': no limit), 4 idempotency value,
--       5 idempotency ttl, 6.. job fields
if KEYS[5] then
  local seen = redis.call('GET', KEYS[5])
  if seen then return {'duplicate', seen} end
end
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then return {'full'} end
local clock = redis.call('TIME')  -- one clock for every host: expiry is judged on it everywhere
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
redis.call('HSET', KEYS[2], unpack(ARGV, 6))
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], 'eas_expires_at', tostring(now + tonumber(ARGV[3]))) end
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[3], KEYS[1])
redis.call('ZADD', KEYS[4], now, ARGV[2])
if KEYS[5] then redis.call('SET', KEYS[5], ARGV[4], 'EX', ARGV[5]) end
return {'queued'}
"""


@dataclass(frozen=True)
class Submission:
    """A validated request to forward."""

    service: str
    subpath: str
    query: tuple[tuple[str, str], ...]
    content_type: str | None
    body: bytes
    priority: bool
    ttl: float | None  # seconds it may wait in the queue; None: no limit
    idempotency_key: str | None


@dataclass(frozen=True)
class Enqueued:
    request_id: str
    outcome: str  # "queued", "duplicate", "conflict" (same key, other request) or "full"


def _compress(data: bytes) -> bytes:
    """zlib, as RQ stores job data, but with a 4 KB window: setting up zlib's default 32 KB window takes
    about 50 us, longer than compressing a typical request. Any zlib stream decompresses the same."""
    packer = zlib.compressobj(6, zlib.DEFLATED, 12, 4)
    return packer.compress(data) + packer.flush()


def _queue_name(submission: Submission) -> str:
    return QUEUE_NAMES[0] if submission.priority else QUEUE_NAMES[1]


def _job_args(submission: Submission) -> tuple:
    """The arguments of worker.forward."""
    return (submission.service, submission.subpath, submission.query, submission.content_type, submission.body)


def _description(submission: Submission) -> str:
    """What the dashboard shows for the job."""
    return f"POST /api/predict/{submission.service}" + (f"/{submission.subpath}" if submission.subpath else "")


def _fingerprint(submission: Submission) -> str:
    digest = hashlib.sha256()
    for part in (submission.subpath, repr(submission.query), submission.content_type or "", str(submission.priority)):
        digest.update(part.encode() + b"\0")
    digest.update(submission.body)
    return digest.hexdigest()


def idempotency_key(service: str, client_key: str) -> str:
    return IDEMPOTENCY_KEY_PREFIX + service + ":" + hashlib.sha256(client_key.encode()).hexdigest()


class Enqueuer:
    """Turns submissions into RQ jobs and enqueues each in one Redis round trip."""

    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        self.connection = connection
        self.settings = settings
        self.script = connection.register_script(_ENQUEUE)
        retries = settings.retry_intervals
        # A retried request goes back to the front of its queue: it has already waited its turn.
        self.retry = Retry(max=len(retries), interval=list(retries), enqueue_at_front=True) if retries else None
        self.job_timeout = int(settings.forward_timeout) + JOB_TIMEOUT_MARGIN
        # What every job of a queue has in common, serialized once by RQ (Job.to_dict); job_fields adds
        # what differs. Building each job through Job.create and to_dict was a fifth of the API's CPU time.
        self.shared_fields = {}
        for name in QUEUE_NAMES:
            template = self.build_job(Submission("s", "", (), None, b"", name == QUEUE_NAMES[0], None, None))
            shared = {k: v for k, v in template.to_dict().items() if v != "" and k not in _PER_REQUEST_FIELDS}
            self.shared_fields[name] = {**shared, "status": JobStatus.QUEUED.value}

    def build_job(self, submission: Submission) -> Job:
        """The RQ job for a submission, built by RQ (the reference that job_fields must match)."""
        job = Job.create(
            FORWARD_FUNCTION,
            args=_job_args(submission),
            connection=self.connection,
            result_ttl=self.settings.result_ttl,
            failure_ttl=self.settings.failure_ttl,
            timeout=self.job_timeout,
            retry=self.retry,
            status=JobStatus.QUEUED,
            origin=_queue_name(submission),
            description=_description(submission),
        )
        job.enqueued_at = job.created_at
        return job

    def job_fields(self, submission: Submission, moment: datetime) -> dict[str, Any]:
        """The hash RQ's Job.save writes for this submission's job (its empty fields left out)."""
        stamp = utcformat(moment)
        return {
            **self.shared_fields[_queue_name(submission)],
            "created_at": stamp,
            "enqueued_at": stamp,
            # RQ's Job.data: its serializer over (function, instance, args, kwargs), zlib-compressed.
            "data": _compress(DefaultSerializer.dumps((FORWARD_FUNCTION, None, _job_args(submission), {}))),
            "description": _description(submission),
        }

    def enqueue(self, submission: Submission) -> Enqueued:
        request_id = str(uuid.uuid4())  # as RQ names jobs
        fields = self.job_fields(submission, now())
        fields[SERVICE_FIELD] = submission.service
        limits = [t for t in (self.settings.queue_ttl or None, submission.ttl) if t]
        keys = [queue_key(_queue_name(submission)), Job.key_for(request_id), Queue.redis_queues_keys, OPEN_REQUESTS_KEY]
        fingerprint = ""
        if submission.idempotency_key is not None:
            keys.append(idempotency_key(submission.service, submission.idempotency_key))
            fingerprint = _fingerprint(submission)
        args: list[Any] = [
            self.settings.max_queue_length,
            request_id,
            repr(min(limits)) if limits else "",
            f"{request_id} {fingerprint}",
            self.settings.result_ttl,
        ]
        for name, value in fields.items():
            args += [name, value]
        answer = self.script(keys=keys, args=args)
        outcome = answer[0].decode()
        if outcome == "duplicate":
            first_id, _, first_fingerprint = answer[1].decode().partition(" ")
            return Enqueued(first_id, "duplicate" if first_fingerprint == fingerprint else "conflict")
        return Enqueued(request_id, outcome)


# --- sink -----------------------------------------------------------------------------------------

_SCHEDULED_KEYS = [ScheduledJobRegistry.key_template.format(name) for name in QUEUE_NAMES]
_VIEW_FIELDS = (
    "status",
    "origin",
    SERVICE_FIELD,
    "enqueued_at",
    "started_at",
    "ended_at",
    EXPIRES_AT_FIELD,
    ATTEMPTS_FIELD,
    LAST_ERROR_FIELD,
    OUTCOME_FIELD,
)


@dataclass(frozen=True)
class RequestState:
    """What the sink reports about one request."""

    request_id: str
    service: str
    status: str  # PENDING, STARTED, RETRY, SUCCESS, FAILURE, CANCELED, EXPIRED
    attempts: int
    enqueued_at: str | None
    started_at: str | None
    ended_at: str | None
    result: Any = None
    error: str | None = None
    retry_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("SUCCESS", "FAILURE", "CANCELED", "EXPIRED")


def _text(value: bytes | None) -> str | None:
    return value.decode() if value else None


def _error_line(exc_string: str | None) -> str:
    """The cause of a failure in one line: the last line of RQ's traceback text, without our class name."""
    lines = [line for line in (exc_string or "").splitlines() if line.strip()]
    if not lines:
        return "failed"
    last = lines[-1].strip()
    if "AbandonedJobError" in last:
        return "the worker forwarding it died and no retries were left (AbandonedJobError)"
    return last.removeprefix("worker.ForwardError: ")


def read_state(connection: redis.Redis, request_id: str) -> RequestState | None:
    """The request's state in one round trip, without loading its body; None if unknown or expired."""
    job_key = Job.key_for(request_id)
    with connection.pipeline(transaction=False) as pipe:
        pipe.hmget(job_key, _VIEW_FIELDS)
        pipe.xrevrange(Result.get_key(request_id), "+", "-", count=1)
        pipe.time()
        for key in _SCHEDULED_KEYS:
            pipe.zscore(key, request_id)
        fields, results, (seconds, micros), *retry_times = pipe.execute()
    raw = dict(zip(_VIEW_FIELDS, fields, strict=False))
    if not raw["status"] or not raw[SERVICE_FIELD]:
        return None
    rq_status = raw["status"].decode()
    attempts = int(raw[ATTEMPTS_FIELD] or 0)
    common = dict(
        request_id=request_id,
        service=raw[SERVICE_FIELD].decode(),
        attempts=attempts,
        enqueued_at=_text(raw["enqueued_at"]),
        started_at=_text(raw["started_at"]),
        ended_at=_text(raw["ended_at"]),
    )
    latest = Result.restore(request_id, results[0][0].decode(), results[0][1], connection) if results else None
    if rq_status == JobStatus.FINISHED and latest and latest.type == Result.Type.SUCCESSFUL:
        return RequestState(status="SUCCESS", result=latest.return_value, **common)
    if rq_status in (JobStatus.FAILED, JobStatus.STOPPED):
        if _text(raw[OUTCOME_FIELD]) == "expired":
            return RequestState(status="EXPIRED", **common)
        return RequestState(status="FAILURE", error=_error_line(latest.exc_string if latest else None), **common)
    if rq_status == JobStatus.CANCELED:
        return RequestState(status="EXPIRED" if _text(raw[OUTCOME_FIELD]) == "expired" else "CANCELED", **common)
    if rq_status == JobStatus.SCHEDULED:
        retry_at = next((float(t) for t in retry_times if t is not None), None)
        return RequestState(status="RETRY", error=_text(raw[LAST_ERROR_FIELD]), retry_at=retry_at, **common)
    if rq_status == JobStatus.STARTED:
        return RequestState(status="STARTED", **common)
    expires_at = float(raw[EXPIRES_AT_FIELD] or 0)
    if attempts == 0 and expires_at and seconds + micros / 1e6 > expires_at:
        return RequestState(status="EXPIRED", **common)
    return RequestState(status="PENDING", error=_text(raw[LAST_ERROR_FIELD]), **common)


# --- cancel ---------------------------------------------------------------------------------------


def cancel(connection: redis.Redis, request_id: str, ttl: int) -> str:
    """Cancels a request that has not started: "canceled", or "running"/"ended"/"unknown" when it cannot be."""
    job_key = Job.key_for(request_id)
    with connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(job_key)
                status = _text(pipe.hget(job_key, "status"))
                if status is None:
                    return "unknown"
                if status == JobStatus.STARTED:
                    return "running"
                if status not in (JobStatus.QUEUED, JobStatus.SCHEDULED):
                    return "ended"
                job = Job.fetch(request_id, connection=connection)
                pipe.multi()
                # RQ's own Job.cancel: out of its queue or the ScheduledJobRegistry, into the Canceled one.
                # It stays readable at the sink for `ttl` seconds, scored in that registry by its expiry.
                job.cancel(pipeline=pipe)
                pipe.hset(job_key, mapping={OUTCOME_FIELD: "canceled", "ended_at": utcformat(now())})
                pipe.expire(job_key, ttl)
                pipe.zadd(CanceledJobRegistry(job.origin, connection=connection).key, {request_id: time.time() + ttl})
                pipe.zrem(OPEN_REQUESTS_KEY, request_id)
                pipe.execute()
                return "canceled"
            except redis.WatchError:
                continue
