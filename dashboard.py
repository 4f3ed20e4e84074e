"""rq-dashboard at /rq, behind HTTP Basic auth whose password is an API token.

rq-dashboard 0.9.0 is used as it ships, with a few changes made here rather than in a copy of it:

- Its pages render job data (result, exc_info, description, metadata, worker and queue fields) through
  underscore templates with `<%= %>`, which does not escape, so a model that echoes `<img onerror=...>`
  could run script with the operator's Basic credentials. `TEMPLATE_PATCHES` makes every `<%= %>` escape
  (one setting in the script all pages include) and fixes what that would double-escape; the patches are
  exact text replacements on the shipped templates, checked at start, so an upgrade that moves them fails
  loudly instead of silently serving the unpatched page.
- Every /rq answer carries a Content-Security-Policy that allows only the dashboard's own files and its one
  inline script (by a per-response nonce): injected markup cannot run script even if escaping were missed.
- Requeue of a job that is not failed (already requeued) answers 409 with the reason, not a 500; a
  requeued request is put back in the open-requests index (`lifecycle.requeue_failed`) for the crash sweep.
- The workers list shows what a request is (service, priority, body size, attempt, last error), never the
  job's call string, which holds the whole request body.
- The favicon link points at the dashboard's own favicon (it pointed at the app's missing /static/).
- Compact of an empty queue answers OK: RQ's compact renames the queue's list, which Redis refuses when the
  list is not there (it was a 503 claiming Redis was unavailable).
- A URL whose job id, registry or page no job or page can have is a 404 before its view runs: rq refuses
  such a job id with a ValueError, and the job list divides by its page size (each was a 500).
"""

from __future__ import annotations

import re
import secrets
from typing import Any
from urllib.parse import urlsplit

import redis
import rq_dashboard
from flask import Flask, Response, current_app, g, jsonify, request
from jinja2 import BaseLoader, ChoiceLoader, Environment, TemplateNotFound
from rq import Queue, Worker
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, validate_job_id
from rq.registry import FailedJobRegistry

import keys
import lifecycle
import redis_connection
from auth import token_accepted
from forwarding import ModelRequest
from queueing import FORWARD_FUNCTION
from settings import Settings

BLUEPRINT = rq_dashboard.blueprint.name
_BODY_ARG = ModelRequest._fields.index("body")  # worker.forward's arguments are a ModelRequest

# `<%= x %>` is read by the escape rule like `<%- x %>`; interpolate gets underscore's never-matching pattern.
_ESCAPE_EVERY_INTERPOLATION = (
    "_.templateSettings.escape = /<%[=-]([\\s\\S]+?)%>/g;\n_.templateSettings.interpolate = /(.)^/g;\n"
)

# template name -> (shipped text, replacement) pairs; each shipped text must occur exactly once.
TEMPLATE_PATCHES: dict[str, tuple[tuple[str, str], ...]] = {
    # Included at the top of the one inline script of every page, before any template is compiled.
    "rq_dashboard/inline_js.html": (
        ("var AUTOREFRESH_FLAG = 1;\n", "var AUTOREFRESH_FLAG = 1;\n" + _ESCAPE_EVERY_INTERPOLATION),
    ),
    "rq_dashboard/base.html": (
        ("url_for('static', filename='favicon.ico')", "url_for('rq_dashboard.favicon')"),
        ('<script type="text/javascript">', '<script type="text/javascript" nonce="{{ csp_nonce }}">'),
    ),
    # The jobs list escaped these two itself; with every interpolation escaping they would show `&lt;`.
    "rq_dashboard/jobs.html": (
        ("<%= $('<div/>').text(d.description).html() %>", "<%- d.description %>"),
        ("<%= $('<div/>').text(d.exc_info).html() %>", "<%- d.exc_info %>"),
    ),
    # A queue name from the URL, HTML-escaped into a JavaScript string: JSON is the right escaping there.
    "rq_dashboard/scripts/jobs.js": (("$(this).val('{{ queue.name }}');", "$(this).val({{ queue.name|tojson }});"),),
}

# The dashboard's scripts compile underscore templates (`new Function`: 'unsafe-eval'); bootstrap's CSS has
# data: images and the pages use style attributes. Nothing else: no inline handlers, no other origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self' 'nonce-{nonce}' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


class PatchedTemplates(BaseLoader):
    """Serves the templates named in `patches`: the shipped source (from `shipped`) with the replacements."""

    def __init__(self, shipped: BaseLoader, patches: dict[str, tuple[tuple[str, str], ...]]) -> None:
        self.shipped, self.patches = shipped, patches

    def get_source(self, environment: Environment, template: str) -> tuple[str, str | None, Any]:
        if template not in self.patches:
            raise TemplateNotFound(template)
        source, filename, uptodate = self.shipped.get_source(environment, template)
        for old, new in self.patches[template]:
            if source.count(old) != 1:
                raise RuntimeError(f"rq-dashboard's {template} changed: cannot apply the patch for {old!r}")
            source = source.replace(old, new)
        return source, filename, uptodate


# The registries rq-dashboard's job list and "empty" know; another name left a variable unset (a 500).
REGISTRY_NAMES = frozenset({"queued", "failed", "deferred", "started", "finished", "scheduled", "canceled"})
_PAGE_NUMBER = re.compile(r"[0-9]{1,9}")


def names_nothing(view_args: dict[str, Any]) -> bool:
    """Whether the URL's job id, registry or page is one no job or page can have (answered 404): rq's
    Job.fetch raises ValueError for such an id, and the job list divides by `per_page`."""
    job_id = view_args.get("job_id")
    if job_id is not None:
        try:
            validate_job_id(job_id)
        except (TypeError, ValueError):
            return True
    registry = view_args.get("registry_name")
    if registry is not None and registry not in REGISTRY_NAMES:
        return True
    for name, least in (("per_page", 1), ("page", 0)):  # page 0: the "last page" link of an empty list
        value = view_args.get(name)
        if value is not None and not (_PAGE_NUMBER.fullmatch(str(value)) and int(value) >= least):
            return True
    return False


def _refuse(code: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> Response:
    response = jsonify(error=message, **extra)
    response.status_code = code
    response.headers.update(headers or {})
    return response


def _redis() -> Any:
    return current_app.redis_conn  # type: ignore[attr-defined]  # set by rq_dashboard's own hook


def requeue_one(job_id: str) -> Response:
    """Requeue a failed job; 409 with its status if it is not failed (e.g. requeued already)."""
    job = Job.fetch(job_id, connection=_redis())  # NoSuchJobError: 404 (errors.py)
    try:
        lifecycle.requeue_failed(_redis(), job)  # RQ's requeue, back in the open-requests index too
    except InvalidJobOperation:
        status = job.get_status(refresh=True)
        state = status.value if status else "unknown"
        return _refuse(409, f"only a failed job can be requeued; this one is {state}", status=state)
    return jsonify(status="OK")


def requeue_all(queue_name: str) -> Response:
    """Requeue every failed job of a queue; one requeued or removed meanwhile is skipped, not a 500."""
    registry = FailedJobRegistry(queue_name, connection=_redis())
    count = 0
    for job_id in registry.get_job_ids(cleanup=False):
        try:
            lifecycle.requeue_failed(_redis(), Job.fetch(job_id, connection=_redis()))
            count += 1
        except (InvalidJobOperation, NoSuchJobError):
            pass
    return jsonify(status="OK", count=count)


def compact_queue(queue_name: str) -> Response:
    """RQ's compact (drop ids whose job is gone); an empty queue has nothing to compact. RQ renames the
    queue's list first, which Redis refuses for a list that is not there: that was a 503 "Redis
    unavailable" (errors.py reads any Redis error so)."""
    try:
        Queue(queue_name, connection=_redis()).compact()
    except redis.ResponseError as error:
        if "no such key" not in str(error).lower():
            raise
    return jsonify(status="OK")


def current_request(job: Job | None) -> dict[str, Any] | str:
    """What a worker is forwarding, as an operator needs it: never the body (the call string holds it)."""
    if job is None:
        return "idle"
    service, attempts, last_error = (
        value.decode(errors="replace") if value is not None else None
        for value in _redis().hmget(job.key, keys.SERVICE_FIELD, keys.ATTEMPTS_FIELD, keys.LAST_ERROR_FIELD)
    )
    body_bytes = None
    if job.func_name == FORWARD_FUNCTION and len(job.args) > _BODY_ARG and isinstance(job.args[_BODY_ARG], bytes):
        body_bytes = len(job.args[_BODY_ARG])
    priority = job.origin == keys.QUEUE_NAMES[0]
    attempt = int(attempts) if attempts and attempts.isdigit() else None
    summary = [service or "?", "priority" if priority else "normal priority"]
    summary.append(f"{body_bytes:,} bytes" if body_bytes is not None else "body size unknown")
    summary.append(f"attempt {attempt}" if attempt is not None else "not attempted yet")
    if last_error:
        summary.append(f"last error: {last_error}")
    return {
        "job_id": job.id,
        "description": job.description,
        "created_at": rq_dashboard.web.serialize_date(job.created_at),
        "call_string": ", ".join(summary),  # the field the workers page shows
        "service": service,
        "priority": priority,
        "body_bytes": body_bytes,
        "attempt": attempt,
        "last_error": last_error or None,
    }


def list_workers(instance_number: int) -> Response:
    """rq-dashboard's workers.json, with `current_request` in place of the job's call string."""
    rows = []
    for worker in Worker.all(connection=_redis()):
        try:
            job = worker.get_current_job()
        except NoSuchJobError:  # it ended and expired between the two reads
            job = None
        rows.append(
            {
                "name": worker.name,
                "pid": worker.pid,
                "queues": [q.name for q in worker.queues],
                "state": str(worker.get_state()),
                "current_job": current_request(job),
                "last_heartbeat": worker.last_heartbeat,
                "birth_date": worker.birth_date,
                "successful_job_count": worker.successful_job_count,
                "failed_job_count": worker.failed_job_count,
                "total_working_time": worker.total_working_time,
                "version": getattr(worker, "version", ""),
                "python_version": getattr(worker, "python_version", ""),
            }
        )
    rows.sort(key=lambda w: (w["state"], w["queues"], w["name"]))
    response = jsonify(workers=rows)
    response.headers["Cache-Control"] = "no-store"
    return response


def add_dashboard(app: Flask, settings: Settings, connection: redis.Redis | None = None) -> None:
    """Mounts rq-dashboard at /rq with the changes the module docstring lists, behind Basic auth.
    `connection` (default: one made from the settings) serves every dashboard request."""
    # rq-dashboard's setup_rq_connection would also open a client with its own URL parser, which refuses
    # Sentinel URLs with IPv6 hosts that settings accept; only its config step is wanted.
    rq_dashboard.web.upgrade_config(app)
    app.config["RQ_DASHBOARD_REDIS_URL"] = (settings.redis_url,)
    app.config["RQ_DASHBOARD_SHOW_FULL_ARGS"] = False  # the full call string holds the request body
    app.register_blueprint(rq_dashboard.blueprint, url_prefix="/rq")
    # rq-dashboard opens a client of its own per request (push_rq_connection), without timeouts and
    # reading the URL its own way; one client made as the API's is (redis_connection.py) serves instead.
    app.redis_conn = connection or redis_connection.connect(settings.redis_url, settings.redis_timeout)  # type: ignore[attr-defined]
    app.before_request_funcs[BLUEPRINT].remove(rq_dashboard.web.push_rq_connection)

    # The app's loader is asked before any blueprint's, so the patched templates win over the shipped ones.
    patched = PatchedTemplates(rq_dashboard.blueprint.jinja_loader, TEMPLATE_PATCHES)
    app.jinja_loader = ChoiceLoader([patched, *([app.jinja_loader] if app.jinja_loader else [])])  # type: ignore[misc]
    for name in TEMPLATE_PATCHES:  # fail at start, not on an operator's page, if a patch no longer applies
        patched.get_source(app.jinja_env, name)

    app.view_functions[f"{BLUEPRINT}.requeue_job_view"] = requeue_one
    app.view_functions[f"{BLUEPRINT}.requeue_all"] = requeue_all
    app.view_functions[f"{BLUEPRINT}.compact_queue"] = compact_queue
    app.view_functions[f"{BLUEPRINT}.list_workers"] = list_workers

    def dashboard_guard() -> Response | None:
        auth = request.authorization
        if auth is None or auth.type != "basic" or not token_accepted(auth.password or "", settings.tokens):
            return _refuse(
                401,
                "the dashboard needs HTTP Basic auth; the password is an API token",
                {"WWW-Authenticate": 'Basic realm="eas-queue dashboard"'},
            )
        view_args = request.view_args or {}
        if view_args.get("instance_number", 0) != 0 or names_nothing(view_args):  # one Redis: instance 0 only
            return _refuse(404, "not found")
        # Browsers resend Basic credentials to any site's forms and images, so an action (requeue, delete,
        # empty) must come from this host's own pages: the dashboard's scripts send Origin or Referer.
        # OPTIONS runs no view (Flask answers it: 204 with Allow), so it is no action either.
        action = request.method not in ("GET", "HEAD") or request.path.startswith("/rq/requeue/")
        if action and request.method != "OPTIONS":
            source = request.headers.get("Origin") or request.headers.get("Referer") or ""
            if urlsplit(source).netloc != request.host:
                return _refuse(403, "dashboard actions must come from its own pages (Origin of this host)")
        return None

    def security_headers(response: Response) -> Response:
        nonce = g.get("csp_nonce") or secrets.token_urlsafe(16)
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY.format(nonce=nonce)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"  # actions are checked by Origin or Referer
        return response

    def csp_nonce() -> dict[str, str]:
        if "csp_nonce" not in g:
            g.csp_nonce = secrets.token_urlsafe(16)
        return {"csp_nonce": g.csp_nonce}

    # First among the dashboard's own hooks, and only on its
    # routes: the API's requests do not pay for it.
    app.before_request_funcs.setdefault(BLUEPRINT, []).insert(0, dashboard_guard)
    app.after_request_funcs.setdefault(BLUEPRINT, []).append(security_headers)
    app.template_context_processors.setdefault(BLUEPRINT, []).append(csp_nonce)
