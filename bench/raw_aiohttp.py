"""A reference for a drain: one process POSTing 1 KB bodies to the model with asyncio and aiohttp,
IN_FLIGHT at a time.

    python bench/raw_aiohttp.py URL START_AT SECONDS BODY_FILE [IN_FLIGHT]

As bench/raw_loop.py (same window, same headers, same output): IN_FLIGHT (16) coroutines, each POSTing in
a loop over one shared aiohttp.ClientSession and reading the answer. The fastest plain Python loop
QueueWorker's HTTP client allows, with no queue around it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

import aiohttp


async def main(url: str, start_at: float, seconds: float, body: bytes, in_flight: int) -> None:
    """Counts successful POSTs made inside the window."""
    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post() -> None:
            headers = {"Content-Type": "application/json", "X-Eas-Queueservice-Request-Id": str(uuid.uuid4())}
            async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                await response.read()
                if response.status >= 400:
                    raise RuntimeError(f"the model answered {response.status}")

        await asyncio.gather(*(post() for _ in range(in_flight)))  # connect before the window opens
        await asyncio.sleep(max(0.0, start_at - time.time()))
        count, started, cpu_started = 0, time.perf_counter(), time.process_time()
        end = started + seconds

        async def loop() -> None:
            nonlocal count
            while time.perf_counter() < end:
                await post()
                count += 1

        await asyncio.gather(*(loop() for _ in range(in_flight)))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        print(json.dumps({"requests": count, "seconds": seconds, "cpu_seconds": cpu}), flush=True)


if __name__ == "__main__":
    flight = int(sys.argv[5]) if len(sys.argv) > 5 else 16
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]).read_bytes(), flight))
