"""Read-only looks at what the queues hold, for the reports: `flask queue status` (admin.py), `/metrics`
(metrics.py) and the EAS SDK's attributes and counts (eas_sink.py). Each rule they share is written here
once, so that the reports cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import redis
from rq.utils import utcparse
from rq.worker_registration import REDIS_WORKER_KEYS

import keys
import lifecycle

CHUNK = 1_000  # ids per pipelined round trip
OLDEST_SAMPLE = 100  # requests at a queue's head read for its oldest waiting one


@dataclass(frozen=True)
class QueueDepth:
    """One queue now: requests waiting in its list, being forwarded (RQ's StartedJobRegistry) and waiting
    for a retry (its ScheduledJobRegistry), and how long the oldest waiting one has waited (None: none)."""

    waiting: int
    started: int
    scheduled: int
    oldest_waiting_seconds: float | None


@dataclass(frozen=True)
class QueueSnapshot:
    """The queues and the workers that drain them, as every report shows them."""

    clock: float  # Redis's clock at the read (lifecycle.clock_seconds): the one clock every host shares
    queues: dict[str, QueueDepth]  # by name, in keys.QUEUE_NAMES's priority order
    live_workers: int  # RQ workers whose registration has not expired (RQ drops dead ones from its set late)


def read_snapshot(connection: redis.Redis) -> QueueSnapshot:
    """The queues and their workers in two pipelined round trips: the clock, each queue's counts and head,
    and RQ's set of workers; then the heads' `created_at` and whether each worker's key is still there."""
    with connection.pipeline(transaction=False) as pipe:
        pipe.time()
        for name in keys.QUEUE_NAMES:
            q = keys.queue_keys(name)
            pipe.llen(q.queue).zcard(q.started).zcard(q.scheduled).lrange(q.queue, 0, OLDEST_SAMPLE - 1)
        pipe.smembers(REDIS_WORKER_KEYS)
        time_reply, *replies, worker_keys = pipe.execute()
    counts = {name: replies[index * 4 : index * 4 + 4] for index, name in enumerate(keys.QUEUE_NAMES)}
    with connection.pipeline(transaction=False) as pipe:
        for *_, head in counts.values():
            for request_id in head:
                pipe.hget(keys.job_key(request_id.decode()), "created_at")
        for key in worker_keys:
            pipe.exists(key)
        found = iter(pipe.execute())
    clock = lifecycle.clock_seconds(time_reply)
    queues = {
        name: QueueDepth(waiting, started, scheduled, oldest_age(list(islice(found, len(head))), clock))
        for name, (waiting, started, scheduled, head) in counts.items()
    }
    return QueueSnapshot(clock, queues, live_workers=sum(found))  # what is left: one EXISTS per worker


def oldest_age(created: list[bytes | None], clock: float) -> float | None:
    """Seconds the oldest of these requests has waited, to the millisecond (None: none waits). A queue's
    head holds its oldest: a queue is first in, first out, and retries (which are older) go to the front."""
    stamps = [utcparse(c.decode()).timestamp() for c in created if c]
    return round(max(0.0, clock - min(stamps)), 3) if stamps else None


def job_fields(connection: redis.Redis, ids: list[str], *names: str) -> list[tuple[str | None, ...]]:
    """The named job-hash fields of each id, decoded (None: absent), in pipelined chunks: a report may read
    thousands, and one pipeline per chunk bounds both the round trips and the replies held at once."""
    values: list[tuple[str | None, ...]] = []
    for start in range(0, len(ids), CHUNK):
        with connection.pipeline(transaction=False) as pipe:
            for request_id in ids[start : start + CHUNK]:
                pipe.hmget(keys.job_key(request_id), names)
            for row in pipe.execute():
                values.append(tuple(v.decode(errors="replace") if v is not None else None for v in row))
    return values
