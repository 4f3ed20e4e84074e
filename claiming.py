"""lua/claim.lua's arguments and answer for a QueueWorker."""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rq.utils import now, utcformat

import keys
from inflight import CLAIM_FIELDS, InFlight, from_claim

if TYPE_CHECKING:
    from queue_worker import QueueWorker


def claim_args(worker: QueueWorker, count: int, adopted: tuple[int, str] | None) -> tuple[list[Any], datetime]:
    """lua/claim.lua's ARGV, and the start time it writes."""
    started_at = now()
    clock = time.time()
    args: list[Any] = [count, repr(clock), utcformat(started_at), repr(clock + worker.heartbeat_ttl)]
    args += [worker.heartbeat_ttl, worker.name, worker.settings.result_ttl]
    args += [keys.JOB_PREFIX, keys.EXECUTION_PREFIX, keys.EXECUTIONS_REGISTRY_PREFIX]
    args += [keys.SINK_INDEXES, keys.SINK_LOG_PREFIX, keys.ENDED_CHANNEL, keys.CALLBACK_OUTBOX]
    args += [adopted[0] if adopted else 0, adopted[1] if adopted else ""]
    args += [len(CLAIM_FIELDS), *CLAIM_FIELDS]
    # One random prefix per call, not a uuid per free slot: a claim at concurrency 1,000 that finds one
    # request would otherwise make and send 1,000 ids. Ids stay 32 hex digits, unique per call and prefix.
    args.append(uuid.uuid4().hex[:24])
    return args, started_at


def claimed(worker: QueueWorker, rows: list, started_at: datetime) -> list[InFlight]:
    """lua/claim.lua's answer as InFlight items, now in flight here."""
    items = []
    for queue_index, job_id, execution_id, attempt, values in rows:
        queue = worker.queue_keys[queue_index - 1]
        item = from_claim(job_id.decode(), execution_id.decode(), queue, started_at, attempt, values)
        worker.in_flight[item.id] = item
        items.append(item)
    return items
