"""Real parts for the tests: redis-server on a free port, the API under gunicorn, `rq worker` processes
started the way users start them, and a real HTTP server as the model."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import requests

from tests.model_server import ModelServer

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOKEN = "test-token"
AUTH = {"Authorization": TOKEN}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 15, what: str = "condition") -> object:
    """Polls `predicate` until it returns something truthy; fails the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def redis_server_binary() -> str:
    found = shutil.which("redis-server", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        raise RuntimeError("no redis-server: run `make test`, which installs one if the machine has none")
    return found


class RedisServer:
    """A private redis-server; `appendfsync` turns on the append-only file."""

    def __init__(
        self, directory: Path, appendfsync: str | None = None, port: int | None = None, password: str | None = None
    ) -> None:
        self.directory, self.appendfsync, self.password = directory, appendfsync, password
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.tls: tuple[Path, Path, Path] | None = None  # CA, certificate, key: serve TLS only

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        secret = f":{self.password}@" if self.password else ""
        query = f"?ssl_ca_certs={self.tls[0]}" if self.tls else ""
        return f"{scheme}://{secret}127.0.0.1:{self.port}/0{query}"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=10)

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ["--port", str(self.port), "--appendonly", "no"]
        if self.appendfsync:
            options[2:] = ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        if self.password:
            options += ["--requirepass", self.password]
        if self.tls:
            ca, certificate, key = self.tls
            options[:2] = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            options += ["--tls-ca-cert-file", str(ca), "--tls-cert-file", str(certificate), "--tls-key-file", str(key)]
        log = self.directory / "redis.log"
        command = [redis_server_binary(), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.directory)]
        self.process = subprocess.Popen([*command, "--logfile", str(log), *options])
        client = self.client()
        try:
            wait_for(lambda: _pings(client), 10, "redis-server to start")
        except AssertionError:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def service_env(redis_url: str, model_url: str, **settings: object) -> dict[str, str]:
    """The environment for the API and the workers: the given settings over short test defaults."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("EAS_QUEUE_") and k not in ("REDIS_URL", "TARGET_API_BASE_URL")
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    defaults = {
        "redis_url": redis_url,
        "target_api_base_url": model_url,
        "tokens": f"{TOKEN},second-token",
        "retry_intervals": "1,1,1",
        "forward_timeout": 5,
        "worker_concurrency": 8,
        "redis_timeout": 1,
    }
    defaults.update(settings)
    for key, value in defaults.items():
        env[f"EAS_QUEUE_{key.upper()}"] = str(value)
    return env


class Api:
    """The API under gunicorn, as the Procfile runs it: server.py's gevent workers, preloaded."""

    def __init__(self, env: dict[str, str], output: Path | None = None, args: tuple[str, ...] = ()) -> None:
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [BIN / "gunicorn", "--config", "python:server", "--workers", "2", "--no-control-socket"]
        command += ["--bind", f"127.0.0.1:{self.port}", "--log-level", "warning", *args, "eas_queue:app"]
        log = output.open("ab") if output else None
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
        wait_for(self._listening, 20, "the API to listen")

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the API exited with {self.process.returncode}")
        try:
            requests.get(self.url + "/healthz", timeout=2)
            return True
        except requests.ConnectionError:
            return False

    def submit(
        self,
        service: str = "svc",
        body: bytes | str = b"{}",
        params: dict | None = None,
        headers: dict | None = None,
        subpath: str = "",
    ) -> requests.Response:
        path = f"/api/predict/{service}" + (f"/{subpath}" if subpath else "")
        headers = {**AUTH, "Content-Type": "application/json", **(headers or {})}
        return requests.post(self.url + path, data=body, params=params, headers=headers, timeout=10)

    def submit_ok(self, service: str = "svc", **kwargs: object) -> str:
        response = self.submit(service, **kwargs)
        assert response.status_code == 200, response.text
        return response.text

    def sink(self, request_id: str, service: str = "svc", headers: dict | None = None) -> requests.Response:
        return requests.get(
            f"{self.url}/api/predict/{service}/sink",
            params={"request_id": request_id},
            headers=headers if headers is not None else AUTH,
            timeout=10,
        )

    def cancel(self, request_id: str, service: str = "svc") -> requests.Response:
        return requests.delete(
            f"{self.url}/api/predict/{service}/sink", params={"request_id": request_id}, headers=AUTH, timeout=10
        )

    def state(self, request_id: str, service: str = "svc") -> dict:
        response = self.sink(request_id, service)
        assert response.status_code in (200, 202), response.text
        return response.json()

    def wait_status(
        self, request_id: str, status: str | tuple[str, ...], timeout: float = 30, service: str = "svc"
    ) -> dict:
        wanted = (status,) if isinstance(status, str) else status
        found: dict = {}

        def reached() -> bool:
            found.update(self.state(request_id, service))
            return found["status"] in wanted

        wait_for(reached, timeout, f"request {request_id} to reach {wanted} (last seen: {found.get('status')})")
        return found

    def stop(self) -> None:
        """Gunicorn's quick shutdown (SIGQUIT): a graceful one waits for kept-alive client connections, 6.5 s
        for some tests, and no test relies on it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Workers:
    """`rq worker` processes started in the project root (or `cwd`, another copy of it), as the README says
    to start them; with `redis_url` None, they find Redis through `--config worker` (the settings)."""

    def __init__(self, env: dict[str, str], redis_url: str | None, cwd: Path = ROOT) -> None:
        self.env, self.redis_url, self.cwd = env, redis_url, cwd
        self.processes: list[subprocess.Popen] = []

    def start(
        self,
        count: int = 1,
        plain: bool = False,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        output: Path | None = None,
    ) -> list[subprocess.Popen]:
        """`plain`: stock `rq worker high default` (a fork per job) instead of `-w worker.QueueWorker`."""
        where = ["--url", self.redis_url] if self.redis_url else ["--config", "worker"]
        command = [str(BIN / "rq"), "worker", "high", "default", *where, *args]
        if not plain:
            command[2:2] = ["-w", "worker.QueueWorker"]
        log = output.open("ab") if output else None
        started = [
            subprocess.Popen(
                command, cwd=self.cwd, env={**self.env, **(env or {})}, start_new_session=True, stdout=log, stderr=log
            )
            for _ in range(count)
        ]
        self.processes += started
        return started

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes = []


@pytest.fixture(scope="session")
def model() -> Iterator[ModelServer]:
    server = ModelServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def api(redis_server: RedisServer, model: ModelServer) -> Iterator[Api]:
    service = Api(service_env(redis_server.url, model.url))
    yield service
    service.stop()


@pytest.fixture
def db(redis_server: RedisServer, model: ModelServer) -> Iterator[redis.Redis]:
    """An empty database and a model with no recorded requests, for each test."""
    client = redis_server.client()
    client.flushall()
    with model.lock:
        model.received.clear()
    yield client


@pytest.fixture
def workers(db: redis.Redis, redis_server: RedisServer, model: ModelServer) -> Iterator[Workers]:
    pool = Workers(service_env(redis_server.url, model.url), redis_server.url)
    yield pool
    pool.stop_all()


@pytest.fixture
def make_api(redis_server: RedisServer, model: ModelServer, tmp_path: Path) -> Iterator[Callable[..., Api]]:
    """Starts an API with other settings: keyword settings, and `toml` text laid over settings.toml."""
    started: list[Api] = []

    def start(toml: str | None = None, **settings: object) -> Api:
        env = service_env(redis_server.url, model.url, **settings)
        if toml is not None:
            path = tmp_path / f"settings-{len(started)}.toml"
            path.write_text(toml)
            env["EAS_QUEUE_SETTINGS"] = str(path)
        service = Api(env)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()
