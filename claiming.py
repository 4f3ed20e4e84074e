"""lua/claim.lua's arguments and answer for a QueueWorker (the same call, asyncio or not)."""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rq.executions import Execution
from rq.job import Job
from rq.utils import now, utcformat

import keys
from inflight import InFlight

if TYPE_CHECKING:
    from queue_worker import QueueWorker

# The job fields lua/claim.lua returns: only what forwarding and recording need (parsing RQ's four
# timestamps per job cost more than forwarding it).
CLAIM_FIELDS = ("data", "origin", "retries_left", "retry_intervals", "result_ttl", "failure_ttl")
# Also returned, for the log lines and metrics (logs.py), and kept from RQ's restore, which would parse the time.
LOG_FIELDS = ("eas_attempts", "enqueued_at")


def claim_args(worker: QueueWorker, count: int, adopted: tuple[int, str] | None) -> tuple[list[Any], datetime]:
    """lua/claim.lua's ARGV, and the start time it writes."""
    started_at = now()
    clock = time.time()
    args: list[Any] = [count, repr(clock), utcformat(started_at), repr(clock + worker.heartbeat_ttl)]
    args += [worker.heartbeat_ttl, worker.name, worker.settings.result_ttl]
    args += [keys.JOB_PREFIX, keys.EXECUTION_PREFIX, keys.EXECUTIONS_REGISTRY_PREFIX]
    args += [keys.SINK_INDEXES, keys.SINK_LOG_PREFIX, keys.ENDED_CHANNEL, keys.CALLBACK_OUTBOX]
    args += [adopted[0] if adopted else 0, adopted[1] if adopted else ""]
    args += [len(CLAIM_FIELDS) + len(LOG_FIELDS), *CLAIM_FIELDS, *LOG_FIELDS]
    # One random prefix per call, not a uuid per free slot: a claim at concurrency 1,000 that finds one
    # request would otherwise make and send 1,000 ids. Ids stay 32 hex digits, unique per call and prefix.
    args.append(uuid.uuid4().hex[:24])
    return args, started_at


def claimed(worker: QueueWorker, rows: list, started_at: datetime) -> list[InFlight]:
    """lua/claim.lua's answer as InFlight items, now in flight here."""
    items = []
    for queue_index, job_id, execution_id, values in rows:
        job = Job(job_id.decode(), connection=worker.connection)
        fields, (attempts, enqueued_at) = values[: len(CLAIM_FIELDS)], values[len(CLAIM_FIELDS) :]
        job.restore({name: value for name, value in zip(CLAIM_FIELDS, fields, strict=True) if value is not None})
        job.started_at = started_at
        execution = Execution(execution_id.decode(), job.id, connection=worker.connection, worker_name=worker.name)
        execution._job = job
        queue = worker.queue_keys[queue_index - 1]
        item = InFlight(job, queue, execution, int(attempts or 0), enqueued_at and enqueued_at.decode())
        worker.in_flight[job.id] = item
        items.append(item)
    return items
