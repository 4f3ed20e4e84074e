"""Workers on many hosts: a second copy of the project in another directory (as a deploy to another host
would put it), configured only through environment variables that point at the shared Redis, takes
requests alongside the workers of this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.conftest import ROOT, Workers, service_env, wait_for


def copy_of_the_project(destination: Path) -> Path:
    """The files a deploy ships: tracked ones and new ones not ignored (`git ls-files -co --exclude-standard`),
    as they are in the working tree; no venv, no var/, no caches."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split(b"\0")):
        source = ROOT / os.fsdecode(name)
        if source.is_file():  # a tracked file deleted in the working tree is not shipped
            target = destination / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def test_workers_of_a_second_copy_configured_by_environment_take_requests(api, redis_server, model, db, tmp_path):
    copy = copy_of_the_project(tmp_path / "host-b")
    assert (copy / "worker.py").is_file() and not (copy / ".venv").exists()
    env = service_env(redis_server.url, model.url)  # EAS_QUEUE_* variables only: REDIS_URL among them
    for name in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE"):  # nothing may lead the copy back to this checkout
        env.pop(name, None)
    here = Workers(env, redis_url=None)  # `--config worker`: Redis as the settings say
    there = Workers(env, redis_url=None, cwd=copy)
    try:
        here.start(args=("--name", "host-a-1"))
        there.start(args=("--name", "host-b-1"))
        wait_for(lambda: db.scard("rq:workers") == 2, 30, "both hosts' workers to register")
        ids = [api.submit_ok(params={"delay": "0.3"}, body=str(n).encode()) for n in range(40)]
        for request_id in ids:
            api.wait_status(request_id, "SUCCESS", timeout=60)
        # RQ's job hash keeps the name of the worker that forwarded the request.
        forwarded_by = Counter(db.hget(f"rq:job:{request_id}", "worker_name").decode() for request_id in ids)
        print(f"\nrequests forwarded per host: {dict(forwarded_by)}", file=sys.stderr)
        assert set(forwarded_by) == {"host-a-1", "host-b-1"}, forwarded_by
        assert sorted(model.ids()) == sorted(ids)  # each forwarded once
        assert list((copy / "__pycache__").glob("worker.*.pyc")), "the copy's workers ran the copy's code"
    finally:
        there.stop_all()
        here.stop_all()
