"""What Redis keeps, and back-pressure before it is full (a real redis-server with a small maxmemory)."""

import base64
import json
import os

import requests
from rq.job import Job

from tests.conftest import AUTH, Api, RedisServer, Workers, service_env, wait_for


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


def test_a_large_answer_is_kept_compressed_and_shown_as_before(api, workers, db):
    """Answers over 1 KB are stored zlib-compressed (forwarding.encode_answer); the sink expands them, and
    `_raw_=true` gives the model's exact bytes back."""
    answer = {"text": " ".join(f"token{n % 500}" for n in range(8000))}  # 70 KB of JSON, as an LLM might
    body = json.dumps(answer, indent=1).encode()
    request_id = api.submit_ok(params={"echo": "1"}, body=body)
    workers.start()
    result = api.wait_status(request_id, "SUCCESS")["result"]
    assert (result["body"], result["body_encoding"]) == (answer, "json")
    raw = requests.get(
        f"{api.url}/api/predict/svc/sink", params={"request_id": request_id, "_raw_": "true"}, headers=AUTH, timeout=10
    )
    assert raw.content == body  # byte for byte, whitespace included
    stored = Job.fetch(request_id, connection=db).return_value()
    assert "body_zlib" in stored and "body" not in stored
    assert db.memory_usage(f"rq:results:{request_id}") < len(body) / 3
