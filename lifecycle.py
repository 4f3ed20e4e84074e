"""The life of a request: its statuses, when it expires, and how its RQ job reads at the sink.

A request is an RQ job (queueing.py). The sink reports it in its own words, mapped from RQ's status:

  RQ queued                    PENDING   (EXPIRED once its queue deadline passes unstarted)
  RQ started                   STARTED
  RQ scheduled                 RETRY     (waiting in the ScheduledJobRegistry for its next attempt)
  RQ finished                  SUCCESS
  RQ failed or stopped         FAILURE   (EXPIRED when `eas_outcome` says so: plain `rq worker` path)
  RQ canceled                  CANCELED  (EXPIRED when `eas_outcome` says so: QueueWorker's claim)

An expired request ends canceled when QueueWorker's claim finds it and failed under plain `rq worker`:
RQ's fork worker records the end of every job function itself, as finished or failed, so a job
function cannot end its own job canceled. The sink reads both as EXPIRED.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

import redis
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry
from rq.results import Result
from rq.utils import now, utcformat

import forwarding
import keys
import redis_scripts


class RequestStatus(StrEnum):
    PENDING = "PENDING"
    STARTED = "STARTED"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"

    @property
    def ended(self) -> bool:
        return self in _ENDED

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_ENDED = frozenset({RequestStatus.SUCCESS, RequestStatus.FAILURE, RequestStatus.CANCELED, RequestStatus.EXPIRED})
_MESSAGES = {
    RequestStatus.PENDING: "Request is queued.",
    RequestStatus.STARTED: "Request is being forwarded to the model.",
    RequestStatus.RETRY: "The last attempt failed; the request waits for its next attempt.",
    RequestStatus.SUCCESS: "Task completed successfully.",
    RequestStatus.FAILURE: "Task failed.",
    RequestStatus.CANCELED: "Request was canceled before it was forwarded.",
    RequestStatus.EXPIRED: "Request waited longer than its queue TTL and was never forwarded.",
}

# The RQ statuses of a request that has ended: the sink and the orphan sweep both use this one list.
RQ_ENDED_STATUSES = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED})

CancelOutcome = Literal["canceled", "running", "ended", "unknown"]


def clock_seconds(time_reply: tuple[int, int]) -> float:
    """Redis's TIME reply as unix seconds. Expiry and the open index are judged on Redis's clock, the one
    clock every host shares."""
    seconds, micros = time_reply
    return seconds + micros / 1e6


def has_expired(expires_at: float | None, attempts: int, clock: float) -> bool:
    """A request expires when it was never started and its queue deadline has passed.

    lua/claim.lua applies the same rule atomically as a worker claims a request."""
    return attempts == 0 and expires_at is not None and 0 < expires_at < clock


def iso(moment: float | None) -> str | None:
    """A unix time in the format of RQ's own timestamps (enqueued_at and the others)."""
    return utcformat(datetime.fromtimestamp(moment, tz=UTC)) if moment else None


@dataclass(frozen=True)
class RequestState:
    """What the sink reports about one request."""

    request_id: str
    service: str
    status: RequestStatus
    attempts: int
    enqueued_at: str | None
    started_at: str | None
    ended_at: str | None
    result: Any = None  # SUCCESS: the answer as stored (forwarding.encode_answer)
    error: str | None = None
    retry_at: float | None = None
    sink_index: int | None = None  # its index in the service's sink log, once it has ended (sink_log.py)
    tags: dict[str, str] = field(default_factory=dict)  # its query parameters not named `_..._` (EAS's tags)
    callback: dict[str, Any] | None = None  # its completion webhook's delivery state, if it has one (webhooks.py)
    # PENDING and never attempted, with a queue deadline: seconds (Redis's clock) until it reads EXPIRED. No
    # worker may see the expiry, and then nothing publishes it: a waiting client reads again then (api.py).
    expires_in: float | None = None

    def record(self) -> dict[str, Any]:
        """The sink's JSON body for this state."""
        body: dict[str, Any] = {
            "request_id": self.request_id,
            "status": self.status.value,
            "service_name": self.service,
            "message": self.status.message,
            "attempts": self.attempts,
            "enqueued_at": self.enqueued_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
        }
        if self.sink_index is not None:
            body["index"] = self.sink_index
        if self.tags:
            body["tags"] = self.tags
        if self.callback:
            body["callback"] = self.callback
        if self.status == RequestStatus.SUCCESS:
            body["result"] = forwarding.expand_answer(self.result)
        elif self.status == RequestStatus.FAILURE:
            body["error_info"] = self.error
        elif self.status == RequestStatus.RETRY:
            body.update(next_attempt=self.attempts + 1, retry_at=iso(self.retry_at), last_error=self.error)
        elif self.status == RequestStatus.PENDING and self.error:
            body.update(next_attempt=self.attempts + 1, last_error=self.error)
        return body


_SCHEDULED_KEYS = [keys.queue_keys(name).scheduled for name in keys.QUEUE_NAMES]
_VIEW_FIELDS = (
    "status",
    keys.SERVICE_FIELD,
    "enqueued_at",
    "started_at",
    "ended_at",
    keys.EXPIRES_AT_FIELD,
    keys.ATTEMPTS_FIELD,
    keys.LAST_ERROR_FIELD,
    keys.OUTCOME_FIELD,
    keys.SINK_INDEX_FIELD,
    keys.TAGS_FIELD,
    keys.CALLBACK_URL_FIELD,
    keys.CALLBACK_FIELD,
)
_FORWARD_ERROR_PREFIX = re.compile(r"^(?:[\w.]+\.)?ForwardError: ")


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
    return _FORWARD_ERROR_PREFIX.sub("", last)


def _callback(url: bytes | None, state: bytes | None, sink_index: int | None) -> dict[str, Any] | None:
    """The webhook's delivery state as the sink shows it: `pending` until a delivery for the request's current
    end (its sink index) has reported (webhooks.py writes the state)."""
    if not url:
        return None
    recorded = json.loads(state) if state else {}
    if sink_index is None or recorded.get("index") != sink_index:
        recorded = {}
    view = {"url": url.decode(), "status": recorded.get("status", "pending"), "attempts": recorded.get("attempts", 0)}
    if recorded.get("last_error"):
        view["last_error"] = recorded["last_error"]
    return view


def read_state(connection: redis.Redis, request_id: str) -> RequestState | None:
    """The request's state in one round trip, without loading its body; None if unknown or expired."""
    with connection.pipeline(transaction=False) as pipe:
        pipe.hmget(keys.job_key(request_id), _VIEW_FIELDS)
        pipe.xrevrange(keys.RESULTS_PREFIX + request_id, "+", "-", count=1)
        pipe.time()
        for key in _SCHEDULED_KEYS:
            pipe.zscore(key, request_id)
        fields, results, time_reply, *retry_times = pipe.execute()
    raw = dict(zip(_VIEW_FIELDS, fields, strict=True))
    if not raw["status"] or not raw[keys.SERVICE_FIELD]:
        return None
    rq_status = raw["status"].decode()
    attempts = int(raw[keys.ATTEMPTS_FIELD] or 0)
    expired = _text(raw[keys.OUTCOME_FIELD]) == "expired"
    sink_index = int(raw[keys.SINK_INDEX_FIELD]) if raw[keys.SINK_INDEX_FIELD] else None
    common = dict(
        request_id=request_id,
        service=raw[keys.SERVICE_FIELD].decode(),
        attempts=attempts,
        enqueued_at=_text(raw["enqueued_at"]),
        started_at=_text(raw["started_at"]),
        ended_at=_text(raw["ended_at"]),
        sink_index=sink_index,
        tags=json.loads(raw[keys.TAGS_FIELD]) if raw[keys.TAGS_FIELD] else {},
        callback=_callback(raw[keys.CALLBACK_URL_FIELD], raw[keys.CALLBACK_FIELD], sink_index),
    )
    latest = Result.restore(request_id, results[0][0].decode(), results[0][1], connection) if results else None
    if rq_status == JobStatus.FINISHED and latest and latest.type == Result.Type.SUCCESSFUL:
        return RequestState(status=RequestStatus.SUCCESS, result=latest.return_value, **common)
    if expired and rq_status in RQ_ENDED_STATUSES:
        return RequestState(status=RequestStatus.EXPIRED, **common)
    if rq_status in (JobStatus.FAILED, JobStatus.STOPPED):
        error = _error_line(latest.exc_string if latest else None)
        return RequestState(status=RequestStatus.FAILURE, error=error, **common)
    if rq_status == JobStatus.CANCELED:
        return RequestState(status=RequestStatus.CANCELED, **common)
    if rq_status == JobStatus.SCHEDULED:
        retry_at = next((float(t) for t in retry_times if t is not None), None)
        error = _text(raw[keys.LAST_ERROR_FIELD])
        return RequestState(status=RequestStatus.RETRY, error=error, retry_at=retry_at, **common)
    if rq_status == JobStatus.STARTED:
        return RequestState(status=RequestStatus.STARTED, **common)
    expires_at, clock = float(raw[keys.EXPIRES_AT_FIELD] or 0), clock_seconds(time_reply)
    if has_expired(expires_at, attempts, clock):
        return RequestState(status=RequestStatus.EXPIRED, **common)
    expires_in = expires_at - clock if attempts == 0 and expires_at > 0 else None
    return RequestState(
        status=RequestStatus.PENDING, error=_text(raw[keys.LAST_ERROR_FIELD]), expires_in=expires_in, **common
    )


def requeue_failed(connection: redis.Redis, job: Job) -> Job:
    """RQ's own requeue of a failed request (Job.requeue), indexed in `eas:open` first so that the crash
    sweep covers it from the moment it is queued again. Scored by Redis's clock now: the sweep leaves
    entries younger than its age alone. Raises InvalidJobOperation if the job is not failed; the entry then
    does no harm (the request is open already, or has ended and the sweep drops it)."""
    connection.zadd(keys.OPEN_REQUESTS, {job.id: clock_seconds(connection.time())}, nx=True)
    return job.requeue()


def cancel(connection: redis.Redis, request_id: str, ttl: int) -> CancelOutcome:
    """Cancels a request that has not started; otherwise says why it cannot be."""
    job_key = keys.job_key(request_id)
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
                pipe.hset(job_key, mapping={keys.OUTCOME_FIELD: "canceled", "ended_at": utcformat(now())})
                pipe.expire(job_key, ttl)
                pipe.zadd(CanceledJobRegistry(job.origin, connection=connection).key, {request_id: time.time() + ttl})
                pipe.zrem(keys.OPEN_REQUESTS, request_id)
                _append_to_sink_log(pipe, request_id, RequestStatus.CANCELED)
                pipe.execute()
                return "canceled"
            except redis.WatchError:
                continue


def end_at_sink(connection: redis.Redis, request_id: str, status: RequestStatus) -> None:
    """Ends a request that RQ itself ended (its recovery failed it): out of the open index, and into its
    service's sink log, in one transaction."""
    with connection.pipeline() as pipe:
        pipe.zrem(keys.OPEN_REQUESTS, request_id)
        _append_to_sink_log(pipe, request_id, status)
        pipe.execute()


def _append_to_sink_log(pipe: redis.client.Pipeline, request_id: str, status: RequestStatus) -> None:
    """Queues the append of an ended request to its service's sink log (sink_log.py) on `pipe`, inside the
    transaction that ends it."""
    redis_scripts.register(pipe, "sink_append")(
        keys=[keys.job_key(request_id), keys.SINK_INDEXES, keys.METRICS],
        args=[request_id, status.value, keys.SINK_LOG_PREFIX, keys.ENDED_CHANNEL, keys.CALLBACK_OUTBOX],
        client=pipe,
    )
