"""A request a QueueWorker has claimed and not yet recorded."""

from __future__ import annotations

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
    # accepted (RQ's timestamp text), and what the attempt took and got (set by QueueWorker._forward).
    attempt: int = 0
    enqueued_at: str | None = None
    forward_seconds: float = 0.0
    model_code: str = "none"  # the model's HTTP status code, "none" when it did not answer
