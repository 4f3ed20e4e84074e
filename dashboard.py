"""rq-dashboard at /rq, behind HTTP Basic auth whose password is an API token."""

from __future__ import annotations

from urllib.parse import urlsplit

import rq_dashboard
from flask import Flask, Response, jsonify, request

from auth import token_accepted
from settings import Settings


def _refuse(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(error=message)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def add_dashboard(app: Flask, settings: Settings) -> None:
    app.config["RQ_DASHBOARD_REDIS_URL"] = settings.redis_url
    rq_dashboard.web.setup_rq_connection(app)
    app.register_blueprint(rq_dashboard.blueprint, url_prefix="/rq")

    def dashboard_guard() -> Response | None:
        auth = request.authorization
        if auth is None or auth.type != "basic" or not token_accepted(auth.password or "", settings.tokens):
            return _refuse(
                401,
                "the dashboard needs HTTP Basic auth; the password is an API token",
                {"WWW-Authenticate": 'Basic realm="eas-queue dashboard"'},
            )
        if (request.view_args or {}).get("instance_number", 0) != 0:  # one Redis: instance 0 only
            return _refuse(404, "not found")
        # Browsers resend Basic credentials to any site's forms and images, so an action (requeue, delete,
        # empty) must come from this host's own pages: the dashboard's scripts send Origin or Referer.
        if request.method not in ("GET", "HEAD") or request.path.startswith("/rq/requeue/"):
            source = request.headers.get("Origin") or request.headers.get("Referer") or ""
            if urlsplit(source).netloc != request.host:
                return _refuse(403, "dashboard actions must come from its own pages (Origin of this host)")
        return None

    # First among the dashboard's own hooks (which open a Redis connection per request), and only on its
    # routes: the API's requests do not pay for it.
    app.before_request_funcs.setdefault(rq_dashboard.blueprint.name, []).insert(0, dashboard_guard)
