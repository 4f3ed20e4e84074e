"""The Redis for `make run`: reuse one that answers at redis_url, or start one with its data in var/redis.

    python scripts/local_redis.py serve   # run in the foreground until stopped (honcho's `redis` process)
    python scripts/local_redis.py wait    # return once Redis answers (the other processes start after it)

The Redis it starts keeps an append-only file, fsynced every second by default; set
REDIS_APPENDFSYNC=always to fsync every write (nothing acknowledged is lost, slower).
REDIS_DIR sets where its data lives (default: var/redis in the checkout).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from settings import get_settings  # noqa: E402


def answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def serve(url: str) -> None:
    if answers(url):
        print(f"using the Redis that already answers at {url}", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            signal.pause()
    parts = urlsplit(url)
    if parts.scheme != "redis" or parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        sys.exit(f"nothing answers at {url}, and only a local redis:// URL can be started here")
    binary = shutil.which("redis-server")
    if not binary:
        sys.exit("no redis-server on PATH: `make run` installs one into .venv when the machine has none")
    data = Path(os.environ.get("REDIS_DIR") or ROOT / "var" / "redis")
    data.mkdir(parents=True, exist_ok=True)
    fsync = os.environ.get("REDIS_APPENDFSYNC", "everysec")
    os.execv(
        binary,
        [
            binary,
            "--port",
            str(parts.port or 6379),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--appendfsync",
            fsync,
            "--save",
            "",
            # RQ keeps each result in a stream of its own; Redis 7 preallocates a stream node of this size
            # (default 4096 B), so a one-entry result took 4.7 KB instead of 1.2 KB (`make bench`, row 6).
            "--stream-node-max-bytes",
            "256",
            # Refuse writes when full instead of evicting: an evicted key would be a lost request.
            "--maxmemory-policy",
            "noeviction",
        ],
    )


def wait(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not answers(url):
        if time.monotonic() > deadline:
            sys.exit(f"Redis did not answer at {url} within {timeout:g}s")
        time.sleep(0.2)


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command not in ("serve", "wait"):
        sys.exit(__doc__)
    {"serve": serve, "wait": wait}[command](get_settings().redis_url)
