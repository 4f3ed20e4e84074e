"""Prometheus metrics at `/metrics`: what the API counts itself, and what Redis already knows.

Two sources, chosen by where the fact is decided:

- **Counted in Redis, in the Lua call that makes the change** (`eas:metrics`, one hash): requests ended
  by service and outcome (every append to a sink log: lua/record_outcomes.lua, lua/claim.lua for an
  expiry, lua/sink_append.lua for a cancel), forwarding attempts by the model's status code, their
  duration as histogram buckets, and retries (lua/record_outcomes.lua). So workers need no HTTP endpoint:
  they are `rq worker` processes (a worker-pool forks several per host, KEDA scales them to zero), which
  would each need a port, service discovery, and would lose their last counts when scaled down before a
  scrape. Counting inside the script costs no round trip, and counts an outcome exactly when it is
  recorded, once, even when a committer repeats a batch whose answer it lost (a repeat finds its requests
  already recorded). The API reads the hash at scrape time (`RedisCollector`), with the queues' depths,
  the oldest waiting request's age, RQ's registries and live workers, so **every API process exports the
  same cluster-wide totals**: aggregate them with `max` across instances, never `sum`.
- **Counted in the API process** (prometheus-client's multiprocess mode, `PROMETHEUS_MULTIPROC_DIR`, set up
  by server.py for gunicorn's workers): every answer to a submit by service, priority and status code,
  and the clients waiting in long-polls and streams (notifier.EndedNotifier). A submit's answer is
  decided in the API, often before Redis is touched (400, 401, 403, 413, 503 when Redis is away), and
  counting it in memory-mapped files costs about a microsecond, no Redis write per refused request, and
  still counts during a Redis outage. These are per API host: `sum` them across instances.

`service` is the name only once the request passed the service and token checks (else ""): a client
without a token cannot add series. `priority` is `high` or `default`, as the queue.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Iterator

import redis
from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

import forwarding
import keys
import logs
import queue_reads

SERVICE_ENVIRON = "eas_queue.service"  # set by api.submit once the service and its token are accepted
STARTED_ENVIRON = "eas_queue.started"
FORWARD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BUCKET_LABELS = (*(floatToGoString(b) for b in FORWARD_BUCKETS), "+Inf")
SUBMIT_ENDPOINT = "api.submit"

LOCAL = CollectorRegistry(auto_describe=True)  # this process's metrics, when not under gunicorn
SUBMITS = Counter(
    "eas_queue_submits", "Answers to submits, by status code.", ["service", "priority", "code"], registry=LOCAL
)
WAITING_CLIENTS = Gauge(
    "eas_queue_waiting_clients",
    "Clients waiting now in a long-poll or a stream (watch) for requests to end.",
    multiprocess_mode="livesum",
    registry=LOCAL,
)

bp = Blueprint("metrics", __name__)


def model_status(attempt: forwarding.Attempt) -> str:
    """The model's HTTP status code for an attempt, as a label ("none": it did not answer)."""
    return "none" if attempt.status_code is None else str(attempt.status_code)


def bucket_label(seconds: float) -> str:
    """The `le` of the histogram bucket a forwarding attempt of `seconds` falls in."""
    return BUCKET_LABELS[bisect_left(FORWARD_BUCKETS, seconds)]


# --- the API's own counts ---------------------------------------------------------------------------


def install(app: Flask) -> None:
    """Adds `/metrics` and the submit hooks (a log line and a count per answer) to the app."""
    app.register_blueprint(bp)
    app.before_request(_submit_started)
    app.after_request(_submit_answered)


def _submit_started() -> None:
    if request.endpoint == SUBMIT_ENDPOINT and request.method == "POST":  # an OPTIONS there is no submit
        request.environ[STARTED_ENVIRON] = time.perf_counter()


def _submit_answered(response: Response) -> Response:
    """Runs for every answer to a submit, refusals included (errors.py's handlers make responses too)."""
    environ = request.environ
    started = environ.get(STARTED_ENVIRON)
    if started is None:
        return response
    service = environ.get(SERVICE_ENVIRON, "")
    priority = keys.QUEUE_NAMES[0] if request.args.get("_priority_") == "1" else keys.QUEUE_NAMES[1]
    code = response.status_code
    SUBMITS.labels(service, priority, str(code)).inc()
    request_id = response.headers.get(forwarding.REQUEST_ID_HEADER, "")
    logs.event("submit", request_id, service, priority, 0, code, time.perf_counter() - started)
    return response


# --- /metrics ---------------------------------------------------------------------------------------


@bp.get("/metrics")
def metrics() -> Response:
    """The exposition: this host's counts (all gunicorn workers') then the cluster's, read from Redis.
    No token: Prometheus and KEDA scrape it; it shows service names and counts, no request or token, and
    should be reachable only from the monitoring network (README, Metrics)."""
    from_redis = CollectorRegistry(auto_describe=False)
    from_redis.register(RedisCollector(current_app.extensions["eas_queue"].connection))
    body = generate_latest(_local_registry()) + generate_latest(from_redis)
    return Response(body, content_type=CONTENT_TYPE_LATEST)


def _local_registry() -> CollectorRegistry:
    """Under gunicorn, every worker's counts, from the shared directory; otherwise this process's."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return LOCAL
    registry = CollectorRegistry(auto_describe=False)
    multiprocess.MultiProcessCollector(registry)
    return registry


class RedisCollector:
    """Reads the cluster's figures from Redis at scrape time in three pipelined round trips: the snapshot of
    the queues and workers (queue_reads.py, two), then the counters and the webhooks queue."""

    def __init__(self, connection: redis.Redis) -> None:
        self.connection = connection

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("eas_queue_redis_up", "1 when Redis answered this scrape, else 0.")
        try:
            families = list(self._read())
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self) -> Iterator[Metric]:
        snapshot = queue_reads.read_snapshot(self.connection)
        counters, webhooks = self._counters_and_webhooks()
        yield from counter_families(counters)
        yield from queue_families(snapshot.queues)
        yield from webhook_families(webhooks)
        workers = GaugeMetricFamily("eas_queue_workers", "Live RQ workers (their registration has not expired).")
        workers.add_metric([], snapshot.live_workers)
        yield workers

    def _counters_and_webhooks(self) -> tuple[dict[bytes, bytes], dict[str, int]]:
        live_from = f"({time.time()}"  # finished and failed entries are scored by their expiry
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.METRICS)
            w = keys.queue_keys(keys.WEBHOOKS_QUEUE)
            pipe.llen(w.queue).zcard(w.started).zcard(w.scheduled)
            pipe.zcount(w.finished, live_from, "+inf").zcount(w.failed, live_from, "+inf")
            counters, *webhook_counts = pipe.execute()
        webhooks = dict(zip(("waiting", "started", "scheduled", "finished", "failed"), webhook_counts, strict=True))
        return counters, webhooks


def counter_families(counters: dict[bytes, bytes]) -> Iterator[Metric]:
    """The `eas:metrics` hash as families; its fields are `<kind>|<service>[|<label>]` (the .lua files)."""
    ended = CounterMetricFamily(
        "eas_queue_requests_ended", "Requests ended, by outcome (the sink's status).", labels=["service", "outcome"]
    )
    attempts = CounterMetricFamily(
        "eas_queue_forward_attempts",
        "Forwarding attempts recorded, by the model's HTTP status code (none: no answer).",
        labels=["service", "code"],
    )
    retries = CounterMetricFamily("eas_queue_retries", "Failed attempts scheduled for a retry.", labels=["service"])
    buckets: dict[str, dict[str, float]] = {}
    sums: dict[str, float] = {}
    for raw_field, raw_value in counters.items():
        kind, service, label = (raw_field.decode().split("|") + [""])[:3]
        if kind == "ended":
            ended.add_metric([service, label], float(raw_value))
        elif kind == "forwards":
            attempts.add_metric([service, label], float(raw_value))
        elif kind == "retries":
            retries.add_metric([service], float(raw_value))
        elif kind == "forward_le":
            buckets.setdefault(service, {})[label] = float(raw_value)
        elif kind == "forward_sum":
            sums[service] = float(raw_value)
    yield from (ended, attempts, retries)
    yield forward_histogram(buckets, sums)


def forward_histogram(buckets: dict[str, dict[str, float]], sums: dict[str, float]) -> Metric:
    """Stored per bucket, exported cumulative, as Prometheus wants them."""
    histogram = HistogramMetricFamily(
        "eas_queue_forward_duration_seconds",
        "Duration of recorded forwarding attempts, from sending to the answer's last byte.",
        labels=["service"],
    )
    for service in sorted(buckets):
        total, cumulative = 0.0, []
        for label in BUCKET_LABELS:
            total += buckets[service].get(label, 0.0)
            cumulative.append((label, total))
        histogram.add_metric([service], cumulative, sums.get(service, 0.0))
    return histogram


def queue_families(queues: dict[str, queue_reads.QueueDepth]) -> Iterator[Metric]:
    """Per priority: waiting (the backlog KEDA scales on), its oldest's age, being forwarded, retrying."""
    families = {
        "waiting": GaugeMetricFamily("eas_queue_waiting_requests", "Requests waiting in a queue.", labels=["priority"]),
        "started": GaugeMetricFamily(
            "eas_queue_started_requests", "Requests a worker is forwarding now.", labels=["priority"]
        ),
        "scheduled": GaugeMetricFamily(
            "eas_queue_retrying_requests", "Requests waiting for their retry to fall due.", labels=["priority"]
        ),
    }
    age = GaugeMetricFamily(
        "eas_queue_oldest_waiting_age_seconds",
        "How long the oldest request waiting in the queue has waited (0: none waits).",
        labels=["priority"],
    )
    for name, depth in queues.items():
        for field, family in families.items():
            family.add_metric([name], getattr(depth, field))
        age.add_metric([name], depth.oldest_waiting_seconds or 0.0)
    yield from (*families.values(), age)


def webhook_families(counts: dict[str, int]) -> Iterator[Metric]:
    """The `webhooks` queue's depth, and its deliveries in RQ's registries (kept for their result ttl)."""
    waiting = GaugeMetricFamily("eas_queue_webhook_deliveries_waiting", "Webhook deliveries waiting in their queue.")
    waiting.add_metric([], counts["waiting"])
    kept = GaugeMetricFamily(
        "eas_queue_webhook_deliveries",
        "Webhook deliveries in RQ's registries of the webhooks queue: started, scheduled (a retry), "
        "finished (delivered) and failed, the last two until their entries expire.",
        labels=["state"],
    )
    for state in ("started", "scheduled", "finished", "failed"):
        kept.add_metric([state], counts[state])
    return iter((waiting, kept))
