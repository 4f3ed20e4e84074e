"""Faults caused for real: workers SIGKILLed mid-job, a request popped by a process that died before
recording it, redis-server SIGKILLed and restarted, the model stopped. Every accepted request still
ends in a terminal state the sink reports."""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import Api, RedisServer, Workers, service_env, wait_for
from tests.model_server import ModelServer

TERMINAL = ("SUCCESS", "FAILURE", "CANCELED", "EXPIRED")


def sigkill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_a_request_of_a_killed_worker_is_retried_within_a_minute(api, workers, model, db):
    request_id = api.submit_ok(params={"delay": "3"})
    [first] = workers.start()
    api.wait_status(request_id, "STARTED")
    sigkill(first)
    workers.start()
    state = api.wait_status(request_id, "SUCCESS", timeout=60)
    assert state["attempts"] == 2  # the killed attempt counts
    assert len(model.requests_for(request_id)) == 2


def test_2000_requests_survive_10_sigkills(api, workers, model, db):
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda n: api.submit_ok(params={"delay": "0.05"}, body=str(n).encode()), range(2000)))
    live = workers.start(count=3)
    kills = 0
    for threshold in range(150, 1650, 150):  # 10 kills spread over the run, as the model sees progress
        wait_for(lambda t=threshold: len(model.received) >= t, 60, f"{threshold} requests at the model")
        victim = random.choice(live)
        sigkill(victim)
        live.remove(victim)
        live += workers.start()
        kills += 1
    assert kills == 10
    for request_id in ids:
        api.wait_status(request_id, TERMINAL, timeout=90)
    statuses = Counter(api.state(request_id)["status"] for request_id in ids)
    assert statuses == {"SUCCESS": 2000}
    forwarded = Counter(model.ids())
    duplicates = sum(1 for request_id in ids if forwarded[request_id] > 1)
    print(f"\n2000 requests, {kills} SIGKILLs: {duplicates} forwarded more than once", file=sys.stderr)
    assert all(forwarded[request_id] >= 1 for request_id in ids)
    assert duplicates <= kills * 8  # at most the requests in flight in each killed worker (concurrency 8)


def test_a_request_popped_by_a_process_that_died_is_run_again(api, workers, model, db, redis_server):
    """rq issue 1716: a multi-queue worker pops with BLPOP and records the job as started only after,
    so a worker killed in between leaves a request that says `queued` but is in no queue."""
    request_id = api.submit_ok()
    popper = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, signal, redis, sys\n"
            f"r = redis.Redis(port={redis_server.port})\n"
            "print(r.blpop(['rq:queue:high', 'rq:queue:default'], 10), flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n",
        ],
        stdout=subprocess.PIPE,
    )
    assert request_id in popper.stdout.read().decode()
    assert popper.wait() == -signal.SIGKILL
    assert db.llen("rq:queue:default") == 0
    assert api.state(request_id)["status"] == "PENDING"
    workers.start()
    state = api.wait_status(request_id, "SUCCESS", timeout=60)
    assert state["attempts"] == 1
    assert len(model.requests_for(request_id)) == 1


class DurableStack:
    """A Redis of its own with `appendfsync always`, and an API and workers on it, for killing Redis."""

    def __init__(self, directory: Path, model: ModelServer) -> None:
        self.redis = RedisServer(directory, appendfsync="always").start()
        env = service_env(self.redis.url, model.url)
        self.api, self.workers = Api(env), Workers(env, self.redis.url)

    def start_workers(self, count: int) -> list[subprocess.Popen]:
        started = self.workers.start(count=count)
        wait_for(lambda: self.redis.client().scard("rq:workers") == count, 30, "the workers to be running")
        return started

    def restart_redis(self) -> None:
        self.redis = RedisServer(self.redis.directory, appendfsync="always", port=self.redis.port).start()

    def stop(self) -> None:
        self.workers.stop_all()
        self.api.stop()
        self.redis.kill()


@pytest.fixture
def durable(tmp_path: Path, model: ModelServer) -> Iterator[DurableStack]:
    with model.lock:
        model.received.clear()
    stack = DurableStack(tmp_path / "redis", model)
    yield stack
    stack.stop()


def test_redis_killed_and_restarted_with_appendfsync_always_loses_nothing(durable):
    accepted: list[str] = []
    lock = threading.Lock()

    def submit(n: int) -> None:
        while True:  # a client retries what was not accepted (503 while Redis is down)
            try:
                response = durable.api.submit(params={"delay": "0.02"}, body=str(n).encode())
            except OSError:
                continue
            if response.status_code == 200:
                with lock:
                    accepted.append(response.text)
                return

    workers = durable.start_workers(2)
    with ThreadPoolExecutor(16) as submitters:
        futures = [submitters.submit(submit, n) for n in range(500)]
        wait_for(lambda: len(accepted) >= 200, 60, "200 accepted requests")
        durable.redis.kill()
        durable.restart_redis()
        for future in futures:
            future.result()
    assert len(accepted) == 500
    for request_id in accepted:
        durable.api.wait_status(request_id, TERMINAL, timeout=90)
    statuses = Counter(durable.api.state(request_id)["status"] for request_id in accepted)
    assert statuses == {"SUCCESS": 500}
    assert durable.api.process.poll() is None  # the API and the workers rode through, not restarted
    assert all(worker.poll() is None for worker in workers)


def test_redis_down_longer_than_a_heartbeat_does_not_count_as_dead_workers(durable, model):
    """Heartbeats lapse while Redis is away; once it is back, workers heartbeat before anyone recovers,
    so requests in flight during the outage are recorded by their own worker and forwarded once."""
    durable.start_workers(2)
    ids = [durable.api.submit_ok(params={"delay": "1"}) for _ in range(12)]
    wait_for(lambda: len(model.received) == 12, 15, "12 requests in flight at the model")
    durable.redis.kill()
    time.sleep(20)  # the outage: longer than the 15 s a request stays started without a heartbeat
    durable.restart_redis()
    states = [durable.api.wait_status(request_id, TERMINAL, timeout=60) for request_id in ids]
    assert [state["status"] for state in states] == ["SUCCESS"] * 12
    assert Counter(model.ids()) == Counter(ids)  # each forwarded exactly once
    assert [state["attempts"] for state in states] == [1] * 12


def test_a_model_outage_ends_every_request_in_success_or_a_failure_saying_why(make_api, workers, model, db):
    api = make_api(retry_intervals="1,2")
    ids = [api.submit_ok(params={"delay": "0.02"}, body=str(n).encode()) for n in range(200)]
    workers.start(count=2)
    wait_for(lambda: len(model.received) >= 60, 30, "60 requests at the model")
    model.stop()
    try:
        time.sleep(4)  # the outage: longer than one retry interval, longer than all of them (1 + 2 s)
    finally:
        model.start()
    states = [api.wait_status(request_id, TERMINAL, timeout=60) for request_id in ids]
    received = set(model.ids())
    for state in states:
        if state["status"] == "FAILURE":
            assert state["attempts"] == 3, state  # it failed only after using every retry
            assert state["error_info"].startswith("could not reach the model"), state
        else:
            assert state["status"] == "SUCCESS", state
            assert state["request_id"] in received
    counts = Counter(state["status"] for state in states)
    print(f"\nmodel outage of 4 s: {dict(counts)}", file=sys.stderr)
    assert counts["SUCCESS"] >= 60


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_stopped_worker_finishes_what_it_started(api, workers, model, db, signal_name):
    ids = [api.submit_ok(params={"delay": "1"}) for _ in range(4)]
    [worker] = workers.start()
    wait_for(lambda: len(model.received) == 4, 15, "4 requests in flight")
    os.killpg(worker.pid, getattr(signal, signal_name))
    assert worker.wait(30) == 0
    for request_id in ids:
        assert api.state(request_id)["status"] == "SUCCESS"
