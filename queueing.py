"""How a prediction request enters Redis: as an RQ job in RQ's own data model.

The API and the workers share this module. A request is an RQ job (job id = request id) on the queue
`high` or `default`, calling `worker.forward` with the request as its arguments. Beyond RQ's fields, the
job hash carries a few plain fields of ours, prefixed `eas_`, because Lua scripts must read them
atomically (RQ's `meta` is pickled):

  eas_service     the service name, so the sink can refuse another service's id
  eas_expires_at  unix time after which a request that never started ends EXPIRED (absent: never)
  eas_attempts    forwarding attempts so far, counted when an attempt starts (so a killed one counts)
  eas_last_error  why the last attempt failed, shown while the request waits for its retry
  eas_outcome     `canceled` or `expired` for requests that ended without being forwarded
  eas_tags        its tags, the query parameters not named `_..._`, as a JSON map (EAS's tags)
  eas_callback_url  where its completion webhook goes (webhooks.py); lua/*.lua read it as it ends
  eas_callback    that webhook's delivery state (JSON), written by the delivery job

One more structure goes beyond RQ: the sorted set `eas:open` (request id -> accept time) indexes requests
that have not ended. Workers sweep it to find requests that a crash left in no queue and no registry
(recovery.py); it is the one piece of bookkeeping RQ cannot give us. keys.py names every key and field;
lifecycle.py says how a job's state reads at the sink.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import redis
from rq.job import Job, JobStatus, Retry
from rq.serializers import DefaultSerializer
from rq.utils import now, utcformat

import keys
import redis_connection
import redis_scripts
from forwarding import ModelRequest
from keys import QUEUE_NAMES
from settings import Settings

# The job function's import path, pickled into every queued job: it must keep working for jobs in Redis.
FORWARD_FUNCTION = "worker.forward"
REQUEST_ID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # fullmatch
# Extra seconds RQ's job timeout (the hard kill in plain `rq worker`) allows beyond one attempt.
JOB_TIMEOUT_MARGIN = 30


def connect(url: str, timeout: float) -> redis.Redis:
    """A Redis client that fails within about `timeout` seconds when Redis is away and reconnects by itself
    (to the current master, for a redis+sentinel:// URL: redis_connection.py)."""
    return redis_connection.connect(url, timeout)


def is_request_id(text: str) -> bool:
    """Request ids are lowercase UUIDs, as RQ names jobs."""
    return REQUEST_ID_PATTERN.fullmatch(text) is not None


_PER_REQUEST_FIELDS = ("created_at", "enqueued_at", "data", "description")


@dataclass(frozen=True)
class Submission:
    """A validated request to forward."""

    service: str
    subpath: str
    query: tuple[tuple[str, str], ...]
    content_type: str | None
    body: bytes
    priority: bool
    ttl: float | None  # seconds it may wait in the queue; None: no limit
    idempotency_key: str | None
    raw_query: str | None = None  # what the model gets (forwarding.forwarded_query); None: `query` encoded
    content_encoding: str | None = None
    callback_url: str | None = None  # its completion webhook (webhooks.py), checked by callback_urls.py

    @property
    def model_request(self) -> ModelRequest:
        query = self.query if self.raw_query is None else self.raw_query
        return ModelRequest(self.service, self.subpath, query, self.content_type, self.body, self.content_encoding)


EnqueueOutcome = Literal["queued", "duplicate", "conflict", "full"]  # conflict: same key, another request


@dataclass(frozen=True)
class Enqueued:
    request_id: str
    outcome: EnqueueOutcome


def _compress(data: bytes) -> bytes:
    """zlib, as RQ stores job data, but with a 4 KB window: setting up zlib's default 32 KB window takes
    about 50 us, longer than compressing a typical request. Any zlib stream decompresses the same."""
    packer = zlib.compressobj(6, zlib.DEFLATED, 12, 4)
    return packer.compress(data) + packer.flush()


def tags_json(query: tuple[tuple[str, str], ...]) -> str:
    """A request's tags as stored: a flat JSON map, the first value of a repeated name (as `request.args`
    reads it). Kept apart from the body, which a finished request drops, so the sink can show them."""
    tags: dict[str, str] = {}
    for name, value in query:
        tags.setdefault(name, value)
    return json.dumps(tags, separators=(",", ":"), ensure_ascii=False)


def _queue_name(submission: Submission) -> str:
    return QUEUE_NAMES[0] if submission.priority else QUEUE_NAMES[1]


def _job_args(submission: Submission) -> tuple:
    """The arguments of worker.forward: the ModelRequest as a plain tuple (a NamedTuple would pickle its
    class path into every job); five of them, as before content encodings, when there is none."""
    args = tuple(submission.model_request)
    return args if submission.content_encoding else args[:5]


def _description(submission: Submission) -> str:
    """What the dashboard shows for the job."""
    return f"POST /api/predict/{submission.service}" + (f"/{submission.subpath}" if submission.subpath else "")


def _fingerprint(submission: Submission) -> str:
    digest = hashlib.sha256()
    for part in (submission.subpath, repr(submission.query), submission.content_type or "", str(submission.priority)):
        digest.update(part.encode() + b"\0")
    if submission.content_encoding:  # only then, so a key's fingerprint is the same as before it existed
        digest.update(b"content-encoding:" + submission.content_encoding.encode() + b"\0")
    if submission.callback_url:  # likewise
        digest.update(b"callback-url:" + submission.callback_url.encode() + b"\0")
    digest.update(submission.body)
    return digest.hexdigest()


def idempotency_key(service: str, client_key: str) -> str:
    return keys.idempotency_key(service, hashlib.sha256(client_key.encode()).hexdigest())


class Enqueuer:
    """Turns submissions into RQ jobs and enqueues each in one Redis round trip."""

    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        self.connection = connection
        self.settings = settings
        self.script = redis_scripts.register(connection, "enqueue")
        retries = settings.retry_intervals
        # A retried request goes back to the front of its queue: it has already waited its turn.
        self.retry = Retry(max=len(retries), interval=list(retries), enqueue_at_front=True) if retries else None
        self.job_timeout = int(settings.forward_timeout) + JOB_TIMEOUT_MARGIN
        # What every job of a queue has in common, serialized once by RQ (Job.to_dict); job_fields adds
        # what differs. Building each job through Job.create and to_dict was a fifth of the API's CPU time.
        self.shared_fields = {}
        for name in QUEUE_NAMES:
            template = self.build_job(Submission("s", "", (), None, b"", name == QUEUE_NAMES[0], None, None))
            shared = {k: v for k, v in template.to_dict().items() if v != "" and k not in _PER_REQUEST_FIELDS}
            self.shared_fields[name] = {**shared, "status": JobStatus.QUEUED.value}

    def build_job(self, submission: Submission) -> Job:
        """The RQ job for a submission, built by RQ (the reference that job_fields must match)."""
        job = Job.create(
            FORWARD_FUNCTION,
            args=_job_args(submission),
            connection=self.connection,
            result_ttl=self.settings.result_ttl,
            failure_ttl=self.settings.failure_ttl,
            timeout=self.job_timeout,
            retry=self.retry,
            status=JobStatus.QUEUED,
            origin=_queue_name(submission),
            description=_description(submission),
        )
        job.enqueued_at = job.created_at
        return job

    def job_fields(self, submission: Submission, created_at: datetime) -> dict[str, Any]:
        """The hash RQ's Job.save writes for this submission's job (its empty fields left out)."""
        created = utcformat(created_at)
        return {
            **self.shared_fields[_queue_name(submission)],
            "created_at": created,
            "enqueued_at": created,
            # RQ's Job.data: its serializer over (function, instance, args, kwargs), zlib-compressed.
            "data": _compress(DefaultSerializer.dumps((FORWARD_FUNCTION, None, _job_args(submission), {}))),
            "description": _description(submission),
        }

    def enqueue(self, submission: Submission) -> Enqueued:
        request_id = str(uuid.uuid4())  # as RQ names jobs
        fields = self.job_fields(submission, now())
        fields[keys.SERVICE_FIELD] = submission.service
        if submission.query:
            fields[keys.TAGS_FIELD] = tags_json(submission.query)
        if submission.callback_url:
            fields[keys.CALLBACK_URL_FIELD] = submission.callback_url
        limits = [t for t in (self.settings.queue_ttl or None, submission.ttl) if t]
        script_keys = [
            keys.queue_keys(_queue_name(submission)).queue,
            keys.job_key(request_id),
            keys.QUEUES_SET,
            keys.OPEN_REQUESTS,
        ]
        fingerprint = ""
        if submission.idempotency_key is not None:
            script_keys.append(idempotency_key(submission.service, submission.idempotency_key))
            fingerprint = _fingerprint(submission)
        args: list[Any] = [
            self.settings.max_queue_length,
            request_id,
            repr(min(limits)) if limits else "",
            f"{request_id} {fingerprint}",
            self.settings.result_ttl,
        ]
        for name, value in fields.items():
            args += [name, value]
        answer = self.script(keys=script_keys, args=args)
        outcome = answer[0].decode()
        if outcome == "duplicate":
            first_id, _, first_fingerprint = answer[1].decode().partition(" ")
            return Enqueued(first_id, "duplicate" if first_fingerprint == fingerprint else "conflict")
        return Enqueued(request_id, "full" if outcome == "full" else "queued")
