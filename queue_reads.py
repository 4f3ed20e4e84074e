"""Read-only looks at what the queues hold, for the reports: `flask queue status` (admin.py), `/metrics`
(metrics.py) and the EAS SDK's attributes and counts (eas_sink.py). Each rule they share is written here
once, so that the reports cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import redis
from rq.utils import utcparse

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
    clock: float  # Redis's clock at the read (lifecycle.clock_seconds): the one clock every host shares
    queues: dict[str, QueueDepth]  # by name, in keys.QUEUE_NAMES's priority order


def read_snapshot(connection: redis.Redis) -> QueueSnapshot:
    """Every queue's depth in two pipelined round trips: the clock, the counts and each queue's head; then
    the heads' `created_at`."""
    with connection.pipeline(transaction=False) as pipe:
        pipe.time()
        for name in keys.QUEUE_NAMES:
            q = keys.queue_keys(name)
            pipe.llen(q.queue).zcard(q.started).zcard(q.scheduled).lrange(q.queue, 0, OLDEST_SAMPLE - 1)
        time_reply, *replies = pipe.execute()
    clock = lifecycle.clock_seconds(time_reply)
    counts = {name: replies[index * 4 : index * 4 + 4] for index, name in enumerate(keys.QUEUE_NAMES)}
    heads = [request_id.decode() for *_, head in counts.values() for request_id in head]
    created = iter(job_fields(connection, heads, "created_at"))
    queues = {
        name: QueueDepth(waiting, started, scheduled, oldest_age([c for (c,) in islice(created, len(head))], clock))
        for name, (waiting, started, scheduled, head) in counts.items()
    }
    return QueueSnapshot(clock, queues)


def oldest_age(created: list[str | None], clock: float) -> float | None:
    """Seconds the oldest of these requests has waited, to the millisecond (None: none waits). A queue's
    head holds its oldest: a queue is first in, first out, and retries (which are older) go to the front."""
    stamps = [utcparse(c).timestamp() for c in created if c]
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
