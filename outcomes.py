"""What a QueueWorker records when an attempt ends, as RQ's own worker would record it.

A success goes to the FinishedJobRegistry with its Result, a retryable failure with retries left waits in
the ScheduledJobRegistry (RQ's Retry), anything else goes to the FailedJobRegistry with its Result.
lua/record_outcomes.lua writes a whole batch atomically, in one call.
"""

from __future__ import annotations

import logging
import time
from base64 import b64encode
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from rq.defaults import UNSERIALIZABLE_RETURN_VALUE_PAYLOAD
from rq.job import JobStatus
from rq.results import Result
from rq.serializers import DefaultSerializer
from rq.utils import now, utcformat

import keys
import logs
import metrics
from forwarding import Attempt
from inflight import InFlight
from queueing import FORWARD_FUNCTION
from settings import Settings

# What a finished request keeps as RQ's job `data`: the job function without the request, so that
# Job.fetch still works on every request id (RQ reads `data` uncompressed when it is not zlib).
FINISHED_JOB_DATA = DefaultSerializer.dumps((FORWARD_FUNCTION, None, (), {}))


@dataclass(frozen=True)
class Outcome:
    """One request's record: its RQ status, the registry it moves to and its score there, the ttl of the
    job and result (0: keep), the last error ('': none), retries left (None: unchanged), the Result."""

    status: JobStatus
    registry: str
    score: float
    ttl: int
    last_error: str = ""
    retries_left: int | None = None
    result: dict[str, Any] | None = None

    def script_args(self, item: InFlight, model_code: str) -> list[Any]:
        """This outcome's record in lua/record_outcomes.lua's ARGV (`model_code`: metrics.model_status)."""
        result = self.result or {}
        retries = "" if self.retries_left is None else self.retries_left
        args = [self.status.value, item.id, item.execution_id, item.queue.started, self.registry, self.score]
        args += [self.ttl, self.last_error, retries, len(result)]
        args += [model_code, repr(item.forward_seconds), metrics.bucket_label(item.forward_seconds)]
        for pair in result.items():
            args += pair
        return args


def sink_status(item: InFlight, attempt: Attempt) -> str:
    """What the sink says after this attempt is recorded, by OutcomeRecorder.decide's rule (for the log)."""
    if attempt.result is not None:
        return "SUCCESS"
    return "RETRY" if attempt.retryable and item.retries_left else "FAILURE"


def log_recorded(batch: list[tuple[InFlight, Attempt]]) -> None:
    """An `outcome` line per recorded attempt, from the committer: the sink's status, seconds since the
    request was accepted, and the attempt's model status code and seconds."""
    if not logs.log.isEnabledFor(logging.INFO):
        return
    clock = time.time()
    for item, attempt in batch:
        service = item.args[0] if item.func_name == FORWARD_FUNCTION and item.args else ""
        waited = clock - datetime.fromisoformat(item.enqueued_at).timestamp() if item.enqueued_at else 0.0
        status, seconds, priority = sink_status(item, attempt), round(item.forward_seconds, 6), item.queue.name
        logs.event(
            "outcome",
            item.id,
            service,
            priority,
            item.attempt,
            status,
            waited,
            model_status=metrics.model_status(attempt),
            attempt_seconds=seconds,
        )


class OutcomeRecorder:
    """Records batches of outcomes for one worker."""

    def __init__(
        self, connection: redis.Redis, settings: Settings, worker_name: str, executions_key: str, worker_key: str
    ) -> None:
        self.connection, self.settings, self.worker_name = connection, settings, worker_name
        self.keys = [keys.OPEN_REQUESTS, executions_key, worker_key, keys.METRICS]

    def script_args(self, batch: list[tuple[InFlight, Attempt]]) -> list[Any]:
        """lua/record_outcomes.lua's ARGV for a batch, whose KEYS are `self.keys` (async_commit.py sends it:
        one atomic call, safe to repeat)."""
        clock, ended_at = time.time(), now()
        args: list[Any] = [utcformat(ended_at), keys.JOB_PREFIX, keys.RESULTS_PREFIX]
        args += [keys.EXECUTION_PREFIX, keys.EXECUTIONS_REGISTRY_PREFIX, FINISHED_JOB_DATA, repr(clock)]
        args += [keys.SINK_INDEXES, keys.SINK_LOG_PREFIX, keys.ENDED_CHANNEL, keys.CALLBACK_OUTBOX]
        for item, attempt in batch:
            args += self.decide(item, attempt, clock, ended_at).script_args(item, metrics.model_status(attempt))
        return args

    def decide(self, item: InFlight, attempt: Attempt, clock: float, ended_at: datetime) -> Outcome:
        """What RQ's worker would record for a success, a retry and a failure."""
        if attempt.result is not None:
            ttl = item.result_ttl or self.settings.result_ttl
            result = self._result(item, Result.Type.SUCCESSFUL, ended_at, return_value=attempt.result)
            return Outcome(JobStatus.FINISHED, item.queue.finished, clock + ttl, ttl, result=result)
        error = (attempt.error or "failed").strip()
        last_error = error.splitlines()[-1]
        if attempt.retryable and item.retries_left:
            # RQ's retry: wait the next of retry_intervals in the ScheduledJobRegistry.
            retry_at = clock + item.retry_interval()
            return Outcome(JobStatus.SCHEDULED, item.queue.scheduled, retry_at, 0, last_error, item.retries_left - 1)
        ttl = item.failure_ttl or self.settings.failure_ttl
        result = self._result(item, Result.Type.FAILED, ended_at, exc_string=error)
        return Outcome(JobStatus.FAILED, item.queue.failed, clock + ttl, ttl, last_error, result=result)

    def _result(self, item: InFlight, kind: Result.Type, ended_at: datetime, **outcome: Any) -> dict[str, Any]:
        """The fields of RQ's Result stream entry for this attempt.

        A success keeps only its type and return value, as Result.serialize writes them: the worker's name
        and the start and end times are on the job already, and the execution id names nothing once it has
        ended. Result.restore reads both forms; the short one keeps 220 B less per finished request for
        result_ttl (a one-entry stream: 560 B instead of 782 B, Redis 7.0). Written here rather than
        through Result(), whose serializer check (a Protocol isinstance) cost 12 us per request."""
        if kind == Result.Type.SUCCESSFUL:
            try:
                value = DefaultSerializer.dumps(outcome["return_value"])
            except Exception:  # as Result.serialize: another job function may return anything
                value = DefaultSerializer.dumps(UNSERIALIZABLE_RETURN_VALUE_PAYLOAD)
            return {"type": kind.value, "return_value": b64encode(value).decode()}
        return Result(
            item.id,
            kind,
            self.connection,
            worker_name=self.worker_name,
            serializer=DefaultSerializer,
            execution_id=item.execution_id,
            execution_started_at=item.started_at,
            execution_ended_at=ended_at,
            **outcome,
        ).serialize()
