"""Who queues each webhook delivery, so that none is lost: an outbox written with the outcome, drained into
RQ jobs by the workers' upkeep.

1. The Lua step that ends a request (lua/record_outcomes.lua, lua/claim.lua for an expiry,
   lua/sink_append.lua for a cancel) appends it to its sink log and, when its job hash has
   `eas_callback_url`, pushes `<service> <index> <request id> <url>` onto the list `eas:callbacks` in the
   same atomic step. The sink log itself is not the source here: clients remove its entries (commit,
   delete, truncate, auto_delete), possibly before a dispatcher has read them.
2. Every QueueWorker's upkeep calls `run` (every 0.5 s); when the outbox holds anything, one worker at a
   time (recovery.exclusive) turns each entry into an RQ job on the queue `webhooks` whose id is
   webhooks.delivery_id(request id, index), and removes the entry in the same MULTI, watched on that job
   id: a dispatch repeated after a crash, or by a second dispatcher, finds the job and only removes the
   entry. So each ended request with a callback gets exactly one delivery job; the delivery itself is at
   least once (a worker killed mid-POST is recovered and the POST made again, with the same webhook-id).
"""

from __future__ import annotations

import logging

import redis
from rq.job import Retry
from rq.queue import Queue

import keys
import lifecycle
import recovery
import webhooks
from queueing import JOB_TIMEOUT_MARGIN  # beyond callback_timeout: RQ's hard kill
from settings import Settings

BATCH = 100  # outbox entries turned into jobs per dispatch
log = logging.getLogger(__name__)


def run(connection: redis.Redis, settings: Settings, holder: str) -> int:
    """The upkeep step: dispatches pending deliveries if there are any, one worker at a time; returns how
    many jobs it queued. Costs one LLEN when the outbox is empty."""
    if not connection.llen(keys.CALLBACK_OUTBOX):
        return 0
    with recovery.exclusive(connection, "callbacks", holder) as mine:
        return dispatch(connection, settings) if mine else 0


def dispatch(connection: redis.Redis, settings: Settings) -> int:
    """Turns up to BATCH outbox entries, oldest first, into delivery jobs; returns how many it queued."""
    queue = Queue(keys.WEBHOOKS_QUEUE, connection=connection)
    intervals = list(settings.callback_retry_intervals)
    retry = Retry(max=len(intervals), interval=intervals) if intervals else None
    entries = connection.lrange(keys.CALLBACK_OUTBOX, 0, BATCH - 1)
    return sum(enqueue(queue, settings, retry, entry) for entry in entries)


def enqueue(queue: Queue, settings: Settings, retry: Retry | None, entry: bytes) -> bool:
    """Queues the delivery job of one outbox entry unless it exists, and drops the entry, atomically."""
    try:
        service, index, request_id, url = entry.decode().split(" ", 3)
        job_id = webhooks.delivery_id(request_id, int(index))
    except ValueError:
        log.error("dropping a malformed webhook outbox entry: %r", entry[:200])
        queue.connection.lrem(keys.CALLBACK_OUTBOX, 1, entry)
        return False
    job_key = keys.job_key(job_id)
    with queue.connection.pipeline() as pipe:
        try:
            pipe.watch(job_key)
            queued = not pipe.exists(job_key)
            opened_at = lifecycle.clock_seconds(pipe.time())  # the open index's clock: Redis's
            pipe.multi()
            if queued:
                queue.enqueue_call(
                    webhooks.DELIVER_FUNCTION,
                    args=(service, request_id, int(index), url),
                    job_id=job_id,
                    retry=retry,
                    timeout=int(settings.callback_timeout) + JOB_TIMEOUT_MARGIN,
                    result_ttl=settings.result_ttl,
                    failure_ttl=settings.failure_ttl,
                    description=f"webhook of {service} request {request_id} (sink index {index})",
                    pipeline=pipe,
                )
                # Indexed as open like a request, so the crash sweep of a worker that runs `webhooks` finds a
                # delivery that a worker killed between BLPOP and its claim left in no queue.
                pipe.zadd(keys.OPEN_REQUESTS, {job_id: opened_at})
            pipe.lrem(keys.CALLBACK_OUTBOX, 1, entry)
            pipe.execute()
        except redis.WatchError:
            return False  # someone else queued it meanwhile; the entry is looked at again next time
    return queued
