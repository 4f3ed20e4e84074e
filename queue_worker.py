"""QueueWorker: the worker class to run in production (`rq worker -w worker.QueueWorker --config worker high
default`; worker.py hands it out), thousands of requests in flight from one process.

One QueueWorker process runs one asyncio loop: the claim loop (lua/claim.lua, strict priority, atomically
started), one task per request (async_forwarding.send on a shared aiohttp pool) and a committer task that
records finished attempts in batches (async_commit.py, lua/record_outcomes.lua). Claims and records go
through redis.asyncio; heartbeats and upkeep are RQ's own synchronous calls, run in one helper thread
(worker_upkeep.py), so a slow Redis call there never stalls forwarding.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.job import Job
from rq.worker import BaseWorker

import async_forwarding
import async_redis
import claiming
import keys
import recovery
import redis_errors
import redis_scripts
import worker_upkeep
from async_commit import AsyncCommitter
from forwarding import Attempt, ModelRequest
from inflight import InFlight
from outcomes import OutcomeRecorder
from queueing import FORWARD_FUNCTION
from settings import Settings, get_settings


class QueueWorker(BaseWorker):
    """An RQ worker forwarding up to `worker_concurrency` requests at a time from one asyncio loop,
    recording into RQ's own registries, results and retry schedule."""

    heartbeat_ttl = 15  # seconds a claimed request stays "started" without a heartbeat from its worker
    heartbeat_interval = 3.0
    promote_interval = 0.5
    recover_interval = 5.0
    orphan_interval = 5.0
    sink_trim_interval = 60.0  # entries of the sink logs older than result_ttl are dropped this often
    callback_interval = 0.5  # ended requests' webhooks are queued this often (callbacks.py)
    idle_wait = 1.0  # longest blocking wait for new requests, so upkeep keeps its pace
    batch_wait = 0.005  # longest wait for a bigger batch of free slots
    # Requests one claim (and one record) takes at most: Redis runs a claim ~20 us per request, all others
    # waiting, so a claim of 1,000 held it for 22 ms and one of 256 for 5 ms (commandstats, one-off).
    claim_limit = 256

    def __init__(self, *args: Any, settings: Settings | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings or get_settings()
        # RQ's own client (registration, heartbeats, recovery, in the upkeep thread): fail fast, no
        # retries behind our back, a dead link noticed within seconds.
        self.connection.connection_pool.connection_kwargs.update(
            socket_timeout=10, socket_connect_timeout=5, retry=RedisRetry(NoBackoff(), 0)
        )
        self.connection.connection_pool.disconnect()
        self.queue_keys = [keys.queue_keys(q.name) for q in self.queues]
        self._queue_set = ",".join(q.name for q in self.queue_keys)  # recovery runs once per set of queues
        self.capacity = self.settings.worker_concurrency
        self.in_flight: dict[str, InFlight] = {}  # claimed and not yet recorded, by request id
        # Attempts at the model now: at most `capacity`. A slot frees when its attempt ends, not when the
        # committer has recorded it, so the next request is forwarded while the last one is written; at
        # most `capacity` more outcomes may wait to be recorded (a slow Redis stops the claims).
        self.forwarding = 0
        self.schedule = recovery.Schedule()
        self._claim_keys = [keys.OPEN_REQUESTS, self.executions_key, keys.METRICS]
        for q in self.queue_keys:
            self._claim_keys += [q.queue, q.started, q.canceled]
        self._promote_due = recovery.RetryPromoter(self.connection, self.queue_keys)
        self._orphans = recovery.OrphanSweep(self.connection, self.queue_keys, self.log, self.orphan_interval)
        self._recorder = OutcomeRecorder(self.connection, self.settings, self.name, self.executions_key, self.key)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None  # set when slots free up or a stop is asked
        self._tasks: set[asyncio.Task] = set()
        self._draining = False

    # -- the work loop ----------------------------------------------------------------------------

    def work(
        self,
        burst: bool = False,
        logging_level: str | None = None,
        date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
        log_format: str = DEFAULT_LOGGING_FORMAT,
        max_jobs: int | None = None,
        max_idle_time: int | None = None,
        with_scheduler: bool = False,  # upkeep always promotes due retries: no separate scheduler
        **_: Any,
    ) -> bool:
        """Claims and forwards requests until stopped (or, with --burst, until the queues are empty)."""
        worker_upkeep.bootstrap(self, logging_level or "INFO", date_format, log_format)
        self._install_signal_handlers()
        started = 0
        try:
            started = asyncio.run(self._run(burst, max_jobs, max_idle_time))
        finally:
            worker_upkeep.teardown_quietly(self)
        return started > 0

    async def _run(self, burst: bool, max_jobs: int | None, max_idle_time: float | None) -> int:
        self._loop, self._changed = asyncio.get_running_loop(), asyncio.Event()
        self._redis = async_redis.client_like(self.connection)
        self._claim_script = self._redis.register_script(redis_scripts.source("claim"))
        self._http = async_forwarding.session(self.capacity)
        self._deadlines = async_forwarding.Deadlines(self.settings.forward_timeout)
        self._upkeep_thread = ThreadPoolExecutor(1, thread_name_prefix="upkeep")
        self._committer = AsyncCommitter(
            self._redis, self._recorder, self.log, self._recorded, batch_size=self.claim_limit
        )
        tasks = [asyncio.create_task(self._committer.run()), asyncio.create_task(self._upkeep_loop())]
        try:
            started = await self._claim_loop(burst, max_jobs, max_idle_time)
            await self._drain()
            return started
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._http.close()
            await self._redis.aclose()
            self._upkeep_thread.shutdown(wait=True)

    async def _claim_loop(self, burst: bool, max_jobs: int | None, max_idle_time: float | None) -> int:
        started, failures, idle_since = 0, 0, time.monotonic()
        while not self._stop_requested:
            free = min(await self._free_slots(), self.claim_limit)
            if max_jobs is not None:
                free = min(free, max_jobs - started)
            try:
                claimed = await self._claim(free) if free > 0 else []
                if free > 0 and not claimed:
                    if self._idle_enough(burst, max_idle_time, idle_since):
                        break
                    claimed = await self._wait_for_request()
                failures = 0
            except redis.RedisError as error:
                failures += 1
                await self._after_redis_error(error, failures)
                continue
            self.forwarding += len(claimed)
            for item in claimed:
                task = asyncio.create_task(self._forward(item))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if claimed:
                started += len(claimed)
                idle_since = time.monotonic()
            if max_jobs is not None and started >= max_jobs:
                break
        return started

    @property
    def _batch(self) -> int:
        """Free slots worth a claim's round trip: half of them. A claim costs 100-150 us of this process's CPU
        however many it takes; claiming at half rather than a quarter of the slots drained 4-5% more jobs/s
        at 7% less CPU per job (one-off A/B runs of two workers like bench row 2: issue 13 note)."""
        return max(1, min(self.capacity // 2, self.claim_limit))

    def _free(self) -> int:
        """Slots for more attempts: fewer than `capacity` at the model, and fewer than `capacity` outcomes
        waiting for the committer."""
        return min(self.capacity - self.forwarding, 2 * self.capacity - len(self.in_flight))

    async def _free_slots(self) -> int:
        """How many more requests to claim now. When full, waits up to `idle_wait` for a slot; while some
        are in flight, up to `batch_wait` for half of the slots: each claim is a round trip, so claiming a
        few at a time costs CPU."""
        if self._free() <= 0:
            await self._wait_changed(self.idle_wait)
        deadline = time.monotonic() + self.batch_wait
        while self.in_flight and self._free() < self._batch and not self._stop_requested:
            if not await self._wait_changed(deadline - time.monotonic()):
                break
        return self._free()

    async def _wait_changed(self, timeout: float) -> bool:
        assert self._changed is not None
        self._changed.clear()
        if timeout <= 0:
            return False
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
            return True
        except TimeoutError:
            return False

    def _idle_enough(self, burst: bool, max_idle_time: float | None, idle_since: float) -> bool:
        """Nothing to claim and nothing in flight: does --burst or --max-idle-time end the loop now?"""
        if self.in_flight:
            return False
        return burst or (max_idle_time is not None and time.monotonic() - idle_since > max_idle_time)

    async def _after_redis_error(self, error: redis.RedisError, failures: int) -> None:
        """Redis is away or refuses writes: wait and try again, however long it takes. Heartbeats lapse
        meanwhile, so heartbeat first and give the other workers time to do the same before recovery may
        treat their requests as abandoned."""
        if redis_errors.passing(error):
            self.log.warning("Worker %s: %s", self.name, redis_errors.describe(error))
        else:
            self.log.error("Worker %s: Redis error: %s", self.name, error)
        self.schedule.run_next("heartbeat")
        self.schedule.hold_off(("recover", "orphans"), self.heartbeat_ttl)
        await asyncio.sleep(redis_errors.backoff(failures))

    # -- claiming and forwarding ------------------------------------------------------------------

    async def _claim(self, count: int, adopted: tuple[int, str] | None = None) -> list[InFlight]:
        """Claims up to `count` requests (plus `adopted`, already popped) in one atomic call."""
        args, started_at = claiming.claim_args(self, count, adopted)
        rows = await async_redis.answer(self._claim_script(keys=self._claim_keys, args=args))
        return claiming.claimed(self, rows, started_at)

    async def _wait_for_request(self) -> list[InFlight]:
        """Blocks until a request arrives (BLPOP keeps the queues' priority order), then claims it."""
        timeout = max(0.01, min(self.idle_wait, self.schedule.next_due(self.idle_wait) - time.monotonic()))
        blpop = self._redis.blpop([q.queue for q in self.queue_keys], timeout=timeout)
        popped = await async_redis.answer(blpop, timeout + async_redis.ANSWER_TIMEOUT)
        if popped is None:
            return []
        key, job_id = popped[0].decode(), popped[1].decode()
        index = next(i for i, q in enumerate(self.queue_keys, start=1) if q.queue == key)
        # Between BLPOP and this claim the id is in no queue; if this process dies right here, the
        # orphan sweep (recovery.py) finds the request and queues it again.
        return await self._claim(0, adopted=(index, job_id))

    async def _forward(self, item: InFlight) -> None:
        """One attempt, handed to the committer; its duration is noted on `item`, for the metrics and the log."""
        started = time.perf_counter()
        try:
            result = await self._attempt(item)
        finally:
            self.forwarding -= 1
        item.forward_seconds = time.perf_counter() - started
        self._committer.put(item, result)
        # Wake the claim loop when a slot frees while all were taken (it then waits up to batch_wait for
        # more), and when enough are free for a claim; not at every slot in between.
        free = self._free()
        if free == 1 or free == self._batch:
            assert self._changed is not None
            self._changed.set()

    async def _attempt(self, item: InFlight) -> Attempt:
        """One attempt at one request; never raises."""
        try:
            if item.func_name == FORWARD_FUNCTION:
                target = self.settings.target_for(item.args[0])
                request = ModelRequest(*item.args)
                limit = self.settings.max_result_bytes
                return await async_forwarding.send(self._http, target, item.id, request, self._deadlines, limit)
            # Another job function (say, a webhook delivery): run it as RQ would, in a thread of its own.
            return Attempt(result=await asyncio.to_thread(self._perform, item))
        except Exception:
            return Attempt(error=traceback.format_exc(), retryable=True)

    def _perform(self, item: InFlight) -> Any:
        """Runs another function's job as RQ's worker would (in the thread _attempt gives it). The function
        may change its job's retries_left (webhooks.deliver sets 0: not worth retrying), which the
        recording then reads from `item`."""
        job = Job.fetch(item.id, connection=self.connection, serializer=self.serializer)
        try:
            return job.perform()
        finally:
            item.retries_left = job.retries_left

    def _recorded(self, items: list[InFlight]) -> None:
        """The committer recorded these: they are no longer this worker's to heartbeat, and their places in
        the committer's backlog are free."""
        for item in items:
            self.in_flight.pop(item.id, None)
        assert self._changed is not None
        self._changed.set()

    # -- upkeep and heartbeats (RQ's synchronous calls, in the upkeep thread) ---------------------

    async def _upkeep_loop(self) -> None:
        assert self._loop is not None
        failures = 0
        while True:
            snapshot = list(self.in_flight.values())
            try:
                await self._loop.run_in_executor(self._upkeep_thread, worker_upkeep.upkeep, self, snapshot)
                failures = 0
            except redis.RedisError as error:
                failures += 1
                await self._after_redis_error(error, failures)
                continue
            except Exception:
                # A failing step (RQ's cleanup, a callback) must not end this task: without it the requests
                # this worker holds get no heartbeats, and recovery would take them from it.
                failures += 1
                self.log.exception("Worker %s: upkeep failed; trying again", self.name)
                await asyncio.sleep(redis_errors.backoff(failures))
                continue
            await asyncio.sleep(max(0.01, min(self.promote_interval, self.schedule.next_due(1) - time.monotonic())))

    # -- start and end ----------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Warm shutdown (SIGTERM, first Ctrl+C): stop claiming, finish what is claimed. It never raises
        inside the loop, so a claim in progress is never lost half-way; it wakes the loop at once."""
        self._stop_requested = True
        if self._loop is not None and self._changed is not None:
            self._loop.call_soon_threadsafe(self._changed.set)

    async def _drain(self) -> None:
        """Lets claimed requests finish and be recorded (heartbeats go on), up to forward_timeout + 10 s."""
        self._draining = True
        deadline = time.monotonic() + self.settings.forward_timeout + 10
        while self.in_flight and time.monotonic() < deadline:
            await self._wait_changed(min(1.0, deadline - time.monotonic()))
        for task in list(self._tasks):
            task.cancel()
