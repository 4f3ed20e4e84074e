"""Upkeep and recovery: what a QueueWorker does between claims so that no accepted request is lost.

Stock RQ leaves these to `--with-scheduler` and a 10-minute maintenance cycle; a QueueWorker runs them
within seconds:
- due retries go back onto their queue (every 0.5 s);
- requests whose worker died (heartbeat lapsed) are retried or failed by RQ's own
  StartedJobRegistry.cleanup (every 5 s);
- the orphan sweep finds requests that a crash left in no queue and no registry (every 5 s);
- RQ's registry maintenance, plus expired entries of the canceled registry (every 10 minutes).
One worker at a time runs each recovery task (a lock in Redis), since every worker schedules them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis
from rq.job import JobStatus
from rq.registry import StartedJobRegistry

import keys
import lifecycle
import redis_scripts
from keys import QueueKeys


class Schedule:
    """When each periodic task is next due, on the monotonic clock."""

    def __init__(self) -> None:
        self._due: dict[str, float] = {}

    def due(self, task: str, interval: float) -> bool:
        """True if `task` is due now; it is then next due `interval` seconds later."""
        clock = time.monotonic()
        if clock < self._due.get(task, 0):
            return False
        self._due[task] = clock + interval
        return True

    def next_due(self, default: float) -> float:
        return min(self._due.values(), default=time.monotonic() + default)

    def run_next(self, task: str) -> None:
        self._due[task] = 0

    def hold_off(self, tasks: tuple[str, ...], seconds: float) -> None:
        for task in tasks:
            self._due[task] = time.monotonic() + seconds


@contextlib.contextmanager
def exclusive(connection: redis.Redis, task: str, holder: str) -> Iterator[bool]:
    """One worker at a time runs `task`; yields whether this one holds the lock. redis-py's Lock releases
    only a lock it still holds (a task that outlived the lock's 60 s never frees another worker's)."""
    lock = connection.lock(keys.LOCK_PREFIX + task, timeout=60)
    mine = bool(lock.acquire(blocking=False, token=holder))
    try:
        yield mine
    finally:
        if mine:
            with contextlib.suppress(redis.exceptions.LockError):
                lock.release()


class RetryPromoter:
    """Moves retries whose wait is over back onto their queue (lua/promote_due.lua)."""

    def __init__(self, connection: redis.Redis, queues: list[QueueKeys]) -> None:
        self.script = redis_scripts.register(connection, "promote_due")
        self.keys = [key for q in queues for key in (q.scheduled, q.queue)]

    def __call__(self) -> int:
        return int(self.script(keys=self.keys, args=[time.time(), keys.JOB_PREFIX]))


def recover_abandoned(connection: redis.Redis, queues: list[QueueKeys], exception_handlers: list[Callable]) -> None:
    """RQ's own recovery: a started request whose heartbeat lapsed is retried (if it has retries left) or
    failed (AbandonedJobError). RQ fails it without our steps, so a request it failed is then ended as the
    worker ends one: its sink-log entry, webhook, count and notification, and out of the open index."""
    for q in queues:
        registry = StartedJobRegistry(q.name, connection=connection)
        cutoff = time.time()
        abandoned = registry.get_expired_job_ids(cutoff)
        registry.cleanup(timestamp=cutoff, exception_handlers=exception_handlers)
        for request_id in abandoned:
            status, sink_index = connection.hmget(keys.job_key(request_id), "status", keys.SINK_INDEX_FIELD)
            if status == JobStatus.FAILED.value.encode() and sink_index is None:
                lifecycle.end_at_sink(connection, request_id, lifecycle.RequestStatus.FAILURE)


def clean_canceled(connection: redis.Redis, queues: list[QueueKeys]) -> None:
    """Drops expired entries of the canceled registries, which eas-queue scores by their expiry."""
    for q in queues:
        connection.zremrangebyscore(q.canceled, 0, time.time())


@dataclass(frozen=True)
class Suspect:
    """An open request found where no worker will pick it up: its id, status and queue."""

    request_id: str
    status: str
    queue: QueueKeys

    @property
    def token(self) -> str:
        return f"{self.request_id}:{self.status}"


class OrphanSweep:
    """Re-queues requests that a crash left outside every queue and registry: `queued` but in no queue
    (popped by a worker that died before recording it: stock RQ's multi-queue BLPOP, rq issue 1716),
    `scheduled` but not waiting in the ScheduledJobRegistry, or `started` with no live Execution (RQ wrote
    the status and died before the rest).

    A request must look lost on two sweeps in a row, `interval` apart, before it is re-queued, the rule
    rq's intermediate_queue.py applies in the same named steps. Requests that have ended leave the index.
    """

    def __init__(
        self, connection: redis.Redis, queues: list[QueueKeys], log: logging.Logger, interval: float = 5.0
    ) -> None:
        self.connection, self.queues, self.log, self.interval = connection, queues, log, interval
        self.age = 10.0  # seconds an accepted request must be old before it can count as lost
        self.batch = 1000  # open requests examined per sweep
        self.requeue_script = redis_scripts.register(connection, "requeue_orphan")
        # Workers of other queues (`webhooks`) sweep too: each set of queues keeps its own suspects.
        self.suspects_key = f"{keys.ORPHAN_SUSPECTS}:{','.join(q.name for q in queues)}"
        self._queues_by_name = {q.name: q for q in queues}

    def run(self) -> int:
        """One sweep; returns how many requests it queued again."""
        suspects = self.find_lost(self.oldest_open())
        confirmed = self.seen_before(suspects)
        return sum(self.requeue(suspect) for suspect in confirmed)

    def oldest_open(self) -> dict[str, tuple[str, QueueKeys]]:
        """The oldest open requests that are at least `age` old, with their status and queue, after
        dropping those that have ended from the index. With a backlog these are queued at the front of
        their queue, and a lost one is examined once the requests older than it have ended."""
        cutoff = lifecycle.clock_seconds(self.connection.time()) - self.age  # the clock the index uses
        ids = [i.decode() for i in self.connection.zrangebyscore(keys.OPEN_REQUESTS, "-inf", cutoff, 0, self.batch)]
        if not ids:
            return {}
        with self.connection.pipeline(transaction=False) as pipe:
            for request_id in ids:
                pipe.hmget(keys.job_key(request_id), "status", "origin")
            states = pipe.execute()
        ended, open_requests = [], {}
        for request_id, (status, origin) in zip(ids, states, strict=True):
            if status is None or status.decode() in lifecycle.RQ_ENDED_STATUSES:
                ended.append(request_id)
            elif origin and origin.decode() in self._queues_by_name:
                open_requests[request_id] = (status.decode(), self._queues_by_name[origin.decode()])
        if ended:
            self.connection.zrem(keys.OPEN_REQUESTS, *ended)
        return open_requests

    def find_lost(self, open_requests: dict[str, tuple[str, QueueKeys]]) -> list[Suspect]:
        """Those of `open_requests` that are where no worker will find them.

        A queued one is looked for first among the head of its queue, read once per sweep: the oldest open
        requests wait there. Only one not found there is looked for with LPOS, which scans its queue up to
        it (the sweep read every queue whole, every 5 s: 40,000 ids per sweep in bench row 3; then one LPOS
        per queued request: 5% of Redis's CPU in a 40,000-job drain). Only a request that is truly lost, or
        queued deep, costs a scan of its queue."""
        heads = self._queue_heads({q.name: q for status, q in open_requests.values() if status == JobStatus.QUEUED})
        with self.connection.pipeline(transaction=False) as pipe:
            looked_for = []
            for request_id, (status, q) in open_requests.items():
                if status == JobStatus.QUEUED:
                    if request_id in heads[q.name]:
                        continue
                    pipe.lpos(q.queue, request_id)
                    pipe.lpos(q.intermediate, request_id)
                elif status == JobStatus.SCHEDULED:
                    pipe.zscore(q.scheduled, request_id)
                elif status == JobStatus.STARTED:
                    pipe.zcard(keys.EXECUTIONS_REGISTRY_PREFIX + request_id)
                else:
                    continue
                looked_for.append((request_id, status, q))
            found = iter(pipe.execute())
        lost = []
        for request_id, status, q in looked_for:
            if status == JobStatus.QUEUED:
                in_queue, in_intermediate = next(found), next(found)
                if in_queue is None and in_intermediate is None:
                    lost.append(Suspect(request_id, status, q))
            elif status == JobStatus.SCHEDULED:
                if next(found) is None:  # not waiting for its retry
                    lost.append(Suspect(request_id, status, q))
            elif not next(found):  # started, with no live Execution
                lost.append(Suspect(request_id, status, q))
        return lost

    def _queue_heads(self, queues: dict[str, QueueKeys]) -> dict[str, set[str]]:
        """The first `batch` ids of each of these queues."""
        with self.connection.pipeline(transaction=False) as pipe:
            for q in queues.values():
                pipe.lrange(q.queue, 0, self.batch - 1)
            heads = pipe.execute()
        return {name: {i.decode() for i in head} for name, head in zip(queues, heads, strict=True)}

    def seen_before(self, suspects: list[Suspect]) -> list[Suspect]:
        """Remembers this sweep's suspects and returns those the previous sweep suspected too. They live in
        Redis, since the next sweep may run in another worker."""
        with self.connection.pipeline() as pipe:
            pipe.smembers(self.suspects_key)
            pipe.delete(self.suspects_key)
            if suspects:
                pipe.sadd(self.suspects_key, *(s.token for s in suspects))
                pipe.expire(self.suspects_key, int(self.interval * 3))
            previous = {i.decode() for i in pipe.execute()[0]}
        return [s for s in suspects if s.token in previous]

    def requeue(self, suspect: Suspect) -> bool:
        """Puts a confirmed orphan back at the front of its queue, if it is still where it was found."""
        script_keys = [
            keys.job_key(suspect.request_id),
            suspect.queue.queue,
            suspect.queue.scheduled,
            keys.EXECUTIONS_REGISTRY_PREFIX + suspect.request_id,
        ]
        if not self.requeue_script(keys=script_keys, args=[suspect.request_id, suspect.status]):
            return False
        self.log.warning("request %s (%s) was in no queue; queued it again", suspect.request_id, suspect.status)
        return True
