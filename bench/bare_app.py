"""The reference for enqueue throughput: a bare Flask endpoint doing one pipelined Redis write per request.

Served by gunicorn exactly like the real app (`bare_app:app`, cwd bench/); BENCH_REDIS_URL names Redis.
It stores the body in a small hash and pushes its id on a list in one round trip, the least any queue
must do, so app / bare shows what eas-queue's own work per request costs.
"""

from __future__ import annotations

import os
import time
import uuid

import redis
from flask import Flask, Response, request

app = Flask(__name__)
connection = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])


@app.post("/api/predict/<service>")
def submit(service: str) -> Response:
    """Stores the request and answers with its id, like the real API but with no checks."""
    request_id = str(uuid.uuid4())
    with connection.pipeline(transaction=False) as pipe:
        pipe.hset(f"bare:job:{request_id}", mapping={"service": service, "body": request.get_data(), "at": time.time()})
        pipe.rpush("bare:queue", request_id)
        pipe.execute()
    return Response(request_id, status=200, mimetype="text/plain")
