"""Every Redis key and job-hash field eas-queue reads or writes, named once.

RQ's keys are taken from RQ's own classes where it exposes them. The execution keys it builds inside
methods are spelled here, tied to the rq version pinned in requirements.txt; `tests/test_scripts.py`
checks them against what RQ itself writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from rq.defaults import RQ_KEY_PREFIX
from rq.executions import ExecutionRegistry
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.queue import Queue
from rq.registry import (
    CanceledJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.results import Result

QUEUE_NAMES = ("high", "default")  # strict priority order: every `high` request before any `default` one

# RQ's keys
JOB_PREFIX = Job.redis_job_namespace_prefix  # rq:job:<id>, a hash
QUEUES_SET = Queue.redis_queues_keys  # rq:queues, the set of known queue keys
RESULTS_PREFIX = Result.get_key("")  # rq:results:<id>, a stream
EXECUTION_PREFIX = RQ_KEY_PREFIX + ":execution:"  # rq.executions.Execution.key: <prefix><job id>:<execution id>
EXECUTIONS_REGISTRY_PREFIX = ExecutionRegistry.key_template.format("")  # one sorted set per job

# eas-queue's own keys
OPEN_REQUESTS = "eas:open"  # sorted set: request id -> accept time, for every request not yet ended
ORPHAN_SUSPECTS = "eas:orphan-suspects"  # :<queues>, a set of "<id>:<status>" that looked lost on the last sweep
IDEMPOTENCY_PREFIX = "eas:idempotency:"  # <prefix><service>:<sha256 of the client's key> -> "<id> <fingerprint>"
LOCK_PREFIX = "eas:lock:"  # one worker at a time runs each recovery task
READINESS_PROBE = "eas:readiness-probe"  # written by /readyz
SINK_LOG_PREFIX = "eas:sink:"  # <prefix><service>: a stream of the service's ended requests, ids 0-<index>
SINK_INDEXES = "eas:sink-indexes"  # hash: service -> the last sink index given out
ENDED_CHANNEL = "eas:ended"  # pub/sub: a line "<service> <index> <request id>" per ended request
CALLBACK_OUTBOX = "eas:callbacks"  # list: "<service> <index> <id> <url>" per ended request with a callback,
# until its delivery job is queued (callbacks.py)
WEBHOOKS_QUEUE = "webhooks"  # RQ queue of webhook deliveries, run by its own QueueWorker
METRICS = "eas:metrics"  # hash: counters the .lua scripts keep for /metrics, "<kind>|<service>[|<label>]"

# Plain fields of ours in RQ's job hash (Lua scripts must read them; RQ's `meta` is pickled). The .lua
# files spell these names too.
SERVICE_FIELD = "eas_service"  # the service name, so the sink can refuse another service's id
EXPIRES_AT_FIELD = "eas_expires_at"  # unix time (Redis's clock) after which an unstarted request expires
ATTEMPTS_FIELD = "eas_attempts"  # forwarding attempts so far, counted when an attempt starts
LAST_ERROR_FIELD = "eas_last_error"  # why the last attempt failed, while the request waits for a retry
OUTCOME_FIELD = "eas_outcome"  # `canceled` or `expired`: ended without being forwarded
SINK_INDEX_FIELD = "eas_sink_index"  # its index in the service's sink log, once it has ended
TAGS_FIELD = "eas_tags"  # JSON map of its tags (query parameters not named `_..._`), if it has any
CALLBACK_URL_FIELD = "eas_callback_url"  # where its completion webhook goes, if anywhere (webhooks.py)
CALLBACK_FIELD = "eas_callback"  # JSON: that webhook's delivery state, for the sink index it reports


def sink_log_key(service: str) -> str:
    return SINK_LOG_PREFIX + service


def job_key(request_id: str) -> str:
    return JOB_PREFIX + request_id


def idempotency_key(service: str, client_key_digest: str) -> str:
    return f"{IDEMPOTENCY_PREFIX}{service}:{client_key_digest}"


@dataclass(frozen=True)
class QueueKeys:
    """The keys of one RQ queue and its registries."""

    name: str
    queue: str
    intermediate: str
    started: str
    finished: str
    failed: str
    scheduled: str
    canceled: str


@cache
def queue_keys(name: str) -> QueueKeys:
    """Worked out once per queue: RQ builds a registry object for each lookup."""
    queue = Queue.redis_queue_namespace_prefix + name
    return QueueKeys(
        name=name,
        queue=queue,
        intermediate=IntermediateQueue.get_intermediate_queue_key(queue),
        started=StartedJobRegistry.key_template.format(name),
        finished=FinishedJobRegistry.key_template.format(name),
        failed=FailedJobRegistry.key_template.format(name),
        scheduled=ScheduledJobRegistry.key_template.format(name),
        canceled=CanceledJobRegistry.key_template.format(name),
    )
