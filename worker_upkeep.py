"""What a QueueWorker runs through RQ's synchronous client, outside its event loop: upkeep and
heartbeats (in its one upkeep thread, so a slow Redis call never stalls forwarding), and start and end."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import redis
from rq.worker import WorkerStatus

import callbacks
import keys
import recovery
import redis_errors
import sink_log
from inflight import InFlight

if TYPE_CHECKING:
    from queue_worker import QueueWorker


def upkeep(worker: QueueWorker, in_flight: list[InFlight]) -> None:
    """Whatever of heartbeat, promotion, recovery, sweep, trim, callbacks and maintenance is due now."""
    if worker.schedule.due("heartbeat", worker.heartbeat_interval):
        heartbeat(worker, in_flight)
    if worker._draining:
        return  # while draining: heartbeats only; what is claimed is finishing, nothing new is taken
    if worker.schedule.due("promote", worker.promote_interval):
        worker._promote_due()
    if worker.schedule.due("recover", worker.recover_interval):
        with recovery.exclusive(worker.connection, f"recover:{worker._queue_set}", worker.name) as mine:
            if mine:
                recovery.recover_abandoned(worker.connection, worker.queue_keys, worker._exc_handlers)
    if worker.schedule.due("orphans", worker.orphan_interval):
        with recovery.exclusive(worker.connection, f"orphans:{worker._queue_set}", worker.name) as mine:
            if mine:
                worker._orphans.run()
    if worker.schedule.due("sink-trim", worker.sink_trim_interval):
        with recovery.exclusive(worker.connection, "sink-trim", worker.name) as mine:
            if mine:
                sink_log.trim_expired(worker.connection, time.time() - worker.settings.result_ttl)
    if worker.schedule.due("callbacks", worker.callback_interval):
        callbacks.run(worker.connection, worker.settings, worker.name)
    if worker.schedule.due("maintenance", worker.maintenance_interval):
        worker.clean_registries()  # RQ's own maintenance, which RQ's work loop would run
        recovery.clean_canceled(worker.connection, worker.queue_keys)


def heartbeat(worker: QueueWorker, in_flight: list[InFlight]) -> None:
    """The worker's and each claimed request's heartbeat, in one pipeline."""
    deadline = time.time() + worker.heartbeat_ttl
    with worker.connection.pipeline(transaction=False) as pipe:
        worker.heartbeat(pipeline=pipe)
        worker.set_state(WorkerStatus.BUSY if in_flight else WorkerStatus.IDLE, pipeline=pipe)
        for item in in_flight:
            # What RQ's Execution.heartbeat refreshes: the StartedJobRegistry entry, the Execution,
            # and the job's ExecutionRegistry (which the orphan sweep reads), 60 s past the deadline.
            composite, executions_key = item.composite_key, keys.EXECUTIONS_REGISTRY_PREFIX + item.id
            pipe.zadd(item.queue.started, {composite: deadline}, xx=True)
            pipe.expire(keys.EXECUTION_PREFIX + composite, worker.heartbeat_ttl)
            pipe.zadd(executions_key, {item.execution_id: deadline + 60}, xx=True)
            pipe.expire(executions_key, worker.heartbeat_ttl + 60)
        pipe.execute()


def bootstrap(worker: QueueWorker, logging_level: str, date_format: str, log_format: str) -> None:
    """RQ's bootstrap (register, subscribe), after waiting for Redis if it is away or refusing writes."""
    failures = 0
    while True:
        try:
            worker.bootstrap(logging_level, date_format, log_format)
            return
        except redis.RedisError as error:
            failures += 1
            worker.log.warning("Worker %s: waiting for Redis (%s)", worker.name, redis_errors.describe(error))
            time.sleep(redis_errors.backoff(failures))


def teardown_quietly(worker: QueueWorker) -> None:
    try:
        worker.teardown()
    except redis.RedisError as error:
        worker.log.warning(
            "Worker %s: Redis unavailable at shutdown (%s); its registration will expire",
            worker.name,
            redis_errors.describe(error),
        )
