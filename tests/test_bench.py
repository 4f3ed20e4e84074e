"""Smoke test of the benchmark harness: `bench/run.py --quick` sets everything up, measures, cleans up.

It needs wrk and nginx; run.py installs them with apt-get when they are missing, and exits non-zero when it
cannot, so this test fails (never skips) on a machine where the bench could not run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROWS = (
    "1. Enqueue req/s",
    "1b. Submit latency p99 beside 200 slow clients",
    "2. Drain jobs/s, fast model",
    "2b. Drain jobs/s, fast model (nginx), 2x stock",
    "3. Drain jobs/s, 100 ms model",
    "4. Latency p50",
    "4b. Latency p99",
    "5. Redis memory per queued 1 KB request",
    "5b. Worker RSS",
    "6. Redis memory kept per finished 1 KB request",
    "7. Soak",
    "7b. Soak: RSS growth",
    "8. Submits req/s beside",
)


def test_quick_bench_runs_and_prints_the_table():
    env = {k: v for k, v in os.environ.items() if not k.startswith("EAS_QUEUE_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    process = subprocess.Popen(
        [sys.executable, "bench/run.py", "--quick"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # run.py stops its servers and workers on SIGTERM
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
        raise AssertionError(f"bench/run.py --quick took over 120 s\nstdout:\n{out}\nstderr:\n{err[-3000:]}") from None
    assert process.returncode == 0, f"exit {process.returncode}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"
    assert out.lstrip().startswith("| Measurement"), out
    for row in ROWS:
        assert row in out, f"no row {row!r} in:\n{out}"
    assert "ERROR" not in out, out
    assert (ROOT / "bench" / "results" / "latest.md").read_text().count("| Measurement") == 1
