"""The eas-queue API: accept prediction requests into RQ queues and report their outcome.

POST /api/predict/<service>[/<subpath>]      enqueue; answers at once with the request id (api.py)
GET  /api/predict/<service>/sink?request_id  status and the model's answer; long-polls, _raw_ (api.py)
DELETE the same                              cancel a request that has not started (api.py)
     the sink with EAS's parameters           the EAS SDK's calls and its WebSocket watch (eas_sink.py)
GET  .../sink?_watch_=true (event-stream)    Server-Sent Events (events.py)
GET  /healthz, /readyz, /metrics             liveness, readiness, Prometheus (api.py, metrics.py)
/rq                                          rq-dashboard, behind HTTP Basic auth (password: a token)

`eas_queue:app` is the WSGI app for gunicorn (made on first use, from the process's settings);
`'eas_queue:create_app()'` and `flask --app eas_queue run` work too.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response

import api
import eas_sink
import logs
import metrics
import queueing
from admin import queue_cli
from backpressure import MemoryWatch
from dashboard import add_dashboard
from errors import register_error_handlers
from notifier import EndedNotifier
from settings import Settings, get_settings


class App(Flask):
    """Flask, answering OPTIONS on any route with 204 and `Allow` (api.options_answer), not text/html."""

    def make_default_options_response(self) -> Response:
        return api.options_answer(super().make_default_options_response())


def create_app(settings: Settings | None = None) -> Flask:
    """The app for `settings` (default: the process's, from settings.toml and the environment)."""
    settings = settings or get_settings()
    logs.configure(settings.log_format)
    app = App(__name__)
    app.json.sort_keys = False  # keep the sink's fields in the order they are documented
    app.url_map.merge_slashes = False  # `a//b` is a bad subpath (400), not a redirect to `a/b`
    app.url_map.converters["subpath"] = api.SubpathConverter
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    connection = queueing.connect(settings.redis_url, settings.redis_timeout)
    memory = MemoryWatch(connection, settings.redis_memory_high_water)
    notifier = EndedNotifier(
        lambda: queueing.connect(settings.redis_url, settings.redis_timeout), settings.max_waiting_clients
    )
    enqueuer = queueing.Enqueuer(connection, settings)
    app.extensions["eas_queue"] = api.ApiContext(settings, connection, enqueuer, memory, notifier)
    app.register_blueprint(api.bp)
    app.register_blueprint(eas_sink.bp)  # the EAS SDK's watch (a WebSocket on the sink)
    metrics.install(app)  # /metrics, and a log line and a count per submit
    add_dashboard(app, settings, connection)
    register_error_handlers(app)
    app.cli.add_command(queue_cli)  # flask --app eas_queue queue ... (admin.py)
    return app


_app: Flask | None = None


def __getattr__(name: str) -> Any:
    """`eas_queue.app`, made when first asked for, so importing this module reads no settings."""
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        _app = create_app()
    return _app
