"""Read-only looks at what the queues hold, for the reports: `flask queue status` (admin.py), `/metrics`
(metrics.py) and the EAS SDK's attributes and counts (eas_sink.py). Each rule they share is written here
once, so that the reports cannot drift apart."""

from __future__ import annotations

import redis

import keys

CHUNK = 1_000  # ids per pipelined round trip


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
