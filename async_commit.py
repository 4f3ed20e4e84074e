"""A QueueWorker's committer: records finished attempts in batches, one lua/record_outcomes.lua call
each, keeping a batch until Redis takes it; only then do the requests leave the worker's in-flight set
(their heartbeats stop, and their places in its backlog of unwritten outcomes free up).

Large answers bound a batch by size as well as by count, and have its arguments built in a thread: a
batch of 25 8 MB answers once took long enough to encode on the loop and to run in Redis that attempts
ran out of time and the batch's write timed out (issue 13 note).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio

import async_redis
import redis_errors
import redis_scripts
from forwarding import LARGE_ANSWER, Attempt
from inflight import InFlight
from outcomes import OutcomeRecorder, log_recorded


class AsyncCommitter:
    """Batches of up to `batch_size` outcomes, recorded in the order they came."""

    def __init__(
        self,
        connection: redis.asyncio.Redis,
        recorder: OutcomeRecorder,
        log: logging.Logger,
        recorded: Callable[[list[InFlight]], None],
        batch_size: int = 256,
        batch_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.recorder, self.log, self.recorded, self.batch_size = recorder, log, recorded, batch_size
        self.batch_bytes = batch_bytes  # of answers per batch; a larger answer goes alone
        self.script = connection.register_script(redis_scripts.source("record_outcomes"))
        self.keys = recorder.keys
        self.give_up_after = 30  # tries at an error that does not pass by itself (not: Redis away or full)
        self._outcomes: list[tuple[InFlight, Attempt]] = []
        self._ready = asyncio.Event()

    def put(self, item: InFlight, attempt: Attempt) -> None:
        self._outcomes.append((item, attempt))
        self._ready.set()

    async def run(self) -> None:
        """Records what comes, until cancelled (after the worker has drained)."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._outcomes:
                batch = self.next_batch()
                await self._record(batch)
                self.recorded([item for item, _ in batch])

    def next_batch(self) -> list[tuple[InFlight, Attempt]]:
        """The oldest outcomes, at most `batch_size` of them and `batch_bytes` of answers (at least one)."""
        taken, size = 0, 0
        for _, attempt in self._outcomes[: self.batch_size]:
            size += attempt.answer_bytes
            if taken and size > self.batch_bytes:
                break
            taken += 1
        batch = self._outcomes[:taken]
        del self._outcomes[:taken]
        return batch

    async def _script_args(self, batch: list[tuple[InFlight, Attempt]]) -> list[Any]:
        """The batch's ARGV, built in a thread when its answers are large (pickle and base64 of each)."""
        if sum(attempt.answer_bytes for _, attempt in batch) > LARGE_ANSWER:
            return await asyncio.to_thread(self.recorder.script_args, batch)
        return self.recorder.script_args(batch)

    async def _record(self, batch: list[tuple[InFlight, Attempt]]) -> None:
        """Records the batch, retrying while Redis is away or refuses writes (recording twice is harmless).
        After `give_up_after` other errors it lets go: without heartbeats, recovery retries the requests."""
        failures = 0
        while True:
            try:
                args = await self._script_args(batch)
                stale = int(await async_redis.answer(self.script(keys=self.keys, args=args)))
                log_recorded(batch)
                if stale:
                    self.log.warning("%d outcomes came after recovery had taken their requests", stale)
                return
            except Exception as error:
                failures += 1
                if isinstance(error, redis.RedisError) and redis_errors.passing(error):
                    self.log.warning("cannot record %d outcomes yet (%s)", len(batch), error)
                else:
                    self.log.exception("recording %d outcomes failed", len(batch))
                    if failures >= self.give_up_after:
                        return
            await asyncio.sleep(redis_errors.backoff(failures))
