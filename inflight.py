"""A request a QueueWorker has claimed and not yet recorded: what lua/claim.lua returned of its RQ job.

Not an rq Job and Execution: forwarding and recording read a few of the job's fields, and building both
objects (Job.restore) took 16.6 us per request where reading those fields takes ~4.5 (a one-off timing
of 100 claimed rows). A job of another function, such as a webhook delivery, is fetched as an rq Job when
it runs (QueueWorker._attempt).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rq.job import Job
from rq.serializers import DefaultSerializer

from keys import QueueKeys


@dataclass(slots=True)
class InFlight:
    """A claimed request: its RQ job's fields that matter while it is in flight, and its execution."""

    id: str  # the request id, RQ's job id
    execution_id: str
    queue: QueueKeys
    started_at: datetime  # when it was claimed: the execution's start
    func_name: str
    args: tuple
    retries_left: int | None
    retry_intervals: list[int] | None
    result_ttl: int | None
    failure_ttl: int | None
    # For the metrics and log lines (metrics.py, logs.py): which attempt this is, when the request was
    # accepted (RQ's timestamp text), and how long the attempt took (set by QueueWorker._forward).
    attempt: int = 0
    enqueued_at: str | None = None
    forward_seconds: float = 0.0

    @property
    def composite_key(self) -> str:
        """The execution's name in RQ's StartedJobRegistry (Execution.composite_key)."""
        return f"{self.id}:{self.execution_id}"

    def retry_interval(self) -> int:
        """Seconds to wait before the next attempt: RQ's rule (Job.get_retry_interval) on these fields."""
        return Job.get_retry_interval(self)  # type: ignore[arg-type]  # it reads the two retry fields only


# The job fields lua/claim.lua returns, in this order; `from_claim` reads them.
CLAIM_FIELDS = (
    "data",
    "retries_left",
    "retry_intervals",
    "result_ttl",
    "failure_ttl",
    "enqueued_at",
)


def from_claim(
    request_id: str, execution_id: str, queue: QueueKeys, started_at: datetime, attempt: int, values: list
) -> InFlight:
    """An InFlight from lua/claim.lua's CLAIM_FIELDS of one job, read as Job.restore reads them."""
    data, retries_left, retry_intervals, result_ttl, failure_ttl, enqueued_at = values
    try:
        data = zlib.decompress(data)
    except zlib.error:  # RQ stores data compressed, and reads it either way
        pass
    try:
        func_name, _instance, args, _kwargs = DefaultSerializer.loads(data)
    except Exception:  # unreadable: QueueWorker._attempt fetches it as an rq Job, whose error is the outcome
        func_name, args = "", ()
    return InFlight(
        request_id,
        execution_id,
        queue,
        started_at,
        func_name,
        tuple(args),
        _int(retries_left),
        json.loads(retry_intervals) if retry_intervals else None,
        _int(result_ttl),
        _int(failure_ttl),
        attempt,
        enqueued_at and enqueued_at.decode(),
    )


def _int(value: Any) -> int | None:
    return int(value) if value else None
