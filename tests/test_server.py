"""The server model (server.py: gunicorn's gevent workers, JSON for gunicorn's own errors), against the API
started as the Procfile starts it: slow clients hold nothing but their own connection, a stalled body gets
a JSON 408 without a worker being killed, and the answers gunicorn writes itself are JSON."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import AUTH, Api, service_env, wait_for

SLOW_CLIENTS = 200
HEADER_BOUND = 5  # server.py's keepalive: seconds a request line and headers may take


def worker_pids(api: Api) -> set[int]:
    """The gunicorn master's child processes: its workers."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == api.process.pid:
            children.add(int(stat.parent.name))
    return children


def booted_workers(api: Api, count: int = 2) -> set[int]:
    """The worker pids once all `count` workers have started (the API answers as soon as one has)."""

    def all_started() -> set[int] | None:
        pids = worker_pids(api)
        return pids if len(pids) == count else None

    return wait_for(all_started, 20, f"{count} workers to start")


def connect(api: Api) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=30)
    return sock


def answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Reads one HTTP answer from a raw socket: status, headers (lowercase names), body."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def raw_exchange(api: Api, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with connect(api) as sock:
        sock.sendall(data)
        return answer(sock)


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed `sock` (without waiting if it has not)."""
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


@pytest.fixture
def own_api(redis_server, model, db) -> Iterator[Api]:
    """An API of its own, so slow connections and worker pids do not mix with other tests'."""
    service = Api(service_env(redis_server.url, model.url))
    yield service
    service.stop()


def test_200_slow_clients_do_not_hold_up_normal_requests(own_api):
    api = own_api
    workers = booted_workers(api)
    request_head = b"POST /api/predict/svc HTTP/1.1\r\nHost: x\r\nAuthorization: " + AUTH["Authorization"].encode()
    body = json.dumps({"input": [1, 2, 3], "pad": "x" * 400}).encode()
    # Half trickle their headers a byte at a time (never finishing them), half their body.
    header_tricklers = [connect(api) for _ in range(SLOW_CLIENTS // 2)]
    body_tricklers = [connect(api) for _ in range(SLOW_CLIENTS // 2)]
    for sock in body_tricklers:
        sock.sendall(request_head + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    header_bytes = b"\r\nX-Slow: " + b"a" * 1000
    latencies: list[float] = []
    deadline, rounds = time.monotonic() + 3, 0
    while time.monotonic() < deadline and rounds < 300:
        for sock in body_tricklers:
            sock.sendall(body[rounds : rounds + 1])
        for sock in header_tricklers:
            try:
                sock.sendall(header_bytes[rounds : rounds + 1])
            except OSError:
                pass  # the server closed it: its headers took longer than the bound
        started = time.monotonic()
        assert api.submit(body=b'{"input": [1]}').status_code == 200
        assert requests.get(api.url + "/healthz", timeout=10).status_code == 200
        latencies.append(time.monotonic() - started)
        rounds += 1
    assert rounds >= 5, f"only {rounds} rounds of normal requests in 3 s beside {SLOW_CLIENTS} slow clients"
    # A slow upload that keeps moving is served like any other.
    for sock in body_tricklers:
        sock.sendall(body[rounds:])
    for sock in body_tricklers:
        status, headers, text = answer(sock)
        assert status == 200, text
        assert headers["x-eas-queueservice-request-id"] == text.decode()
        sock.close()
    # Headers that never end are cut off after the bound, answering nothing.
    wait_for(lambda: all(closed_by_server(s) for s in header_tricklers), HEADER_BOUND + 15, "header tricklers closed")
    for sock in header_tricklers:
        sock.close()
    assert worker_pids(api) == workers  # no worker was killed or restarted


def test_a_stalled_body_gets_a_json_408_and_the_worker_lives(own_api):
    api = own_api
    workers = booted_workers(api)
    with connect(api) as sock:
        head = b"POST /api/predict/svc HTTP/1.1\r\nHost: x\r\nAuthorization: " + AUTH["Authorization"].encode()
        sock.sendall(head + b'\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"in')
        status, headers, text = answer(sock)  # the body never comes
    assert status == 408
    assert headers["content-type"] == "application/json"
    assert "no part of the body arrived" in json.loads(text)["error"]
    assert worker_pids(api) == workers
    assert api.submit().status_code == 200


def test_a_request_waiting_for_redis_does_not_hold_up_others_in_its_worker(redis_server, model, db):
    """Redis calls yield to other requests (gevent's patching reached redis-py): with one worker, a request
    that needs no Redis is answered while another waits on a paused Redis."""
    api = Api(service_env(redis_server.url, model.url, redis_timeout=5), args=("--workers", "1"))
    try:
        assert api.submit().status_code == 200  # the worker's Redis connection is made
        db.execute_command("CLIENT", "PAUSE", "3000", "WRITE")  # scripts (the enqueue) wait; reads do not
        waiting: dict[str, int] = {}
        stuck = threading.Thread(target=lambda: waiting.update(status=api.submit().status_code))
        stuck.start()
        wait_for(lambda: db.info("clients")["blocked_clients"], 5, "the submit to wait for Redis")
        refused = requests.post(api.url + "/api/predict/svc", data=b"{}", timeout=10)  # no token: no Redis
        assert refused.status_code == 401
        assert stuck.is_alive() and not waiting  # answered while the other still waited for Redis
        stuck.join(10)
        assert waiting == {"status": 200}
    finally:
        db.execute_command("CLIENT", "UNPAUSE")
        api.stop()


@pytest.mark.parametrize(
    ("request_bytes", "status", "says"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "headers too large"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n", 431, "headers too large"),
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request line too long"),
        (
            b"GET /api/predict/svc/sink?request_id=" + b"f" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            414,
            "request line too long",
        ),
        (b"GARBAGE\r\n\r\n", 400, "malformed request"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400, "malformed request"),
        (b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", 400, "malformed request"),
    ],
    ids=["huge-header", "many-headers", "long-url", "long-request-id", "bad-request-line", "bad-header", "bad-version"],
)
def test_errors_gunicorn_answers_itself_are_json(api, request_bytes, status, says):
    code, headers, text = raw_exchange(api, request_bytes)
    assert code == status, text
    assert headers["content-type"] == "application/json"
    assert says in json.loads(text)["error"]


def test_the_dashboard_slash_redirect_is_json(api):
    response = requests.get(api.url + "/rq", allow_redirects=False, timeout=10)
    assert response.status_code == 308
    assert response.headers["Location"].endswith("/rq/")
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["location"] == response.headers["Location"]
