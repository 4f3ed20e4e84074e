"""A QueueWorker's Redis client on asyncio: the same server (or Sentinel master) as RQ's own client, on asyncio.

RQ's CLI makes a synchronous client from `--url` or `--config worker` (a URL, or its SENTINEL dict); the
worker keeps that one for RQ's own calls (registration, heartbeats, recovery) and makes this one, to the
same place with the same credentials, for its claims and records. Each call gets one deadline (`answer`)
instead of redis-py's socket timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.asyncio.sentinel
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import HiredisRespSerializer
from redis.sentinel import SentinelConnectionPool

# What is carried over from the synchronous client's connection settings: where Redis is and how to log
# in; the timeouts are the worker's own (below).
_CARRIED = (
    "host", "port", "path", "db", "username", "password", "client_name",
    "ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_data", "ssl_check_hostname",
    "ssl_min_version", "ssl_ciphers",
)  # fmt: skip


class _HiredisPacking:
    """Commands packed by hiredis, in C, as redis-py's synchronous client packs them. redis.asyncio packs
    them in Python: measured, 100 us of worker CPU per request (a claim or a record is one command of
    30 arguments per request), half the worker's budget."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        return self._packer.pack(*args)


def _hiredis_packing(connection_class: type) -> type:
    return type(connection_class.__name__, (_HiredisPacking, connection_class), {})


ANSWER_TIMEOUT = 10.0  # seconds a call waits for Redis's answer: a dead link is noticed within this
SENTINEL_TIMEOUT = 2.0  # seconds one sentinel has to say where the master is
T = TypeVar("T")


async def answer(call: Awaitable[T], timeout: float = ANSWER_TIMEOUT) -> T:
    """Redis's answer to `call` within `timeout` seconds, else redis.TimeoutError (the connection is then
    dropped, as redis-py drops one whose command was interrupted).

    One deadline per call, where redis-py's socket_timeout runs each command's write as a task of its own
    (asyncio.wait_for): a loop iteration later and ~15 us of CPU per call. Without it, one QueueWorker
    draining 30,000 jobs took 229 and 225 us of CPU per job against 247 and 236 (one-off A/B runs)."""
    try:
        async with asyncio.timeout(timeout):
            return await call
    except TimeoutError:
        raise redis.TimeoutError(f"Redis did not answer within {timeout:g}s") from None


def client_like(sync: redis.Redis, connect_timeout: float = 5) -> redis.asyncio.Redis:
    """An asyncio client to the Redis `sync` talks to, with no socket timeout: every call goes through
    `answer`. redis-py never retries behind the worker's back (a claim run twice would take a second batch);
    the worker's loops retry with backoff."""
    pool = sync.connection_pool
    options: dict[str, Any] = {k: v for k, v in pool.connection_kwargs.items() if k in _CARRIED}
    options.update(socket_timeout=None, socket_connect_timeout=connect_timeout, retry=Retry(NoBackoff(), 0))
    if isinstance(pool, SentinelConnectionPool):
        manager = pool.sentinel_manager
        sentinels = [
            (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
            for s in manager.sentinels
        ]
        for where in ("host", "port", "path"):
            options.pop(where, None)
        # Each sentinel asked where the master is answers within SENTINEL_TIMEOUT, or the next one is asked,
        # inside the call's own deadline (RQ's CLI gives its sentinels no timeout).
        limits = {"socket_timeout": SENTINEL_TIMEOUT, "socket_connect_timeout": SENTINEL_TIMEOUT}
        sentinel = redis.asyncio.sentinel.Sentinel(sentinels, sentinel_kwargs={**limits, **manager.sentinel_kwargs})
        managed = _hiredis_packing(redis.asyncio.sentinel.SentinelManagedConnection)
        return sentinel.master_for(pool.service_name, connection_class=managed, **options)
    connection_class = getattr(redis.asyncio.connection, pool.connection_class.__name__, None)
    if connection_class is None:
        raise ValueError(f"no asyncio connection like {pool.connection_class.__name__}")
    async_pool = redis.asyncio.ConnectionPool(connection_class=_hiredis_packing(connection_class), **options)
    return redis.asyncio.Redis(connection_pool=async_pool)
