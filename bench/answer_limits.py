"""The figures behind max_result_bytes and the forward_timeout deadline (README, When things fail).

    python bench/answer_limits.py [--root DIR]

Starts a private redis-server, the API under gunicorn (threads) and one `rq worker -w worker.QueueWorker`, all run
from DIR (default: this checkout; give an older checkout to measure it the same way), against the test
model (tests/model_server.py), and prints:
  - four 50 MiB answers at once, with Content-Length, then four chunked: the worker's peak RSS (VmHWM in
    /proc/<pid>/status) and its RSS before,
    Redis's peak memory, how each request ended, and the size of one sink answer;
  - a model that sends its answer one byte every 3 s, forward_timeout = 5, no retries: how long the attempt
    held the worker's slot (the sink's ended_at - started_at).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import AUTH, BIN, RedisServer, free_port, service_env, wait_for  # noqa: E402
from tests.model_server import ModelServer  # noqa: E402

ANSWER = 50 * 1024 * 1024


def vm(pid: int, field: str) -> int:
    """A VmHWM/VmRSS figure of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    raise LookupError(field)


def start(command: list[str], root: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / command[0]), *command[1:]], cwd=root, env=env)


def sink(url: str, request_id: str) -> requests.Response:
    return requests.get(f"{url}/api/predict/svc/sink", params={"request_id": request_id}, headers=AUTH, timeout=60)


def listening(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=2).ok
    except requests.ConnectionError:
        return False


def ended(db, request_id: str) -> bool:
    return db.hget(f"rq:job:{request_id}", "status") in (b"finished", b"failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to run the API and worker from")
    root = parser.parse_args().root.resolve()
    model = ModelServer().start()
    with tempfile.TemporaryDirectory() as scratch:
        server = RedisServer(Path(scratch) / "redis").start()
        env = service_env(server.url, model.url, retry_intervals="", forward_timeout=5)
        db = server.client()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        api = start(
            [
                "gunicorn",
                "--no-control-socket",
                "--workers",
                "2",
                "--threads",
                "4",
                "-b",
                f"127.0.0.1:{port}",
                "eas_queue:app",
            ],
            root,
            env,
        )
        worker = start(["rq", "worker", "-w", "worker.QueueWorker", "high", "default", "--url", server.url], root, env)
        try:
            wait_for(lambda: db.keys("rq:worker:*"), 30, "the worker to register")
            wait_for(lambda: listening(url), 30, "the API")
            before = vm(worker.pid, "VmRSS")

            def submit(params: dict[str, str]) -> str:
                response = requests.post(url + "/api/predict/svc", data=b"{}", params=params, headers=AUTH, timeout=10)
                response.raise_for_status()
                return response.text

            print(f"root: {root}")
            for framing, extra in (("Content-Length", {}), ("chunked", {"chunked": "1"})):
                ids = [submit({"size": str(ANSWER), **extra}) for _ in range(4)]
                started = time.monotonic()
                wait_for(lambda ids=ids: all(ended(db, i) for i in ids), 300, "the four big answers")
                took = time.monotonic() - started
                peak = vm(worker.pid, "VmHWM")
                redis_peak = int(db.info("memory")["used_memory_peak"]) // (1024 * 1024)
                states = [db.hget(f"rq:job:{i}", "status").decode() for i in ids]
                answer = sink(url, ids[0])
                print(f"four {ANSWER // (1024 * 1024)} MiB answers ({framing}): {states} in {took:.1f}s")
                print(f"  worker RSS before {before} MB, peak (VmHWM) so far {peak} MB; Redis peak {redis_peak} MB")
                outcome = answer.json().get("error_info", "SUCCESS")
                print(f"  one sink answer: {len(answer.content) / 1e6:.1f} MB, {outcome}")
                db.delete(*[f"rq:job:{i}" for i in ids], *[f"rq:results:{i}" for i in ids])

            request_id = submit({"drip": "3"})
            wait_for(lambda: ended(db, request_id), 120, "the dripping answer")
            state = sink(url, request_id).json()
            held = datetime.fromisoformat(state["ended_at"][:-1]) - datetime.fromisoformat(state["started_at"][:-1])
            print(f"drip, one byte every 3 s, forward_timeout = 5: {state['status']} after")
            print(f"  {held.total_seconds():.1f}s holding the slot; {state.get('error_info', '')}")
        finally:
            for process in (worker, api):
                process.terminate()
                process.wait(30)
            server.kill()
            model.stop()


if __name__ == "__main__":
    main()
