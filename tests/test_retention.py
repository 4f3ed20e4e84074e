"""What Redis keeps, and back-pressure before it is full (a real redis-server with a small maxmemory)."""

import base64
import os

import requests

from tests.conftest import Api, RedisServer, Workers, service_env, wait_for


def test_submits_get_429_before_redis_is_full_and_every_accepted_request_succeeds(tmp_path, model):
    server = RedisServer(tmp_path / "redis").start()
    db = server.client()
    db.config_set("maxmemory", db.info("memory")["used_memory"] + 40 * 2**20)
    db.config_set("maxmemory-policy", "noeviction")
    env = service_env(server.url, model.url, redis_memory_high_water=0.9)
    api = Api(env)
    workers = Workers(env, server.url)
    body = b'{"input": "' + base64.b64encode(os.urandom(24 * 1024)) + b'"}'  # 32 KB that zlib cannot shrink
    accepted: list[str] = []
    try:
        for _ in range(2000):  # 40 MB at 32 KB a request: the mark comes after ~1,100
            response = api.submit(body=body)
            if response.status_code != 200:
                break
            accepted.append(response.text)
        assert response.status_code == 429, response.text
        assert response.json()["error"].startswith("Redis is 9")  # 90% or more
        assert int(response.headers["Retry-After"]) > 0
        assert 500 < len(accepted) < 2000
        assert db.info("memory")["used_memory"] < db.info("memory")["maxmemory"]  # never full: no OOM

        workers.start(count=2)
        for request_id in accepted:
            api.wait_status(request_id, "SUCCESS", timeout=120)
        # Finished requests keep no body, so there is room again.
        wait_for(lambda: api.submit(body=body).status_code == 200, 10, "submits to be accepted again")
        assert requests.get(api.url + "/readyz", timeout=5).status_code == 200
    finally:
        workers.stop_all()
        api.stop()
        server.kill()
