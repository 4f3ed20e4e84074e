"""A reference for a drain: one process POSTing 1 KB bodies to the model over urllib3, one at a time.

    python bench/raw_urllib3.py URL START_AT SECONDS BODY_FILE

As bench/raw_loop.py (same window, same headers, same output), over a urllib3.PoolManager as
forwarding.send uses it (no retries, no redirects, the answer read): what plain `rq worker`'s HTTP client
(worker.forward) gives with nothing else around it.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import urllib3


def main(url: str, start_at: float, seconds: float, body: bytes) -> None:
    """Counts successful POSTs made inside the window."""
    pool = urllib3.PoolManager(retries=False)
    headers = {"Content-Type": "application/json"}

    def post() -> None:
        headers["X-Eas-Queueservice-Request-Id"] = str(uuid.uuid4())
        response = pool.request("POST", url, body=body, headers=headers, timeout=30, redirect=False)
        if response.status >= 400:
            raise RuntimeError(f"the model answered {response.status}")

    post()  # connect before the window opens
    while time.time() < start_at:
        time.sleep(0.001)
    count, started = 0, time.perf_counter()
    end = started + seconds
    while time.perf_counter() < end:
        post()
        count += 1
    print(json.dumps({"requests": count, "seconds": time.perf_counter() - started}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]).read_bytes())
