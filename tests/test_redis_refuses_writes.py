"""Redis answers but refuses writes: full (`maxmemory`, OOM) or a read-only replica (READONLY, as after a
failover). Workers live through it with backoff and lose nothing; the API's 503 and /readyz say why."""

import pytest
import requests

from tests.conftest import Api, RedisServer, Workers, free_port, service_env, wait_for

# How each fault is caused for real, and undone.
FAULTS = {
    "OOM": (("CONFIG", "SET", "maxmemory", "1"), ("CONFIG", "SET", "maxmemory", "0")),
    # A replica of a master that is not there: it keeps its data and refuses every write.
    "READONLY": (("REPLICAOF", "127.0.0.1", str(free_port())), ("REPLICAOF", "NO", "ONE")),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_workers_survive_redis_refusing_writes_and_lose_nothing(fault, tmp_path, model):
    cause, undo = FAULTS[fault]
    server = RedisServer(tmp_path / "redis").start()
    env = service_env(server.url, model.url, retry_intervals="1")
    api = Api(env)
    workers = Workers(env, server.url)
    log = tmp_path / "worker.log"
    try:
        [worker] = workers.start(output=log)
        db = server.client()
        in_flight = [api.submit_ok(params={"delay": "1"}) for _ in range(4)]
        wait_for(lambda: len(model.requests_for(in_flight[-1])) == 1, 20, "the requests to reach the model")
        db.execute_command(*cause)

        refused = api.submit()
        assert refused.status_code == 503
        assert refused.json()["error"].startswith(f"Redis refuses writes: {fault}")
        assert int(refused.headers["Retry-After"]) > 0
        ready = requests.get(api.url + "/readyz", timeout=5)
        assert ready.status_code == 503 and fault in ready.json()["error"]
        assert requests.get(api.url + "/healthz", timeout=5).status_code == 200  # alive, only not ready

        # The worker's loop keeps trying, with backoff. (Under OOM, Redis still runs a script whose first write
        # cannot grow memory, and lua/record_outcomes.lua starts with a ZREM, so outcomes are recorded; a
        # replica refuses them, and the committer keeps them until it can.)
        wait_for(lambda: log.read_text().count("Redis refuses writes") >= 3, 20, "the worker's loop to back off")
        assert worker.poll() is None

        db.execute_command(*undo)
        for request_id in in_flight:
            assert api.wait_status(request_id, "SUCCESS", timeout=30)["attempts"] == 1
        after = api.submit_ok()
        api.wait_status(after, "SUCCESS", timeout=30)
        assert requests.get(api.url + "/readyz", timeout=5).json() == {"status": "ok"}
        assert worker.poll() is None  # the same process, all along
    finally:
        workers.stop_all()
        api.stop()
        server.kill()
