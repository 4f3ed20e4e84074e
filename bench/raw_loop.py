"""The reference for a drain: how fast one process can POST 1 KB bodies to the model with nothing else.

    python bench/raw_loop.py URL START_AT SECONDS BODY_FILE

Posts in a loop over one `requests.Session` (as a forwarding thread does, same headers) and prints
`{"requests": n, "seconds": s}` for the window [START_AT, START_AT + SECONDS) (unix times), so several
processes started together are measured over the same window, after their imports.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import requests


def main(url: str, start_at: float, seconds: float, body: bytes) -> None:
    """Counts successful POSTs made inside the window."""
    session = requests.Session()
    headers = {"Content-Type": "application/json"}

    def post() -> None:
        headers["X-Eas-Queueservice-Request-Id"] = str(uuid.uuid4())
        response = session.post(url, data=body, headers=headers, timeout=30, allow_redirects=False)
        response.raise_for_status()
        response.content  # noqa: B018 - read the answer, as forwarding does

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
