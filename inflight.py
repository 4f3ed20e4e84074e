"""The requests a QueueWorker has claimed and not yet recorded, shared by its threads."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from rq.executions import Execution
from rq.job import Job

from keys import QueueKeys


@dataclass
class InFlight:
    """A request this worker has claimed and not yet recorded."""

    job: Job
    queue: QueueKeys
    execution: Execution
    # For the metrics and log lines (metrics.py, logs.py): which attempt this is, when the request was
    # accepted (RQ's timestamp text), and what the attempt took and got (set by the forwarder).
    attempt: int = 0
    enqueued_at: str | None = None
    forward_seconds: float = 0.0
    model_code: str = "none"  # the model's HTTP status code, "none" when it did not answer


class InFlightTable:
    """The claimed requests by id, and a condition to wait on for free slots (at most `capacity`)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: dict[str, InFlight] = {}
        self._changed = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, items: list[InFlight]) -> None:
        with self._changed:
            for item in items:
                self._items[item.job.id] = item

    def remove(self, items: list[InFlight]) -> None:
        with self._changed:
            for item in items:
                self._items.pop(item.job.id, None)
            self._changed.notify_all()

    def snapshot(self) -> list[InFlight]:
        with self._changed:
            return list(self._items.values())

    def free_slots(self, batch_wait: float, full_wait: float) -> int:
        """How many more requests to claim now. When full, waits up to `full_wait` for a slot; while some
        are in flight, waits up to `batch_wait` for a quarter of the slots to be free: each claim is a
        round trip, so claiming a few at a time costs CPU."""
        with self._changed:
            if len(self._items) >= self.capacity:
                self._changed.wait(timeout=full_wait)
            if self._items:
                batch = max(1, self.capacity // 4)
                self._changed.wait_for(lambda: self.capacity - len(self._items) >= batch, batch_wait)
            return self.capacity - len(self._items)

    def wait_until_empty(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._items and time.monotonic() < deadline:
                self._changed.wait(timeout=0.5)
            return not self._items
