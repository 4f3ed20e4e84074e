"""Redis Sentinel for real: a master, a replica and a sentinel (`redis-server --sentinel`) on loopback, the
API, the dashboard and `rq worker --config worker` given only `redis+sentinel://.../mymaster/0`. The master
is SIGKILLed (or demoted by a sentinel-run failover) with requests in flight: every accepted request ends
SUCCESS and nothing is restarted."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from tests.conftest import (
    TOKEN,
    Api,
    RedisServer,
    Workers,
    free_port,
    redis_server_binary,
    service_env,
    wait_for,
)
from tests.model_server import ModelServer

MASTER_NAME = "mymaster"


def _info(server: RedisServer) -> dict:
    """INFO replication; empty while the server closes its clients' connections (as a demotion does)."""
    try:
        return server.client().info("replication")
    except redis.ConnectionError:
        return {}


class SentinelSetup:
    """A master, one replica and one sentinel (quorum 1) that fails over 1 s after the master stops answering."""

    def __init__(self, directory: Path) -> None:
        self.master = RedisServer(directory / "master").start()
        self.replica = RedisServer(directory / "replica").start()
        self.replica.client().replicaof("127.0.0.1", self.master.port)
        wait_for(lambda: _info(self.replica).get("master_link_status") == "up", 20, "the replica to sync")
        self.port = free_port()
        config = directory / "sentinel.conf"  # Sentinel rewrites its file as it learns: a copy of our own
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {directory}\nlogfile {directory / 'sentinel.log'}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
            f"sentinel failover-timeout {MASTER_NAME} 5000\n"
        )
        self.process = subprocess.Popen([redis_server_binary(), str(config), "--sentinel"])
        self.sentinel = redis.Redis(port=self.port, socket_timeout=5, decode_responses=True)
        wait_for(self._knows_the_replica, 20, "the sentinel to find the replica")

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{MASTER_NAME}/0"

    def _knows_the_replica(self) -> bool:
        try:
            replicas = self.sentinel.sentinel_slaves(MASTER_NAME)
        except redis.RedisError:
            return False
        return any(r["port"] == self.replica.port and not r["is_sdown"] for r in replicas)

    def master_port(self) -> int:
        return int(self.sentinel.sentinel_get_master_addr_by_name(MASTER_NAME)[1])

    def wait_for_replication(self) -> None:
        """Until the replica holds every write the master has acknowledged so far: replication is
        asynchronous, and a write it has not reached is lost in a failover (README, Redis Sentinel)."""
        offset = _info(self.master)["master_repl_offset"]
        wait_for(lambda: _info(self.replica)["slave_repl_offset"] >= offset, 10, "the replica to catch up")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.master.kill()
        self.replica.kill()


@pytest.fixture
def sentinel_setup(tmp_path: Path, model: ModelServer) -> Iterator[SentinelSetup]:
    with model.lock:
        model.received.clear()
    setup = SentinelSetup(tmp_path)
    yield setup
    setup.stop()


class Stack:
    """The API and two QueueWorkers, configured with the Sentinel URL only (the workers: `--config worker`)."""

    def __init__(self, setup: SentinelSetup, model: ModelServer, directory: Path) -> None:
        env = service_env(setup.url, model.url)
        self.worker_log = directory / "workers.log"
        self.api = Api(env, output=directory / "api.log")
        self.workers = Workers(env, redis_url=None)
        self.processes = self.workers.start(count=2, output=self.worker_log)
        wait_for(lambda: setup.master.client().scard("rq:workers") == 2, 30, "the workers to register")

    def all_running(self) -> bool:
        return self.api.process.poll() is None and all(p.poll() is None for p in self.processes)

    def stop(self) -> None:
        self.workers.stop_all()
        self.api.stop()


@pytest.fixture
def stack(sentinel_setup: SentinelSetup, model: ModelServer, tmp_path: Path) -> Iterator[Stack]:
    started = Stack(sentinel_setup, model, tmp_path)
    yield started
    started.stop()


def dashboard_queues(api: Api) -> dict:
    response = requests.get(f"{api.url}/rq/0/data/queues.json", auth=("operator", TOKEN), timeout=10)
    assert response.status_code == 200, response.text
    return {queue["name"]: queue["count"] for queue in response.json()["queues"]}


def test_the_master_killed_mid_load_loses_no_accepted_request(sentinel_setup, stack, model):
    api = stack.api
    before = [api.submit_ok(params={"delay": "1"}, body=str(n).encode()) for n in range(40)]
    wait_for(lambda: len(model.received) >= 16, 20, "16 requests in flight (2 workers x 8)")
    assert dashboard_queues(api)["default"] > 0  # the dashboard reads the master through the sentinel
    sentinel_setup.wait_for_replication()
    at_model = len(set(model.ids()))
    sentinel_setup.master.kill()
    killed_at = time.monotonic()

    answers: list[int] = []

    def accepted() -> requests.Response | None:
        response = api.submit(params={"delay": "0.1"})
        answers.append(response.status_code)
        return response if response.status_code == 200 else None

    first = wait_for(accepted, 60, "a submit accepted by the new master")
    resumed_after = time.monotonic() - killed_at
    assert answers[0] == 503 and set(answers[:-1]) == {503}, Counter(answers)
    assert sentinel_setup.master_port() == sentinel_setup.replica.port

    after = [first.text] + [api.submit_ok(params={"delay": "0.1"}, body=str(n).encode()) for n in range(10)]
    states = [api.wait_status(request_id, "SUCCESS", timeout=90) for request_id in before + after]
    assert all(state["status"] == "SUCCESS" for state in states)
    assert stack.all_running()  # the API and the same workers followed the new master by themselves
    assert requests.get(api.url + "/readyz", timeout=5).json() == {"status": "ok"}
    assert dashboard_queues(api)["default"] == 0  # the dashboard, too, reads the new master

    forwarded = Counter(model.ids())
    twice = sum(1 for request_id in before if forwarded[request_id] > 1)
    print(
        f"\nfailover: 40 accepted before the SIGKILL ({at_model} had reached the model); submits got 503 for "
        f"{resumed_after:.1f}s ({len(answers) - 1} answers), then 200; all {len(before) + len(after)} SUCCESS, "
        f"{twice} forwarded twice",
        file=sys.stderr,
    )


def test_a_master_demoted_by_a_failover_is_left_for_the_new_one(sentinel_setup, stack, model):
    """`SENTINEL FAILOVER`, as for an upgrade: the old master stays up, demoted to a replica (Sentinel
    closes its clients' connections; a write that still reaches it gets READONLY, which redis-py turns into
    a reconnect); the API and the workers find the new master through the sentinel."""
    api = stack.api
    before = [api.submit_ok(params={"delay": "1"}, body=str(n).encode()) for n in range(8)]
    wait_for(lambda: len(model.received) >= 8, 20, "8 requests in flight")
    sentinel_setup.wait_for_replication()
    sentinel_setup.sentinel.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
    wait_for(lambda: sentinel_setup.master_port() == sentinel_setup.replica.port, 30, "the failover")
    promoted_at = time.monotonic()
    wait_for(lambda: _info(sentinel_setup.master).get("role") == "slave", 30, "the old master to be demoted")
    writable_for = time.monotonic() - promoted_at

    after = wait_for(lambda: api.submit().status_code == 200 or None, 30, "a submit accepted after the failover")
    assert after
    more = [api.submit_ok(params={"delay": "0.1"}, body=str(n).encode()) for n in range(8)]
    for request_id in before + more:
        api.wait_status(request_id, "SUCCESS", timeout=90)
    assert stack.all_running()
    assert dashboard_queues(api)["default"] == 0
    # Until Sentinel demotes it, the old master still takes writes from connections opened before; those
    # writes (here: outcomes) are lost, and their requests are recovered and forwarded again.
    forwarded = Counter(model.ids())
    twice = sum(1 for request_id in before if forwarded[request_id] > 1)
    print(
        f"\nSENTINEL FAILOVER: the old master stayed a master {writable_for:.1f}s after the promotion; "
        f"{twice} of 8 requests in flight forwarded twice",
        file=sys.stderr,
    )


def test_the_app_starts_with_a_sentinel_url_naming_ipv6_sentinels():
    """Settings accept `[::1]:26379` in a Sentinel URL; the dashboard's own URL parser did not, and the app
    failed to start. Nothing connects at start, so no sentinel needs to answer."""
    import eas_queue
    from settings import load_settings

    url = "redis+sentinel://:pw@[::1]:26379,10.0.0.2:26379/eas/0"
    app = eas_queue.create_app(load_settings({"EAS_QUEUE_REDIS_URL": url}))
    assert app.config["RQ_DASHBOARD_REDIS_URL"] == (url,)
