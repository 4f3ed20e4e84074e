"""Back-pressure before Redis is full: submits are refused (429) once Redis's used memory passes
`redis_memory_high_water` of its `maxmemory`, so that the requests already accepted can still be recorded
(their outcomes, retries and results need room too).

Redis's INFO is read at most ten times a second per API process (a cheap command), so the requests that
arrive between two reads, at the enqueue rates `make bench` measures well under 1 MB, stay well inside
the margin a high-water mark of 0.9 leaves.
"""

from __future__ import annotations

import time

import redis


class MemoryWatch:
    """How full Redis is, from INFO memory, refreshed at most every `interval` seconds."""

    def __init__(self, connection: redis.Redis, high_water: float, interval: float = 0.1) -> None:
        self.connection, self.high_water, self.interval = connection, high_water, interval
        self._read_at = -interval
        self._used = 0.0  # fraction of maxmemory; 0 when Redis has no maxmemory

    def fraction_used(self) -> float:
        if time.monotonic() - self._read_at >= self.interval:
            self._read_at = time.monotonic()  # first: clients arriving during the round trip use the last figure
            info = self.connection.info("memory")
            limit = int(info.get("maxmemory") or 0)
            self._used = int(info["used_memory"]) / limit if limit else 0.0
        return self._used

    def over_high_water(self) -> float | None:
        """The fraction used, if it is past the high-water mark but Redis still has room; None otherwise.
        A Redis already at its `maxmemory` refuses the write itself, and the client gets the 503 that says so
        (`Redis refuses writes: OOM ...`): it is unavailable, not merely busy."""
        used = self.fraction_used()
        return used if self.high_water <= used < 1.0 else None
