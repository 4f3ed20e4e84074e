"""One reading of `redis_url` for the API, the dashboard and the workers: a plain Redis, or a master that
Redis Sentinel names.

    redis://[[user]:password@]host:port/db, rediss://..., unix:///path   read by redis-py (from_url)
    redis+sentinel://[[user]:password@]host:port[,host2:port2]/<master name>[/<db>]

The Sentinel form is Redis-Sentinel-Url's (rq-dashboard's dependency), without its query options: the
timeouts come from `redis_timeout`. The user and password are the master's (and its replicas'); the
sentinels are asked without a password. A client made here asks the sentinels for the master's address
whenever it opens a connection, so after a failover it follows the new master by itself; a connection to
a demoted master that answers READONLY is dropped by redis-py and reopened to the new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import BlockingConnectionPool
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_FORM = "redis+sentinel://[:password@]host:port[,host2:port2]/<master name>[/<db>]"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """What a redis+sentinel:// URL names: where to ask, for which master, and how to log in to it."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def is_sentinel_url(url: str) -> bool:
    return urlsplit(url).scheme == SENTINEL_SCHEME


def _address(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":") if not text.endswith("]") else (text, "", "")
    if not colon:
        host, port = text, str(DEFAULT_SENTINEL_PORT)
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must look like {SENTINEL_FORM}: {text!r} is not a sentinel's host:port")
    return host, int(port)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The parts of a redis+sentinel:// URL; ValueError saying what is wrong (one line, no password)."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"must start with {SENTINEL_SCHEME}://")
    if parts.query or parts.fragment:
        raise ValueError(f"must look like {SENTINEL_FORM}, with no query (timeouts come from redis_timeout)")
    credentials, _, hosts = parts.netloc.rpartition("@")
    if not hosts:
        raise ValueError(f"must look like {SENTINEL_FORM}: no sentinel host")
    sentinels = tuple(_address(host) for host in hosts.split(","))
    path = parts.path.strip("/").split("/") if parts.path.strip("/") else []
    if not path or not path[0] or len(path) > 2:
        raise ValueError(f"must look like {SENTINEL_FORM}: the master's name (as in `sentinel monitor`) is missing")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"must look like {SENTINEL_FORM}: the db must be a number, not {path[1]!r}")
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    return SentinelTarget(
        sentinels,
        unquote(path[0]),
        int(path[1]) if len(path) == 2 else 0,
        unquote(username) or None,
        unquote(password) or None,
    )


# Redis connections one API process opens at most. Under gevent a process serves up to a thousand
# clients at once (server.py); each needs Redis for well under a millisecond, so they take turns on a few
# connections instead of opening one each (Redis's default `maxclients` is 10,000 across all API hosts).
MAX_CONNECTIONS = 32


class _BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (connections to the current master), bounded and waited on like BlockingConnectionPool."""


def connect(url: str, timeout: float) -> redis.Redis:
    """A Redis client that fails within about `timeout` seconds when Redis is away and reconnects by itself
    (to the current master, for a Sentinel URL). At most MAX_CONNECTIONS connections: a caller waits up to
    `timeout` for a free one."""
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 30,
        "max_connections": MAX_CONNECTIONS,
        "timeout": timeout,  # waiting for a free connection
    }
    if not is_sentinel_url(url):
        return redis.Redis.from_pool(BlockingConnectionPool.from_url(url, **options))
    target = parse_sentinel_url(url)
    sentinel = Sentinel(
        list(target.sentinels),
        sentinel_kwargs={"socket_connect_timeout": timeout, "socket_timeout": timeout},
    )
    return sentinel.master_for(
        target.master_name,
        db=target.db,
        username=target.username,
        password=target.password,
        connection_pool_class=_BlockingSentinelConnectionPool,
        **options,
    )


def rq_cli_settings(url: str, timeout: float) -> tuple[str | None, dict[str, Any] | None]:
    """`REDIS_URL` and `SENTINEL` for `rq worker --config worker`: RQ's CLI reads a plain URL itself, and
    a Sentinel only as its `SENTINEL` dict (rq/cli/helpers.py, get_redis_from_config). The worker's own
    socket timeouts are set by QueueWorker; the sentinels get `timeout`, so a dead one is skipped."""
    if not is_sentinel_url(url):
        return url, None
    target = parse_sentinel_url(url)
    return None, {
        "INSTANCES": list(target.sentinels),
        "MASTER_NAME": target.master_name,
        "DB": target.db,
        "USERNAME": target.username,
        "PASSWORD": target.password,
        "SENTINEL_KWARGS": {"socket_connect_timeout": timeout, "socket_timeout": timeout},
    }
