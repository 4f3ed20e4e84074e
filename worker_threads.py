"""A QueueWorker's threads: forwarders that make the HTTP calls, and one committer that records outcomes.

The main thread claims requests and hands each to a forwarder through a work queue; each forwarder hands
its attempt to the committer, which records them in batches (one Lua call per batch) and then frees the
request's slot in the InFlightTable.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import redis

import redis_errors
from forwarding import Attempt
from inflight import InFlight, InFlightTable
from outcomes import OutcomeRecorder, log_recorded

_STOP = None  # put on a work queue: the thread reading it ends


class Forwarders:
    """`count` threads, each forwarding one claimed request at a time."""

    def __init__(self, count: int, attempt: Callable[[InFlight], Attempt], committer: Committer) -> None:
        self._work: queue.SimpleQueue[InFlight | None] = queue.SimpleQueue()
        self._attempt, self._committer = attempt, committer
        self._threads = [threading.Thread(target=self._loop, name=f"forward-{n}", daemon=True) for n in range(count)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def put(self, item: InFlight) -> None:
        self._work.put(item)

    def stop(self) -> None:
        for _ in self._threads:
            self._work.put(_STOP)

    def _loop(self) -> None:
        while (item := self._work.get()) is not _STOP:
            self._committer.put(item, self._attempt(item))


class Committer(threading.Thread):
    """Records outcomes in batches of up to `batch_size`, keeping a batch until Redis takes it."""

    def __init__(
        self, recorder: OutcomeRecorder, in_flight: InFlightTable, log: logging.Logger, batch_size: int = 256
    ) -> None:
        super().__init__(name="commit", daemon=True)
        self.recorder, self.in_flight, self.log, self.batch_size = recorder, in_flight, log, batch_size
        self.give_up_after = 30  # tries at an error that does not pass by itself (not: Redis away or full)
        self._outcomes: queue.SimpleQueue[tuple[InFlight, Attempt] | None] = queue.SimpleQueue()

    def put(self, item: InFlight, attempt: Attempt) -> None:
        self._outcomes.put((item, attempt))

    def stop(self) -> None:
        self._outcomes.put(_STOP)

    def run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._record(batch)
            self.in_flight.remove([item for item, _ in batch])

    def _next_batch(self) -> list[tuple[InFlight, Attempt]] | None:
        first = self._outcomes.get()
        if first is _STOP:
            return None
        batch = [first]
        while len(batch) < self.batch_size:
            try:
                following = self._outcomes.get_nowait()
            except queue.Empty:
                break
            if following is _STOP:
                self._outcomes.put(_STOP)  # end after this batch
                break
            batch.append(following)
        return batch

    def _record(self, batch: list[tuple[InFlight, Attempt]]) -> None:
        """Records the batch, retrying while Redis is away or refuses writes (recording twice is harmless).
        After `give_up_after` other errors it lets go: without heartbeats, recovery retries the requests."""
        failures = 0
        while True:
            try:
                stale = self.recorder.record(batch)
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
            time.sleep(redis_errors.backoff(failures))
