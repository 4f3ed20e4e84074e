"""The processes' log lines: one per submit and one per recorded attempt (its outcome), in text or JSON.

`log_format = "json"` (settings) makes every line a JSON object (python-json-logger), the events' fields
at its top level; `"text"` (the default) writes `time level logger: event key=value ...`. An event line
carries `request_id`, `service`, `priority`, `attempt`, `status` and `duration_seconds` (an outcome also
`model_status` and `attempt_seconds`), never a token, a header or a body: only those named fields are
ever passed, so nothing else can slip in.

Why these are INFO lines on the "eas_queue" logger, formatted only when emitted: the submit line is on the
API's hot path (bench row 1 measures it; see README, Logs), and a worker writes one line per attempt when
its committer records it. (Its attempt and outcome were two lines, which took 18% of a QueueWorker's
loop; configure also drops what each line gathers and no format here shows: ~19 us a line became ~13.)
In JSON mode the handler sits on the root logger, so RQ's own worker lines (and gunicorn's, through
server.py's `logconfig_dict`) are JSON too and a log shipper can parse every line; in text mode RQ and
gunicorn keep their own formats.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from pythonjsonlogger.json import JsonFormatter

LOGGER_NAME = "eas_queue"
EVENT_FIELDS = ("request_id", "service", "priority", "attempt", "status", "duration_seconds")
OUTCOME_FIELDS = ("model_status", "attempt_seconds")  # an outcome's attempt: the model's status code, its seconds
LINE_FIELDS = EVENT_FIELDS + OUTCOME_FIELDS
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
JSON_RENAMES = {"asctime": "time", "levelname": "level", "name": "logger"}

log = logging.getLogger(LOGGER_NAME)


class TextFormatter(logging.Formatter):
    """The standard format, then the event's fields as `key=value` (the JSON formatter needs no such help)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = record.__dict__
        extra = " ".join(f"{name}={fields[name]}" for name in LINE_FIELDS if name in fields)
        return f"{line} {extra}" if extra else line


def json_formatter() -> logging.Formatter:
    """python-json-logger's formatter with short names for the standard fields (gunicorn uses it too)."""
    return JsonFormatter(JSON_FORMAT, rename_fields=JSON_RENAMES, json_ensure_ascii=False)


_configured: str | None = None


def configure(log_format: str) -> None:
    """Sets up this process's lines once: INFO and above of "eas_queue" on stderr, as `log_format` says."""
    global _configured
    if _configured == log_format:
        return
    _configured = log_format
    # What no format here (nor RQ's, nor gunicorn's) shows, and each line would pay for: the caller's frame
    # (the logging HOWTO's "Optimization": logging._srcfile = None), the thread's and the process's names.
    # The process id stays: gunicorn's own format shows it.
    logging._srcfile = None
    logging.logThreads = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name("eas_queue")
    if log_format == "json":
        handler.setFormatter(json_formatter())
        owner, log.propagate = logging.getLogger(), True  # root: RQ's and the libraries' lines too
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
        owner, log.propagate = log, False  # RQ and gunicorn keep their own handlers and formats
    for old in [h for h in (*logging.getLogger().handlers, *log.handlers) if h.get_name() == "eas_queue"]:
        logging.getLogger().removeHandler(old)
        log.removeHandler(old)
    owner.addHandler(handler)
    log.setLevel(logging.INFO)


def event(
    name: str, request_id: str, service: str, priority: str, attempt: int, status: Any, seconds: float, **more: Any
) -> None:
    """One event line (`submit`, `outcome`) with the fields every event carries, and `more` of LINE_FIELDS."""
    if log.isEnabledFor(logging.INFO):
        fields = {"request_id": request_id, "service": service, "priority": priority, "attempt": attempt}
        fields.update(status=status, duration_seconds=round(seconds, 6), **more)
        log.info(name, extra=fields)
