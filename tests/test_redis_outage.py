"""Redis unreachable: the API answers 503 JSON within seconds, and serves again once Redis is back."""

import time

from tests.conftest import Api, RedisServer, service_env, wait_for


def test_api_answers_503_while_redis_is_down_then_recovers(tmp_path, model):
    server = RedisServer(tmp_path / "redis").start()
    api = Api(service_env(server.url, model.url))
    try:
        assert api.submit().status_code == 200
        server.kill()
        began = time.monotonic()
        down = api.submit()
        assert down.status_code == 503
        assert down.json()["error"].startswith("the queue's storage (Redis) is unavailable")
        assert int(down.headers["Retry-After"]) > 0
        assert time.monotonic() - began < 5  # redis_timeout=1: no request hangs on a dead Redis
        sink = api.sink("00000000-0000-4000-8000-000000000000")
        assert sink.status_code == 503
        server = RedisServer(server.directory, port=server.port).start()
        wait_for(lambda: api.submit().status_code == 200, 15, "the API to serve again")
    finally:
        api.stop()
        server.kill()
