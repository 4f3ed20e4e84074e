"""One forwarding attempt on asyncio (QueueWorker): forwarding.send's rules (plain `rq worker`), on aiohttp.

The same URL (forwarding.model_url: every path segment escaped, the raw query byte for byte), the same
headers (the request id, Content-Type and Content-Encoding as queued; no proxy from the environment, no
redirects followed), one deadline from connecting to the answer's last byte (`forward_timeout`, via
asyncio.timeout), the answer capped at `max_result_bytes` after any Content-Encoding is decoded, and the
same classification and error texts (forwarding.judge, unreachable, too_slow).
"""

from __future__ import annotations

import asyncio
import functools

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
    timeout: float,
    max_result_bytes: int = forwarding.DEFAULT_MAX_RESULT_BYTES,
) -> Attempt:
    """POSTs the request to the model once, within `timeout` seconds from connecting to the answer's last
    byte, keeping at most `max_result_bytes` of the answer; never raises (but CancelledError)."""
    headers = {REQUEST_ID_HEADER: request_id}
    if request.content_type:
        headers["Content-Type"] = request.content_type
    if request.content_encoding:
        headers["Content-Encoding"] = request.content_encoding
    url = model_url(base_url, request.service, request.subpath, request.query)
    try:
        async with asyncio.timeout(timeout):
            async with http.post(url, data=request.body, headers=headers, allow_redirects=False) as response:
                content, over = await _read_capped(response, max_result_bytes)
                if over:
                    response.close()  # unread answer left on the connection: never reuse it
                code, content_type = response.status, response.headers.get("Content-Type", "")
    except TimeoutError:
        return forwarding.too_slow(timeout)
    except aiohttp.ClientConnectorError as error:
        return forwarding.unreachable(NewConnectionError(f"Failed to establish a new connection: {error.os_error}"))
    except (aiohttp.ClientError, OSError) as error:
        return forwarding.unreachable(error)
    if len(content) > LARGE_ANSWER:
        return await asyncio.to_thread(forwarding.judge, code, content_type, content, over, max_result_bytes)
    return forwarding.judge(code, content_type, content, over, max_result_bytes)
