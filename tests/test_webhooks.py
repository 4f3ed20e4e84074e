"""Signed completion webhooks (webhooks.py, callbacks.py, callback_urls.py) against the running stack: the API
under gunicorn, QueueWorker processes for `high default` and for `webhooks`, a real redis-server, and a real
HTTP receiver in the test, verified with the `standardwebhooks` package."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rq.job import Job
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

import callbacks
import keys
import webhooks
from settings import SettingsError, load_settings
from tests.conftest import BIN, ROOT, Workers, service_env, wait_for

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook receiver: answers each POST with the next of `answers` (the last one from then on)."""

    answers: list[int] = field(default_factory=lambda: [204])
    got: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.got.append(Delivery(self.path, dict(self.headers), body))
                    status = receiver.answers.pop(0) if len(receiver.answers) > 1 else receiver.answers[0]
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def deliveries(self) -> list[Delivery]:
        with self.lock:
            return list(self.got)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver().start()
    yield started
    started.server.shutdown()
    started.server.server_close()


@pytest.fixture
def stack(make_api, redis_server, model, db):
    """Starts an API, a forwarding worker and a webhooks worker, all with the given callback settings."""
    pools: list[Workers] = []
    webhook_workers: list[subprocess.Popen] = []

    def start(allowed: str, forwarding: bool = True, toml: str | None = None, **settings: object):
        options = dict(callback_allowed_hosts=allowed, callback_secret=SECRET, callback_retry_intervals="0.2,0.2")
        options.update(settings)
        env = service_env(redis_server.url, model.url, **options)
        api = make_api(toml, **options)
        if forwarding:
            pool = Workers(env, redis_server.url)
            pool.start()
            pools.append(pool)
        command = [
            str(BIN / "rq"),
            "worker",
            "-w",
            "worker.QueueWorker",
            keys.WEBHOOKS_QUEUE,
            "--url",
            redis_server.url,
        ]
        webhook_workers.append(subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True))
        return api

    yield start
    for process in webhook_workers:
        process.terminate()
        process.wait(15)
    for pool in pools:
        pool.stop_all()


def callback_state(api, request_id: str, status: str, service: str = "svc", timeout: float = 30) -> dict:
    """The request's sink record once its webhook's delivery state is `status`."""
    found: dict = {}

    def reached() -> bool:
        found.update(api.state(request_id, service))
        return found.get("callback", {}).get("status") == status

    wait_for(reached, timeout, f"request {request_id}'s callback to be {status}")
    return found


def test_a_delivery_is_retried_with_one_webhook_id_and_verifies(stack, receiver, db):
    receiver.answers = [503, 503, 204]
    api = stack(f"127.0.0.1:{receiver.port}")
    url = f"http://127.0.0.1:{receiver.port}/hooks/eas?source=queue"
    request_id = api.submit_ok(headers={"X-Eas-Callback-Url": url})
    record = callback_state(api, request_id, "delivered")
    assert record["status"] == "SUCCESS"
    assert record["callback"] == {"url": url, "status": "delivered", "attempts": 3}
    got = receiver.deliveries()
    assert len(got) == 3
    message_id = webhooks.delivery_id(request_id, record["index"])
    assert {d.headers["webhook-id"] for d in got} == {message_id}  # the same across retries
    assert {d.path for d in got} == {"/hooks/eas?source=queue"}
    assert got[-1].headers["Host"] == f"127.0.0.1:{receiver.port}"
    sent = Webhook(SECRET).verify(got[-1].body, got[-1].headers)
    assert sent == {k: v for k, v in record.items() if k != "callback"}  # the JSON sink record
    assert Job.fetch(message_id, connection=db).origin == keys.WEBHOOKS_QUEUE  # an RQ job the dashboard shows


def test_a_forged_or_resigned_body_fails_verification(stack, receiver, db):
    api = stack(f"127.0.0.1:{receiver.port}")
    request_id = api.submit_ok(headers={"X-Eas-Callback-Url": f"http://127.0.0.1:{receiver.port}/"})
    callback_state(api, request_id, "delivered")
    [delivery] = receiver.deliveries()
    Webhook(SECRET).verify(delivery.body, delivery.headers)
    forged = delivery.body.replace(b'"SUCCESS"', b'"FAILURE"')
    assert forged != delivery.body
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(forged, delivery.headers)
    other_secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other_secret).verify(delivery.body, delivery.headers)


def test_a_failed_delivery_leaves_the_outcome_alone(stack, receiver, db):
    receiver.answers = [500]
    api = stack(f"127.0.0.1:{receiver.port}")
    request_id = api.submit_ok(headers={"X-Eas-Callback-Url": f"http://127.0.0.1:{receiver.port}/"})
    record = callback_state(api, request_id, "failed")
    assert record["status"] == "SUCCESS"  # the request's outcome is its own
    assert record["callback"]["attempts"] == 3  # the first try and both callback_retry_intervals
    assert record["callback"]["last_error"] == "the receiver answered HTTP 500: no"
    assert len(receiver.deliveries()) == 3


def test_redirects_and_other_4xx_are_not_retried(stack, receiver, db):
    receiver.answers = [302, 404]
    api = stack(f"127.0.0.1:{receiver.port}")
    first = api.submit_ok(headers={"X-Eas-Callback-Url": f"http://127.0.0.1:{receiver.port}/a"})
    record = callback_state(api, first, "failed")
    assert record["callback"]["attempts"] == 1
    assert "HTTP 302" in record["callback"]["last_error"] and "not followed" in record["callback"]["last_error"]
    second = api.submit_ok(headers={"X-Eas-Callback-Url": f"http://127.0.0.1:{receiver.port}/b"})
    assert callback_state(api, second, "failed")["callback"]["attempts"] == 1
    assert [d.path for d in receiver.deliveries()] == ["/a", "/b"]  # /elsewhere never asked


def test_every_kind_of_end_is_delivered(stack, receiver, workers, db):
    """CANCELED, EXPIRED and FAILURE get their webhooks too, each with the record the sink reports."""
    api = stack(f"127.0.0.1:{receiver.port}", forwarding=False)  # only the webhooks worker, at first
    hook = {"X-Eas-Callback-Url": f"http://127.0.0.1:{receiver.port}/"}
    canceled = api.submit_ok(headers=hook)
    expired = api.submit_ok(params={"_ttl_": "0.001"}, headers=hook)
    refused = api.submit_ok(params={"status": "400"}, headers=hook)
    assert api.cancel(canceled).status_code == 200
    assert callback_state(api, canceled, "delivered")["status"] == "CANCELED"
    workers.start()  # a forwarding worker: the expired request ends as it is claimed, the other is refused
    assert callback_state(api, expired, "delivered")["status"] == "EXPIRED"
    assert callback_state(api, refused, "delivered")["status"] == "FAILURE"
    sent = [Webhook(SECRET).verify(d.body, d.headers) for d in receiver.deliveries()]
    assert sent[0]["request_id"] == canceled  # the other two are delivered side by side, in either order
    assert {(s["request_id"], s["status"]) for s in sent} == {
        (canceled, "CANCELED"),
        (expired, "EXPIRED"),
        (refused, "FAILURE"),
    }


def test_refused_callback_urls_get_400_at_submit(make_api, receiver, redis_server, db):
    api = make_api(callback_allowed_hosts=f"127.0.0.1:{receiver.port}", callback_secret=SECRET)
    refused = {
        "http://169.254.169.254/latest/meta-data/": "not in callback_allowed_hosts",
        "http://localhost:6379/": "not in callback_allowed_hosts",
        f"http://127.0.0.1:{redis_server.port}/": "not in callback_allowed_hosts",
        f"http://localhost:{receiver.port}/": "not in callback_allowed_hosts",  # a name is its own entry
        f"ftp://127.0.0.1:{receiver.port}/": "http:// or https://",
        f"http://user:pw@127.0.0.1:{receiver.port}/": "user info",
    }
    for url, why in refused.items():
        answer = api.submit(headers={"X-Eas-Callback-Url": url})
        assert answer.status_code == 400, url
        assert why in answer.json()["error"] and "X-Eas-Callback-Url" in answer.json()["error"], answer.json()
    assert not db.keys("rq:job:*")
    assert api.submit(headers={"X-Eas-Callback-Url": f"http://127.0.0.1:{receiver.port}/ok"}).status_code == 200


def test_callbacks_are_off_by_default(api, db):
    answer = api.submit(headers={"X-Eas-Callback-Url": "http://127.0.0.1:9/"})
    assert answer.status_code == 400
    assert "callbacks are off" in answer.json()["error"]


def test_a_name_resolving_to_loopback_is_refused_at_delivery(stack, receiver, db):
    """`localhost:<port>` is allowed as a name, but it resolves to 127.0.0.1, which is not listed: the
    submit is accepted (the name is allowed) and the worker refuses to connect after resolving it."""
    api = stack(f"localhost:{receiver.port}")
    request_id = api.submit_ok(headers={"X-Eas-Callback-Url": f"http://localhost:{receiver.port}/"})
    record = callback_state(api, request_id, "failed")
    assert record["status"] == "SUCCESS"
    assert record["callback"]["attempts"] == 1  # refused, not retried
    assert "localhost resolves to 127.0.0.1" in record["callback"]["last_error"]
    assert receiver.deliveries() == []


def test_a_name_is_delivered_when_its_address_is_listed_too(stack, receiver, db):
    api = stack(f"localhost:{receiver.port},127.0.0.1:{receiver.port},[::1]:{receiver.port}")
    request_id = api.submit_ok(headers={"X-Eas-Callback-Url": f"http://localhost:{receiver.port}/"})
    callback_state(api, request_id, "delivered")
    [delivery] = receiver.deliveries()
    assert delivery.headers["Host"] == f"localhost:{receiver.port}"  # connected to the address, named the host


def test_a_service_callback_url_is_used_when_a_submit_names_none(stack, receiver, db):
    toml = f'[services.hooked]\ncallback_url = "http://127.0.0.1:{receiver.port}/service"\n'
    api = stack(f"127.0.0.1:{receiver.port}", toml=toml)
    request_id = api.submit_ok(service="hooked")
    callback_state(api, request_id, "delivered", service="hooked")
    assert [d.path for d in receiver.deliveries()] == ["/service"]


def test_a_dispatch_repeated_after_a_crash_queues_one_delivery(make_api, redis_server, model, receiver, db):
    """The outbox entry is written with the outcome; queuing its job and dropping the entry is one MULTI
    watched on the job's id, so an entry left behind by a crash (pushed again here) queues nothing more."""
    options = dict(callback_allowed_hosts=f"127.0.0.1:{receiver.port}", callback_secret=SECRET)
    api = make_api(**options)
    pool = Workers(service_env(redis_server.url, model.url, **options), redis_server.url)
    pool.start()  # no webhooks worker: the delivery job stays queued
    try:
        request_id = api.submit_ok(headers={"X-Eas-Callback-Url": f"http://127.0.0.1:{receiver.port}/"})
        index = api.wait_status(request_id, "SUCCESS")["index"]
        job_id = webhooks.delivery_id(request_id, index)
        wait_for(lambda: db.lrange(f"rq:queue:{keys.WEBHOOKS_QUEUE}", 0, -1) == [job_id.encode()], 15, "the job")
        assert db.llen(keys.CALLBACK_OUTBOX) == 0
        entry = f"svc {index} {request_id} http://127.0.0.1:{receiver.port}/"
        db.rpush(keys.CALLBACK_OUTBOX, entry)
        settings = load_settings({"EAS_QUEUE_REDIS_URL": redis_server.url, "EAS_QUEUE_CALLBACK_SECRET": SECRET})
        assert callbacks.dispatch(db, settings) == 0
        assert db.llen(keys.CALLBACK_OUTBOX) == 0
        assert db.lrange(f"rq:queue:{keys.WEBHOOKS_QUEUE}", 0, -1) == [job_id.encode()]
        assert api.state(request_id)["callback"]["status"] == "pending"
    finally:
        pool.stop_all()


def test_callback_settings_are_checked_at_start():
    base = {"EAS_QUEUE_CALLBACK_ALLOWED_HOSTS": "hooks.example.com:443"}
    with pytest.raises(SettingsError, match="callback_secret"):
        load_settings(base)
    with pytest.raises(SettingsError, match="callback_secret"):
        load_settings({**base, "EAS_QUEUE_CALLBACK_SECRET": "not-a-secret"})
    with pytest.raises(SettingsError, match="callback_allowed_hosts"):
        load_settings({"EAS_QUEUE_CALLBACK_ALLOWED_HOSTS": "hooks.example.com"})  # no port
    loaded = load_settings({**base, "EAS_QUEUE_CALLBACK_SECRET": SECRET, "EAS_QUEUE_CALLBACK_RETRY_INTERVALS": "2,4"})
    assert loaded.callback_allowed_hosts == ("hooks.example.com:443",)
    assert loaded.callback_retry_intervals == (2.0, 4.0)


def test_a_delivery_popped_by_a_worker_that_died_is_delivered(make_api, redis_server, model, receiver, db):
    """A delivery job is indexed as open, like a request, so the crash sweep of a `webhooks` worker finds it
    when a worker died between popping it (BLPOP) and claiming it."""
    options = dict(callback_allowed_hosts=f"127.0.0.1:{receiver.port}", callback_secret=SECRET)
    env = service_env(redis_server.url, model.url, **options)
    api = make_api(**options)
    pool = Workers(env, redis_server.url)
    pool.start()  # forwarding only, for now
    queue = f"rq:queue:{keys.WEBHOOKS_QUEUE}"
    try:
        request_id = api.submit_ok(headers={"X-Eas-Callback-Url": f"http://127.0.0.1:{receiver.port}/"})
        index = api.wait_status(request_id, "SUCCESS")["index"]
        job_id = webhooks.delivery_id(request_id, index)
        wait_for(lambda: db.lrange(queue, 0, -1) == [job_id.encode()], 15, "the delivery job")
        assert db.zscore(keys.OPEN_REQUESTS, job_id) is not None
        popper = subprocess.run(
            [sys.executable, "-c", f"import os, signal, redis\nprint(redis.Redis(port={redis_server.port}).blpop"
             f"(['{queue}'], 10), flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert job_id in popper.stdout and popper.returncode == -signal.SIGKILL
        assert db.llen(queue) == 0
        webhook_worker = subprocess.Popen(
            [str(BIN / "rq"), "worker", "-w", "worker.QueueWorker", keys.WEBHOOKS_QUEUE, "--url", redis_server.url],
            cwd=ROOT, env=env, start_new_session=True,
        )  # fmt: skip
        try:
            assert callback_state(api, request_id, "delivered", timeout=60)["callback"]["attempts"] == 1
            assert len(receiver.deliveries()) == 1
        finally:
            webhook_worker.terminate()
            webhook_worker.wait(15)
    finally:
        pool.stop_all()
