"""One forwarding attempt on asyncio (QueueWorker): forwarding.send's rules (plain `rq worker`), on aiohttp.

The same URL (forwarding.model_url: every path segment escaped, the raw query byte for byte), the same
headers (the request id, Content-Type and Content-Encoding as queued; no proxy from the environment, no
redirects followed), one deadline from connecting to the answer's last byte (`forward_timeout`, kept by
Deadlines), the answer capped at `max_result_bytes` after any Content-Encoding is decoded, and the
same classification and error texts (forwarding.judge, unreachable, too_slow).
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque

import aiohttp
from yarl import URL

import forwarding
from forwarding import LARGE_ANSWER, READ_CHUNK, REQUEST_ID_HEADER, Attempt, ModelRequest

# Headers aiohttp adds by itself and urllib3 does not: the model gets what forwarding.send sends. Without
# a Content-Type aiohttp would claim application/octet-stream; without this Accept-Encoding it would ask
# for gzip.
_SKIPPED_AUTO_HEADERS = ("Content-Type", "Accept-Encoding")


class NewConnectionError(OSError):
    """No connection to the model, named as urllib3 names it: the sink's text does not depend on the
    worker's HTTP client."""


def session(concurrency: int) -> aiohttp.ClientSession:
    """A pool of up to `concurrency` kept-alive connections to the models, made inside the running loop.

    No timeout of aiohttp's own (each attempt carries its deadline); trust_env=False: HTTP(S)_PROXY does
    not apply, as with forwarding.connections()."""
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, ttl_dns_cache=10)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_read=None, sock_connect=None),
        skip_auto_headers=_SKIPPED_AUTO_HEADERS,
        trust_env=False,
        auto_decompress=True,
    )


class Deadlines:
    """Each attempt's deadline, `seconds` after it starts, kept by one timer for all of them. asyncio.timeout
    sets and cancels a timer per attempt: 5.0 us an attempt, against 1.4 us here (16 tasks taking turns on
    one loop, one-off). A worker gives every attempt the same `seconds`, so they fall due in the order they
    start: a deque, whose head the timer waits for (and at least every second, to drop the attempts that
    ended)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._due: deque[Deadline] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> Deadline:
        """The current task's deadline, for a `with` around its attempt (which then raises TimeoutError)."""
        loop = asyncio.get_running_loop()
        deadline = Deadline(asyncio.current_task(), loop.time() + self.seconds)
        self._due.append(deadline)
        if self._timer is None:
            self._timer = loop.call_at(min(deadline.when, loop.time() + 1.0), self._expire, loop)
        return deadline

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        now, due = loop.time(), self._due
        while due and (due[0].task is None or due[0].when <= now):
            due.popleft().expire()
        self._timer = loop.call_at(min(due[0].when, now + 1.0), self._expire, loop) if due else None


class Deadline:
    """One attempt's deadline (Deadlines.start). Past it, the task is cancelled and the `with` around the
    attempt raises TimeoutError, as asyncio.timeout does; a cancellation from elsewhere passes through."""

    __slots__ = ("task", "when", "expired", "cancelling")

    def __init__(self, task: asyncio.Task | None, when: float) -> None:
        self.task, self.when, self.expired = task, when, False
        self.cancelling = task.cancelling() if task else 0

    def expire(self) -> None:
        if self.task is not None:  # still inside its `with`: suspended there, as the loop is running this
            self.expired = True
            self.task.cancel()

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _: object) -> None:
        task, self.task = self.task, None  # ended: never cancelled now, and the task is not kept
        # As asyncio.timeout: take back our cancellation, and turn it into TimeoutError unless another one
        # (a warm shutdown's) was asked for as well.
        if self.expired and task is not None and task.uncancel() <= self.cancelling and kind is asyncio.CancelledError:
            raise TimeoutError from error


def model_url(base_url: str, service: str, subpath: str, query: forwarding.Query | list) -> URL:
    """forwarding.model_url as a yarl URL; built once per URL when the query is raw text, as it is queued
    (requests go to a few URLs, and building one took 1.4 us a request, timeit). encoded=True: yarl sends
    the target exactly as model_url built it (it would re-quote `%ff` as `%FF`)."""
    if isinstance(query, str):
        return _built_url(base_url, service, subpath, query)
    return URL(forwarding.model_url(base_url, service, subpath, query), encoded=True)  # pairs: older jobs


@functools.lru_cache(maxsize=1024)
def _built_url(base_url: str, service: str, subpath: str, query: str) -> URL:
    return URL(forwarding.model_url(base_url, service, subpath, query), encoded=True)


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """As forwarding._read_capped: the body up to `limit` bytes (decoded) and whether there was more."""
    length = response.content_length
    if length is not None and length > limit and response.status < 400 and not response.headers.get("Content-Encoding"):
        return b"", True
    chunks, size = [], 0
    while chunk := await response.content.read(min(READ_CHUNK, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return chunks[0], True
    return b"".join(chunks), False


async def send(
    http: aiohttp.ClientSession,
    base_url: str,
    request_id: str,
    request: ModelRequest,
    deadlines: Deadlines,
    max_result_bytes: int = forwarding.DEFAULT_MAX_RESULT_BYTES,
) -> Attempt:
    """POSTs the request to the model once, within `deadlines.seconds` from connecting to the answer's last
    byte, keeping at most `max_result_bytes` of the answer; never raises (but CancelledError)."""
    headers = {REQUEST_ID_HEADER: request_id}
    if request.content_type:
        headers["Content-Type"] = request.content_type
    if request.content_encoding:
        headers["Content-Encoding"] = request.content_encoding
    url = model_url(base_url, request.service, request.subpath, request.query)
    try:
        with deadlines.start():
            async with http.post(url, data=request.body, headers=headers, allow_redirects=False) as response:
                content, over = await _read_capped(response, max_result_bytes)
                if over:
                    response.close()  # unread answer left on the connection: never reuse it
                code, content_type = response.status, response.headers.get("Content-Type", "")
    except TimeoutError:
        return forwarding.too_slow(deadlines.seconds)
    except aiohttp.ClientConnectorError as error:
        return forwarding.unreachable(NewConnectionError(f"Failed to establish a new connection: {error.os_error}"))
    except (aiohttp.ClientError, OSError) as error:
        return forwarding.unreachable(error)
    if len(content) > LARGE_ANSWER:
        return await asyncio.to_thread(forwarding.judge, code, content_type, content, over, max_result_bytes)
    return forwarding.judge(code, content_type, content, over, max_result_bytes)
