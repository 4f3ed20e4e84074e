"""What RQ workers run.

`forward` is the job function behind every request (its path, `worker.forward`, is pickled into every
queued job); plain `rq worker high default` runs it, one fork per request. `QueueWorker` is the worker
class to run in production (`rq worker -w worker.QueueWorker --config worker high default`): thousands of
requests in flight from one process, claimed from Redis atomically, recorded in batches, and the upkeep of
recovery.py, so due retries and dead workers' requests are handled within seconds.

QueueWorker lives in queue_worker.py and is imported only when asked for: plain `rq worker` imports this
module in every forked job, and the asyncio worker's libraries (aiohttp, redis.asyncio, the metrics) took
~320 ms of the ~460 ms that import cost (python -X importtime, one-off).
"""

from __future__ import annotations

from typing import Any

from rq.job import get_current_job

import forwarding
import keys
import lifecycle
import logs
import redis_connection
from forwarding import Attempt, ModelRequest
from settings import Settings, get_settings

# `rq worker --config worker` reads these: the queues in priority order, and Redis as the settings say
# (a redis+sentinel:// URL as RQ's SENTINEL dict, REDIS_URL then None: redis_connection.py).
QUEUES = list(keys.QUEUE_NAMES)
REDIS_URL, SENTINEL = redis_connection.rq_cli_settings(get_settings().redis_url, get_settings().redis_timeout)
# Before `rq worker` sets up RQ's log handler (it adds none when one exists), so that under
# log_format = "json" RQ's own lines are JSON too (logs.py).
logs.configure(get_settings().log_format)


class ForwardError(Exception):
    """An attempt failed; its message is the cause the sink reports."""


def attempt(settings: Settings, request_id: str, request: ModelRequest) -> Attempt:
    """One forwarding attempt, with the worker's settings for the service."""
    target = settings.target_for(request.service)
    return forwarding.send(target, request_id, request, settings.forward_timeout, settings.max_result_bytes)


def forward(
    service: str,
    subpath: str,
    query: forwarding.Query,
    content_type: str | None,
    body: bytes,
    content_encoding: str | None = None,
) -> dict[str, Any]:
    """The RQ job function: forwards one request once. RQ retries it (retry_intervals) when it raises.

    Used as is by plain `rq worker`; QueueWorker does the same steps itself, batched. Jobs queued before
    raw queries and content encodings were forwarded hold five arguments, `query` as (key, value) pairs.
    """
    job = get_current_job()
    assert job is not None, "worker.forward runs inside an RQ worker"
    with job.connection.pipeline() as pipe:
        pipe.hmget(job.key, keys.EXPIRES_AT_FIELD, keys.ATTEMPTS_FIELD)
        pipe.time()
        (expires_at, attempts), time_reply = pipe.execute()
    if lifecycle.has_expired(float(expires_at or 0), int(attempts or 0), lifecycle.clock_seconds(time_reply)):
        # RQ ends a job that raises as FAILED; the sink reports it EXPIRED, by this field (lifecycle.py).
        job.connection.hset(job.key, keys.OUTCOME_FIELD, "expired")
        job.retries_left = 0
        raise ForwardError("expired before it was started")
    job.connection.hincrby(job.key, keys.ATTEMPTS_FIELD, 1)
    request = ModelRequest(service, subpath, query, content_type, body, content_encoding)
    result = attempt(get_settings(), job.id, request)
    if result.result is not None:
        return result.result
    job.connection.hset(job.key, keys.LAST_ERROR_FIELD, result.error or "")
    if not result.retryable:
        job.retries_left = 0  # RQ would otherwise retry any exception
    raise ForwardError(result.error)


def __getattr__(name: str) -> Any:
    """`worker.QueueWorker`, loaded on first use (RQ's import_attribute asks for it by name)."""
    if name == "QueueWorker":
        from queue_worker import QueueWorker

        return QueueWorker
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
