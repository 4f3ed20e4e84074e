"""Completion webhooks: the delivery job that POSTs an ended request's JSON sink record to its callback URL.

`deliver` is an RQ job function (path `webhooks.deliver`, pickled into each delivery job) on the queue
`webhooks`, queued by callbacks.py once the request has ended. It runs in its own worker (`rq worker -w
worker.QueueWorker --config worker webhooks`), so a slow receiver never holds a forwarding slot.

- Signed the Standard Webhooks way by the `standardwebhooks` package: `webhook-id` (the delivery job's id,
  the same on every retry, so a receiver can drop repeats), `webhook-timestamp` (this attempt's),
  `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">` with `callback_secret`.
- A connection error, a timeout, 5xx or 429 raises with retries left: RQ's Retry waits the next of
  `callback_retry_intervals`. Anything else (another 4xx, a 3xx: redirects are not followed, an address
  callback_urls.py refuses) ends the delivery at once.
- SSRF: the host is resolved once, every address is checked (callback_urls.check_address), and the
  connection goes to that checked address, with the name in the Host header and TLS SNI, so DNS cannot
  answer differently between the check and the connection.
- Its state (`pending`, `delivered`, `failed`, attempts, last error) is written on the request's own job
  hash (`eas_callback`), only while that hash exists; the request's outcome is never touched.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import redis
import urllib3
from rq.job import Job, get_current_job
from standardwebhooks.webhooks import Webhook
from urllib3.exceptions import HTTPError, NewConnectionError

import callback_urls
import keys
import lifecycle
from callback_urls import CallbackRefused
from settings import Settings, get_settings

DELIVER_FUNCTION = "webhooks.deliver"
USER_AGENT = "eas-queue-webhooks"
ERROR_SNIPPET = 200  # bytes of a receiver's answer kept in last_error


class DeliveryError(Exception):
    """One delivery attempt failed; the message is the `last_error` the sink shows."""


def delivery_id(request_id: str, index: int) -> str:
    """The delivery job's id and `webhook-id`: one per ended request (its sink index), fixed across retries
    and across a dispatch done twice (callbacks.py)."""
    return f"webhook-{request_id}-{index}"


def body_of(record: dict[str, Any]) -> bytes:
    """What is POSTed: the JSON sink record, without the webhook's own delivery state."""
    return json.dumps({k: v for k, v in record.items() if k != "callback"}, separators=(",", ":")).encode()


def signed_headers(secret: str, message_id: str, body: bytes, moment: float | None = None) -> dict[str, str]:
    """Standard Webhooks headers for `body`, signed by the standardwebhooks package."""
    at = datetime.fromtimestamp(int(time.time() if moment is None else moment), tz=UTC)
    signature = Webhook(secret).sign(message_id, at, body.decode())
    return {"webhook-id": message_id, "webhook-timestamp": str(int(at.timestamp())), "webhook-signature": signature}


@cache
def _redis_addresses(endpoints: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
    """Redis's endpoints as addresses (resolved once per process): a webhook never reaches them."""
    found = set()
    for host, port in endpoints:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            infos = []
        found |= {(str(callback_urls.ip(info[4][0])), port) for info in infos}
        found.add((host, port))
    return tuple(sorted(found))


def resolve_checked(settings: Settings, host: str, port: int) -> list[str]:
    """The addresses to connect to: the host resolved once, every address it resolves to allowed
    (callback_urls.check_address); CallbackRefused otherwise, OSError when it does not resolve."""
    forbidden = _redis_addresses(settings.redis_endpoints())
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(callback_urls.ip(info[4][0]) for info in infos))
    for address in addresses:
        try:
            callback_urls.check_address(address, port, settings.callback_allowed_hosts, forbidden)
        except CallbackRefused as refused:
            named = "" if callback_urls.ip(host) else f"{host} resolves to {address}: "
            raise CallbackRefused(f"{named}{refused}") from None
    return [str(address) for address in addresses]


@dataclass(frozen=True)
class Answer:
    status: int
    snippet: str


def post(settings: Settings, url: str, body: bytes, headers: dict[str, str]) -> Answer:
    """One POST, to the first checked address that accepts a connection (resolve_checked), within
    `callback_timeout`, never following a redirect. Raises CallbackRefused, OSError or urllib3's HTTPError."""
    host, port = callback_urls.check_url(url, settings.callback_allowed_hosts)
    addresses = resolve_checked(settings, host, port)
    for address in addresses[:-1]:
        try:
            return _post_to(settings, address, url, body, headers)
        except NewConnectionError:
            continue
    return _post_to(settings, addresses[-1], url, body, headers)


def _post_to(settings: Settings, address: str, url: str, body: bytes, headers: dict[str, str]) -> Answer:
    """The POST to `address`, with the URL's host name in the Host header and as TLS SNI."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or callback_urls.DEFAULT_PORTS[parts.scheme]
    default_port = callback_urls.DEFAULT_PORTS[parts.scheme]
    host_header = (f"[{host}]" if ":" in host else host) + ("" if port == default_port else f":{port}")
    timeout = urllib3.Timeout(total=settings.callback_timeout)
    options: dict[str, Any] = {"timeout": timeout, "retries": False, "maxsize": 1}
    if parts.scheme == "https":
        pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
            address, port, server_hostname=host, assert_hostname=host, **options
        )
    else:
        pool = urllib3.HTTPConnectionPool(address, port, **options)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    all_headers = {"Host": host_header, "Content-Type": "application/json", "User-Agent": USER_AGENT, **headers}
    with pool:
        response = pool.urlopen(
            "POST",
            target,
            body=body,
            headers=all_headers,
            redirect=False,
            preload_content=False,
            assert_same_host=False,
        )
        try:
            snippet = response.read(ERROR_SNIPPET).decode("utf-8", "replace")
        finally:
            response.release_conn()
            response.close()
    return Answer(response.status, " ".join(snippet.split()))


def attempt_number(job: Job) -> int:
    """Which attempt of this delivery job is running: RQ counts retries down in `retries_left`."""
    if job.retries_left is None or not job.retry_intervals:
        return 1
    return len(job.retry_intervals) - job.retries_left + 1


def write_state(connection: redis.Redis, request_id: str, state: dict[str, Any]) -> None:
    """Records the delivery state on the request's job hash, only while it exists (a hash that expired
    meanwhile is not brought back with this one field)."""
    job_key = keys.job_key(request_id)
    with connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(job_key)
                if not pipe.exists(job_key):
                    return
                pipe.multi()
                pipe.hset(job_key, keys.CALLBACK_FIELD, json.dumps(state, separators=(",", ":")))
                pipe.execute()
                return
            except redis.WatchError:
                continue


def _try(settings: Settings, url: str, body: bytes, headers: dict[str, str]) -> tuple[str | None, bool]:
    """One attempt: (None, _) when delivered, else (why, whether it is worth retrying)."""
    try:
        answer = post(settings, url, body, headers)
    except CallbackRefused as refused:
        return f"refused: {refused}", False
    except (OSError, HTTPError) as error:
        return f"could not reach the receiver: {type(error).__name__}: {' '.join(str(error).split())[:200]}", True
    if 200 <= answer.status < 300:
        return None, False
    why = f"the receiver answered HTTP {answer.status}: {answer.snippet}"
    if 300 <= answer.status < 400:
        return f"{why} (redirects are not followed)", False
    return why, answer.status >= 500 or answer.status == 429


def deliver(service: str, request_id: str, index: int, url: str) -> dict[str, Any]:
    """The RQ job function: one delivery attempt of one ended request's webhook. Raises DeliveryError when
    it failed (RQ retries it while it has retries left, for a retryable failure only)."""
    job = get_current_job()
    assert job is not None, "webhooks.deliver runs inside an RQ worker"
    settings, connection = get_settings(), job.connection
    state = lifecycle.read_state(connection, request_id)
    if state is None or state.sink_index != index:
        # Expired, or ended again since (requeued): that newer end has its own delivery.
        job.retries_left = 0
        raise DeliveryError(f"request {request_id} no longer reports sink index {index}; not sent")
    attempt = attempt_number(job)
    secret = settings.callback_secret_for(service)
    if secret:
        body = body_of(state.record())
        error, retryable = _try(settings, url, body, signed_headers(secret, job.id, body))
    else:
        error, retryable = "callbacks are off on this worker (no callback_secret)", False
    if error is None:
        write_state(connection, request_id, {"index": index, "status": "delivered", "attempts": attempt})
        return {"delivered": True, "attempts": attempt}
    if not retryable:
        job.retries_left = 0
    status = "pending" if job.retries_left else "failed"
    write_state(connection, request_id, {"index": index, "status": status, "attempts": attempt, "last_error": error})
    raise DeliveryError(error)
