"""How the API is served: gunicorn with gevent workers, and JSON instead of gunicorn's HTML error pages.

    gunicorn --config python:server --workers 4 --bind 127.0.0.1:5000 eas_queue:app

Why gevent: a sync worker is held by one connection for as long as its client takes to send its request,
so four clients trickling a header byte a second stopped the whole API (and then got its workers killed).
Under gevent each connection holds only its own greenlet; a worker serves up to `worker_connections` at a
time and a waiting client costs a few KB, which the sink's long-polls, WebSocket watches and event streams
need too.

Why the patching is here: gunicorn reads this module in the master before it imports the app
(`preload_app`), so `monkey.patch_all()` at the top makes every later import cooperative: redis-py's socket
and `from time import sleep` in redis.retry, threading locks, ssl. gunicorn's gevent worker patches again at
worker start (a no-op by then); without the master's patch, `--preload` would import all of those unpatched
and gevent warns that ssl was imported before patching.

Bounds on a slow client: its request line and headers must arrive within `keepalive` seconds (gunicorn's
gevent worker reads them under that timeout and then closes the connection, answering nothing), and a body
that stalls for `api.BODY_IDLE_TIMEOUT` seconds gets a JSON 408 (api.read_body).
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from datetime import datetime  # noqa: E402
from ssl import SSLError  # noqa: E402
from typing import Any  # noqa: E402

from gunicorn import util  # noqa: E402
from gunicorn.http import errors as http_errors  # noqa: E402
from gunicorn.http.wsgi import Response, default_environ  # noqa: E402
from gunicorn.workers.ggevent import GeventWorker  # noqa: E402

# gunicorn settings (module-level names that match gunicorn's settings are read as such).
worker_class = "server.JsonGeventWorker"
preload_app = True  # import the app once in the master: a bad setting stops it with one line, before forking
keepalive = 5  # seconds for a request line and headers to arrive (and for an idle keep-alive connection)
worker_connections = 1000  # connections one worker serves at a time; more wait in the listen backlog


# Metrics from every worker (metrics.py): prometheus-client's multiprocess mode reads this directory, which
# must be set before the app (and so prometheus_client) is imported, and be empty at start. Only when
# gunicorn runs this file: a test importing it must not switch its own process to that mode.
_UNDER_GUNICORN = "gunicorn.app.wsgiapp" in sys.modules
_OWN_METRICS_DIR = _UNDER_GUNICORN and not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _OWN_METRICS_DIR:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="eas-queue-metrics-")
elif _UNDER_GUNICORN:
    for _stale in os.scandir(os.environ["PROMETHEUS_MULTIPROC_DIR"]):
        if _stale.name.endswith(".db"):
            os.unlink(_stale.path)


def child_exit(server: Any, worker: Any) -> None:
    """A worker ended: its count of waiting clients goes (its counters stay, summed with the others')."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    if _OWN_METRICS_DIR:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def _json_logconfig() -> dict[str, Any] | None:
    """Under log_format = "json", gunicorn's own lines are JSON too (logs.py's formatter); the root logger is
    left to logs.configure."""
    from settings import get_settings

    if not _UNDER_GUNICORN or get_settings().log_format != "json":
        return None
    own = {"propagate": False}
    return {
        "root": {"level": "WARNING", "handlers": []},
        "loggers": {
            "gunicorn.error": {"handlers": ["error_console"], "qualname": "gunicorn.error", **own},
            "gunicorn.access": {"handlers": ["console"], "qualname": "gunicorn.access", **own},
        },
        "formatters": {"generic": {"()": "logs.json_formatter"}},
    }


logconfig_dict = _json_logconfig() or {}

# Statuses other than 400 for gunicorn's own parse errors, as gunicorn's Worker.handle_error chooses them.
_STATUS: tuple[tuple[type[BaseException], int, str], ...] = (
    (http_errors.InvalidResponseHeader, 500, "Internal Server Error"),  # the app's fault, not the client's
    (http_errors.InvalidResponseHeaderName, 500, "Internal Server Error"),
    (http_errors.LimitRequestLine, 414, "URI Too Long"),
    (http_errors.LimitRequestHeaders, 431, "Request Header Fields Too Large"),
    (http_errors.ExpectationFailed, 417, "Expectation Failed"),
    (http_errors.UnsupportedTransferCoding, 501, "Not Implemented"),
    (http_errors.ConfigurationProblem, 500, "Internal Server Error"),
    (http_errors.ForbiddenProxyRequest, 403, "Forbidden"),
    (SSLError, 403, "Forbidden"),
    (http_errors.ParseException, 400, "Bad Request"),
)
_MESSAGES = {
    414: "request line too long (the URL and its query)",
    431: "request headers too large",
    403: "request forbidden",
    500: "internal error",
}


def error_status(exc: BaseException) -> tuple[int, str]:
    """The status gunicorn would answer for an error raised while reading a request (500 if unexpected)."""
    for kind, status, reason in _STATUS:
        if isinstance(exc, kind):
            return status, reason
    return 500, "Internal Server Error"


def json_error(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 answer with errors.py's shape, `{"error": "..."}`; the connection is closed."""
    body = json.dumps({"error": message}, separators=(",", ":")).encode()
    head = f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
    return head.encode("latin-1") + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


class JsonGeventWorker(GeventWorker):
    """gunicorn's gevent worker, answering the errors gunicorn raises itself (a malformed request line,
    headers too large, a URL too long...) as JSON like every other answer, instead of an HTML page."""

    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: BaseException) -> None:
        started = datetime.now()
        addr = addr or ("", -1)  # a unix socket
        status, reason = error_status(exc)
        if status == 500:
            self.log.exception("Error handling request %s", getattr(req, "uri", "(no URI read)"))
            message = _MESSAGES[500]
        else:
            self.log.warning("Invalid request from ip=%s: %s", addr[0], exc)
            message = f"{_MESSAGES.get(status, 'malformed request')}: {exc}"
        if req is None and isinstance(exc, (http_errors.InvalidHeader, http_errors.InvalidHeaderName)):
            req = getattr(exc, "req", None)  # for the access log, as gunicorn does
        answer = json_error(status, reason, message)
        if req is not None:
            environ = default_environ(req, client, self.cfg)
            environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = addr[0], str(addr[1])
            response = Response(req, client, self.cfg)
            response.status, response.response_length = f"{status} {reason}", len(answer)
            self.log.access(response, req, environ, datetime.now() - started)
        try:
            util.write_nonblock(client, answer)
        except Exception:
            self.log.debug("Failed to send error message.")
