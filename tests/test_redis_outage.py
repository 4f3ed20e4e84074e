"""Redis unreachable: the API answers 503 JSON within seconds, and serves again once Redis is back."""

import asyncio
import os
import signal
import time

import pytest
import redis

import async_redis
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


def test_a_worker_call_to_a_redis_that_stops_answering_ends_at_its_deadline(tmp_path):
    """A QueueWorker's Redis calls each have one deadline (async_redis.answer): a Redis frozen by SIGSTOP
    (a dead link looks the same: no answer, no error) ends the call with redis.TimeoutError, and the next
    call, once Redis answers again, gets its own answer on a new connection, never the late one."""
    server = RedisServer(tmp_path / "redis").start()
    assert server.process is not None

    async def scenario() -> None:
        client = async_redis.client_like(redis.Redis.from_url(server.url))
        try:
            assert await async_redis.answer(client.echo("before")) == b"before"
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(redis.TimeoutError):
                    await async_redis.answer(client.echo("lost"), 0.5)
                assert time.monotonic() - started < 5
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            assert await async_redis.answer(client.echo("after")) == b"after"
        finally:
            await client.aclose()

    try:
        asyncio.run(scenario())
    finally:
        server.kill()
