"""Each service's sink log: the requests that have ended, in the order they ended, each with an index.

A Redis Stream per service, `eas:sink:<service>`, whose entry ids are `0-<index>`: the index grows by one
per ended request (SUCCESS, FAILURE, EXPIRED or CANCELED), so EAS's sink-queue indexes map onto stream ids
directly. An entry is appended in the same atomic step that records the outcome (lua/record_outcomes.lua,
lua/claim.lua for an expiry, lua/sink_append.lua for a cancel), and each append is published on
`eas:ended` for waiting clients (notifier.py). This is what the EAS SDK's `get`/`watch` and Server-Sent
Events (events.py) read; webhooks have their own outbox, written in the same step (callbacks.py).
Removing an entry (commit, delete, truncate) does not delete the request: the JSON sink answers for it
until `result_ttl`. Entries older than `result_ttl` are trimmed by the workers' upkeep (worker_upkeep.py).

Under plain `rq worker`, RQ records outcomes itself and nothing is appended: the sink log needs QueueWorker.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

import keys
from lifecycle import RequestStatus


@dataclass(frozen=True)
class SinkEntry:
    index: int
    request_id: str
    status: RequestStatus
    ended_at: float  # unix time, Redis's clock


def _entry(stream_id: bytes, fields: dict[bytes, bytes]) -> SinkEntry:
    return SinkEntry(
        index=int(stream_id.split(b"-")[1]),
        request_id=fields[b"id"].decode(),
        status=RequestStatus(fields[b"status"].decode()),
        ended_at=float(fields[b"at"]),
    )


def read(connection: redis.Redis, service: str, first_index: int, count: int) -> list[SinkEntry]:
    """Up to `count` entries with index >= `first_index` (0: from the oldest), in index order."""
    start = f"0-{max(first_index, 0)}"
    return [_entry(i, f) for i, f in connection.xrange(keys.sink_log_key(service), start, "+", count=count)]


def delete(connection: redis.Redis, service: str, indexes: list[int]) -> int:
    """Removes these entries from the sink log; returns how many there were."""
    if not indexes:
        return 0
    return int(connection.xdel(keys.sink_log_key(service), *(f"0-{i}" for i in indexes)))


def truncate(connection: redis.Redis, service: str, below: int) -> int:
    """Removes every entry with an index below `below`; returns how many."""
    return int(connection.xtrim(keys.sink_log_key(service), minid=f"0-{max(below, 0)}", approximate=False))


def length(connection: redis.Redis, service: str) -> int:
    return int(connection.xlen(keys.sink_log_key(service)))


def last_index(connection: redis.Redis, service: str) -> int | None:
    """The index given to the service's most recent ended request (None: none yet)."""
    value = connection.hget(keys.SINK_INDEXES, service)
    return int(value) if value is not None else None


def trim_expired(connection: redis.Redis, older_than: float, batch: int = 1000) -> int:
    """Drops entries that ended before `older_than` (unix time) from every service's log; returns how
    many. The results they point to have expired by then (`result_ttl`)."""
    dropped = 0
    for service in connection.hkeys(keys.SINK_INDEXES):
        log = keys.sink_log_key(service.decode())
        while entries := connection.xrange(log, "-", "+", count=batch):
            expired = [stream_id for stream_id, fields in entries if float(fields[b"at"]) < older_than]
            if expired:
                dropped += connection.xdel(log, *expired)
            if len(expired) < len(entries):
                break  # the log is in the order requests ended: the rest is younger
    return dropped
