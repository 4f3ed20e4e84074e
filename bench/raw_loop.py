"""The references for a drain: how fast one process can POST 1 KB bodies to the model with nothing else.

    python bench/raw_loop.py URL START_AT SECONDS BODY_FILE [CLIENT]

Posts in a loop, one at a time, with the same headers as the workers, and prints
`{"requests": n, "seconds": s}` for the window [START_AT, START_AT + SECONDS) (unix times), so several
processes started together are measured over the same window, after their imports. CLIENT is `requests`
(a `requests.Session`, the default) or `urllib3` (a PoolManager as forwarding.send uses it: no retries, no
redirects, the answer read; what plain `rq worker`'s HTTP client gives with nothing around it).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import requests
import urllib3


def poster(client: str, url: str, body: bytes) -> Callable[[], None]:
    """One POST of `body` to `url` with `client`, its answer read; raises on an HTTP error."""
    headers = {"Content-Type": "application/json"}
    if client == "urllib3":
        pool = urllib3.PoolManager(retries=False)

        def post_urllib3() -> None:
            headers["X-Eas-Queueservice-Request-Id"] = str(uuid.uuid4())
            response = pool.request("POST", url, body=body, headers=headers, timeout=30, redirect=False)
            if response.status >= 400:
                raise RuntimeError(f"the model answered {response.status}")

        return post_urllib3
    session = requests.Session()

    def post_requests() -> None:
        headers["X-Eas-Queueservice-Request-Id"] = str(uuid.uuid4())
        response = session.post(url, data=body, headers=headers, timeout=30, allow_redirects=False)
        response.raise_for_status()
        response.content  # noqa: B018 - read the answer, as forwarding does

    return post_requests


def main(url: str, start_at: float, seconds: float, body: bytes, client: str) -> None:
    """Counts successful POSTs made inside the window."""
    post = poster(client, url, body)
    post()  # connect before the window opens
    while time.time() < start_at:
        time.sleep(0.001)
    count, started, cpu_started = 0, time.perf_counter(), time.process_time()
    end = started + seconds
    while time.perf_counter() < end:
        post()
        count += 1
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(json.dumps({"requests": count, "seconds": seconds, "cpu_seconds": cpu}), flush=True)


if __name__ == "__main__":
    client = sys.argv[5] if len(sys.argv) > 5 else "requests"
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]).read_bytes(), client)
