"""The operators' command line: `flask --app eas_queue queue status|requeue-failed|purge|show`.

Each command works on the same Redis, with the same settings, as the API (the app's connection and
settings), and through RQ's own operations where RQ has one: requeue is RQ's (lifecycle.requeue_failed,
which also puts the request back in `eas:open`), purge cancels each waiting request as the API's DELETE
does (lifecycle.cancel, RQ's Job.cancel), show reads a request as the sink does (lifecycle.read_state).

Errors are one line on stderr and a non-zero exit: 2 for a bad argument, 1 for an unknown request or an
unavailable Redis; never a traceback. `status` only reads: it runs no registry cleanup.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import click
import redis
from flask import current_app
from flask.cli import AppGroup
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job

import keys
import lifecycle
import queue_reads
import queueing
import redis_errors
from settings import Settings, is_service_name

SCAN_LIMIT = 10_000  # default: most requests per queue list or failed registry that `status` reads per service


class BadArgument(click.ClickException):
    """A bad argument: one line and exit code 2, like click's usage errors but without the usage text."""

    exit_code = 2


class OneLineErrors(AppGroup):
    """Turns every failure of a subcommand into one line on stderr, never a usage block or a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            raise BadArgument(error.format_message()) from None
        except redis.RedisError as error:
            raise click.ClickException(f"{redis_errors.describe(error)} ({type(error).__name__})") from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:  # a bug: still one line for the operator, naming what went wrong
            raise click.ClickException(f"unexpected {type(error).__name__}: {error}") from None


queue_cli = OneLineErrors("queue", help="Operate the request queues: status, requeue-failed, purge, show.")


def _context() -> tuple[redis.Redis, Settings]:
    ctx = current_app.extensions["eas_queue"]
    return ctx.connection, ctx.settings


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _decoded(ids: list[bytes]) -> list[str]:
    return [i.decode() for i in ids]


# -- status -------------------------------------------------------------------------------------------


@dataclass
class QueueCounts:
    """One queue's requests by where they are in RQ's data model."""

    waiting: int = 0
    started: int = 0
    scheduled: int = 0
    failed: int = 0
    finished: int = 0
    canceled: int = 0
    oldest_waiting_seconds: float | None = None


@dataclass
class ServiceCounts:
    waiting: int = 0
    failed: int = 0


@dataclass
class Status:
    queues: dict[str, QueueCounts]
    services: dict[str, ServiceCounts]
    scan_limit: int
    complete: bool  # False: a queue or failed registry held more than scan_limit, so service counts are partial
    unattributed: ServiceCounts = field(default_factory=ServiceCounts)  # jobs without `eas_service`


def _queue_counts(connection: redis.Redis, snapshot: queue_reads.QueueSnapshot) -> dict[str, QueueCounts]:
    """The snapshot's counts, and the registries it leaves out, by ZCOUNT in one round trip. Failed,
    finished and canceled entries are scored by their expiry: those already past it (which RQ's cleanup
    would drop) are not counted."""
    live = f"({snapshot.clock}"
    with connection.pipeline(transaction=False) as pipe:
        for name in snapshot.queues:
            q = keys.queue_keys(name)
            pipe.zcount(q.failed, live, "+inf").zcount(q.finished, live, "+inf").zcount(q.canceled, live, "+inf")
        replies = pipe.execute()
    counts = {}
    for index, (name, depth) in enumerate(snapshot.queues.items()):
        failed, finished, canceled = replies[index * 3 : index * 3 + 3]
        counts[name] = QueueCounts(
            depth.waiting, depth.started, depth.scheduled, failed, finished, canceled, depth.oldest_waiting_seconds
        )
    return counts


def _service_counts(
    connection: redis.Redis, clock: float, limit: int
) -> tuple[dict[str, ServiceCounts], bool, ServiceCounts]:
    """Waiting and failed per service, from `eas_service` of at most `limit` requests per queue list and per
    failed registry: O(limit) reads whatever the backlog (there is no per-service index)."""
    waiting: list[str] = []
    failed: list[str] = []
    complete = True
    for name in keys.QUEUE_NAMES:
        q = keys.queue_keys(name)
        queued = _decoded(connection.lrange(q.queue, 0, limit))
        failures = _decoded(connection.zrangebyscore(q.failed, f"({clock}", "+inf", 0, limit + 1))
        complete = complete and len(queued) <= limit and len(failures) <= limit
        waiting += queued[:limit]
        failed += failures[:limit]
    services: dict[str, ServiceCounts] = {}
    unattributed = ServiceCounts()
    for ids, kind in ((waiting, "waiting"), (failed, "failed")):
        for (service,) in queue_reads.job_fields(connection, ids, keys.SERVICE_FIELD):
            counts = services.setdefault(service, ServiceCounts()) if service else unattributed
            setattr(counts, kind, getattr(counts, kind) + 1)
    return dict(sorted(services.items())), complete, unattributed


def read_status(connection: redis.Redis, scan_limit: int) -> Status:
    """What `status` reports; reads only."""
    snapshot = queue_reads.read_snapshot(connection)
    queues = _queue_counts(connection, snapshot)
    services, complete, unattributed = _service_counts(connection, snapshot.clock, scan_limit)
    return Status(queues, services, scan_limit, complete, unattributed)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = math.floor(seconds)
    if whole < 60:
        return f"{seconds:.1f}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _status_text(status: Status) -> str:
    lines = [f"{'queue':<10}{'waiting':>9}{'started':>9}{'retrying':>10}{'failed':>8}{'finished':>10}"]
    lines[0] += f"{'canceled':>10}  oldest waiting"
    for name, c in status.queues.items():
        row = f"{name:<10}{c.waiting:>9}{c.started:>9}{c.scheduled:>10}{c.failed:>8}{c.finished:>10}{c.canceled:>10}"
        lines.append(f"{row}  {_age(c.oldest_waiting_seconds)}")
    lines += ["", f"{'service':<30}{'waiting':>9}{'failed':>8}"]
    rows = list(status.services.items())
    if status.unattributed.waiting or status.unattributed.failed:
        rows.append(("(no eas_service)", status.unattributed))
    lines += [f"{name:<30}{c.waiting:>9}{c.failed:>8}" for name, c in rows] or ["(none)"]
    if not status.complete:
        lines.append(f"service counts are partial: read the first {status.scan_limit} of each queue and registry")
    return "\n".join(lines)


@queue_cli.command("status", short_help="Counts per queue and per service.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option(
    "--scan-limit",
    type=click.IntRange(min=1),
    default=SCAN_LIMIT,
    show_default=True,
    help="Most requests read per queue and per failed registry for the per-service counts.",
)
def status_command(as_json: bool, scan_limit: int) -> None:
    """Per queue: waiting, started, retrying, failed, finished, canceled, oldest waiting; per service:
    waiting and failed."""
    connection, _ = _context()
    status = read_status(connection, scan_limit)
    click.echo(json.dumps(asdict(status), indent=2) if as_json else _status_text(status))


# -- requeue-failed -----------------------------------------------------------------------------------


def _check_service(service: str | None) -> str | None:
    if service is not None and not is_service_name(service):
        raise BadArgument(f"not a service name: {service!r} (1-128 letters, digits, '_', '-', '.')")
    return service


def failed_requests(
    connection: redis.Redis, queue_names: tuple[str, ...], service: str | None
) -> tuple[list[tuple[str, str]], int]:
    """(queue, id) of each failed request of `service` (None: any), and how many of them ended EXPIRED
    instead (plain `rq worker` records those as failed): requeued, they would only expire again."""
    found: list[tuple[str, str]] = []
    expired = 0
    for name in queue_names:
        ids = _decoded(connection.zrange(keys.queue_keys(name).failed, 0, -1))
        for request_id, (owner, outcome) in zip(
            ids, queue_reads.job_fields(connection, ids, keys.SERVICE_FIELD, keys.OUTCOME_FIELD), strict=True
        ):
            if service is not None and owner != service:
                continue
            if outcome == "expired":
                expired += 1
            else:
                found.append((name, request_id))
    return found, expired


def requeue(connection: redis.Redis, request_id: str) -> bool:
    """RQ's requeue of one failed request, back in `eas:open`; False if it is no longer failed or gone."""
    try:
        lifecycle.requeue_failed(connection, Job.fetch(request_id, connection=connection))
    except (InvalidJobOperation, NoSuchJobError):
        return False
    return True


def _which(service: str | None, queue_names: tuple[str, ...]) -> str:
    owner = f"of service {service}" if service else "of every service"
    return f"{owner} on {' and '.join(queue_names)}"


@queue_cli.command("requeue-failed", short_help="Requeue failed requests.")
@click.option("--service", help="Only this service's requests (default: every service's).")
@click.option("--queue", "queue_name", type=click.Choice(keys.QUEUE_NAMES), help="Only this queue (default: both).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def requeue_failed_command(service: str | None, queue_name: str | None, yes: bool) -> None:
    """Requeue failed requests (RQ's FailedJobRegistry.requeue): each gets one more attempt."""
    connection, _ = _context()
    _check_service(service)
    queue_names = (queue_name,) if queue_name else keys.QUEUE_NAMES
    found, expired = failed_requests(connection, queue_names, service)
    skipped = f" ({expired} EXPIRED not requeued: they would expire again)" if expired else ""
    if not found:
        click.echo(f"no failed requests {_which(service, queue_names)}{skipped}")
        return
    if not yes:
        click.confirm(f"Requeue {_count(len(found), 'failed request')} {_which(service, queue_names)}?", abort=True)
    done = sum(requeue(connection, request_id) for _, request_id in found)
    gone = f"; {len(found) - done} were no longer failed" if done < len(found) else ""
    click.echo(f"requeued {_count(done, 'failed request')} {_which(service, queue_names)}{gone}{skipped}")


# -- purge --------------------------------------------------------------------------------------------


def waiting_ids(connection: redis.Redis, queue_name: str) -> list[str]:
    """The ids waiting in a queue now, head first, read in chunks."""
    key = keys.queue_keys(queue_name).queue
    ids: list[str] = []
    for start in range(0, connection.llen(key), queue_reads.CHUNK):
        ids += _decoded(connection.lrange(key, start, start + queue_reads.CHUNK - 1))
    return list(dict.fromkeys(ids))


def cancel_all(connection: redis.Redis, ids: list[str], ttl: int) -> Counter[str]:
    """Cancels each as the API's DELETE does (lifecycle.cancel), head first (so each LREM finds its id at
    once); counts the outcomes: one a worker took meanwhile is `running` or `ended`, not canceled."""
    return Counter(lifecycle.cancel(connection, request_id, ttl) for request_id in ids)


@queue_cli.command("purge", short_help="Cancel every request waiting in a queue.")
@click.argument("queue_name", metavar="QUEUE", type=click.Choice(keys.QUEUE_NAMES))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge_command(queue_name: str, yes: bool) -> None:
    """Empty a queue: every request waiting in it ends CANCELED (the sink says so), none is deleted."""
    connection, settings = _context()
    ids = waiting_ids(connection, queue_name)
    if not ids:
        click.echo(f"queue {queue_name} is empty")
        return
    if not yes:
        click.confirm(f"Cancel {_count(len(ids), 'request')} waiting in queue {queue_name}?", abort=True)
    outcomes = cancel_all(connection, ids, settings.result_ttl)
    taken = len(ids) - outcomes["canceled"]
    meanwhile = f"; {taken} had been taken by a worker or ended meanwhile" if taken else ""
    click.echo(f"canceled {_count(outcomes['canceled'], 'request')} waiting in queue {queue_name}{meanwhile}")


# -- show ---------------------------------------------------------------------------------------------


def registries_of(connection: redis.Redis, request_id: str, queue_name: str) -> tuple[list[str], int | None]:
    """Where RQ holds the request (queue list and registries of its queue), and its place in the queue
    (0: next). None of them is where the crash sweep looks for lost requests."""
    q = keys.queue_keys(queue_name)
    scored = {"scheduled": q.scheduled, "finished": q.finished, "failed": q.failed, "canceled": q.canceled}
    with connection.pipeline(transaction=False) as pipe:
        pipe.lpos(q.queue, request_id)
        for key in scored.values():
            pipe.zscore(key, request_id)
        pipe.zrange(keys.EXECUTIONS_REGISTRY_PREFIX + request_id, 0, -1)
        position, *scores, executions = pipe.execute()
    with connection.pipeline(transaction=False) as pipe:
        for execution_id in _decoded(executions):
            pipe.zscore(q.started, f"{request_id}:{execution_id}")  # RQ's composite StartedJobRegistry entry
        started = any(score is not None for score in pipe.execute())
    found = ["queue"] if position is not None else []
    found += ["started"] if started else []
    found += [name for name, score in zip(scored, scores, strict=True) if score is not None]
    return found, position


def show_request(connection: redis.Redis, request_id: str) -> dict[str, Any] | None:
    """The sink's record of a request plus where it is in RQ; None if unknown (or its record expired)."""
    state = lifecycle.read_state(connection, request_id)
    if state is None:
        return None
    origin, rq_status = (
        v.decode() if v else None for v in connection.hmget(keys.job_key(request_id), "origin", "status")
    )
    found, position = registries_of(connection, request_id, origin) if origin in keys.QUEUE_NAMES else ([], None)
    return {
        "request": state.record(),
        "queue": origin,
        "rq_status": rq_status,
        "registries": found,
        "position": position,
    }


@queue_cli.command("show", short_help="One request, as JSON.")
@click.argument("request_id")
def show_command(request_id: str) -> None:
    """One request as the sink reports it, with its queue, RQ status and registries, as JSON."""
    if not queueing.is_request_id(request_id):
        raise BadArgument(f"not a request id: {request_id!r} (request ids are lowercase UUIDs)")
    connection, _ = _context()
    shown = show_request(connection, request_id)
    if shown is None:
        raise click.ClickException(f"unknown request id {request_id} (never accepted, or its record expired)")
    click.echo(json.dumps(shown, indent=2))
