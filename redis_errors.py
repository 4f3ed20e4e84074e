"""What a Redis error means for eas-queue: Redis is away, Redis refuses writes, or something else.

Redis refuses writes when it is full (`OOM`, at `maxmemory` with `noeviction`), a replica (`READONLY`,
after a failover), cannot persist (`MISCONF`), or is loading its data (`LOADING`). Each passes: the
worker waits and tries again, losing nothing, and the API says which it is in its 503.
"""

from __future__ import annotations

import redis

AWAY = (redis.ConnectionError, redis.TimeoutError)  # includes BusyLoadingError (LOADING)
_REFUSING_PREFIXES = ("OOM", "READONLY", "MISCONF", "NOREPLICAS", "BUSY", "TRYAGAIN", "MASTERDOWN")


# redis-py drops the error code from the message of the errors it has a class for: put it back.
_CODES = {redis.exceptions.OutOfMemoryError: "OOM", redis.exceptions.ReadOnlyError: "READONLY"}


def _code(error: redis.RedisError) -> str:
    return next((code for kind, code in _CODES.items() if isinstance(error, kind)), "")


def refuses_writes(error: redis.RedisError) -> bool:
    text = str(error).lstrip()
    return bool(_code(error)) or any(text.startswith(prefix) for prefix in _REFUSING_PREFIXES)


def passing(error: redis.RedisError) -> bool:
    """An error that goes away by itself (Redis restarts, frees memory, a failover ends): wait and retry."""
    return isinstance(error, AWAY) or refuses_writes(error)


def describe(error: redis.RedisError) -> str:
    """One line for a client or an operator: what is wrong with Redis (no addresses, no secrets)."""
    if refuses_writes(error):
        text = " ".join(str(error).split())[:200]
        code = _code(error)
        return (
            f"Redis refuses writes: {code} {text}"
            if code and not text.startswith(code)
            else (f"Redis refuses writes: {text}")
        )
    return "the queue's storage (Redis) is unavailable"


def backoff(failures: int) -> float:
    """Seconds to wait after `failures` failures in a row: 0.25, 0.5, 1, then 2 at most."""
    return min(0.125 * 2**failures, 2.0)
