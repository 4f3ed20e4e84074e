"""One forwarding attempt: POST a queued request to the model API and classify what came back.

Kept apart from RQ so the plain `rq worker` job function and the concurrent worker share every rule:
which URL a request may reach, what is retried, and how the model's answer is stored.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import quote, unquote_to_bytes, urlencode

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError, NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

REQUEST_ID_HEADER = "X-Eas-Queueservice-Request-Id"
SUBPATH_SEGMENT = re.compile(r"^[A-Za-z0-9_.~-]{1,128}$")
MAX_SUBPATH_LENGTH = 1024
ERROR_SNIPPET = 200
COMPRESS_ABOVE = 1024  # bytes: a larger answer is kept zlib-compressed (encode_answer)
# Bytes: a QueueWorker encodes a larger answer in a thread, not on the event loop every request in flight
# shares (async_forwarding, async_commit). Encoding 64 KB took ~1.4 ms, 1 MB ~28 ms; a hand-off to a thread
# ~0.15 ms (one-off timings on this project's 2-core machine).
LARGE_ANSWER = 32 * 1024
READ_CHUNK = 65536  # bytes asked of the model's answer at a time
DEFAULT_MAX_RESULT_BYTES = 8 * 1024 * 1024

# What may stand in a URL's query as it is (RFC 3986: pchar, "/" and "?"), and a valid %XX escape.
_QUERY_BYTE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?")
_ESCAPE = re.compile(rb"%[0-9A-Fa-f]{2}")
_SAFE_QUERY = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")
_SAFE_QUERY_BYTES = re.compile(_SAFE_QUERY.pattern.encode())

Query = str | tuple[tuple[str, str], ...]


class ModelRequest(NamedTuple):
    """What is forwarded to the model. A job stores it as worker.forward's arguments, a plain tuple.

    `query` is the raw query string the client sent, less the queue's own `_name_` parameters (jobs
    queued before it was raw hold (key, value) pairs instead; both forward). `content_encoding` came
    later too: jobs without it are 5-tuples."""

    service: str
    subpath: str
    query: Query
    content_type: str | None
    body: bytes
    content_encoding: str | None = None


def is_subpath(subpath: str) -> bool:
    """A subpath is `/`-separated segments of letters, digits, `_ . ~ -`, none of them `.` or `..`.

    So it can only ever add path segments under /api/predict/<service>/: never a host, `..`, `//`,
    a backslash, `@` or an encoded slash (the app sees `%2F` already decoded, as `/`).
    """
    if not subpath:
        return True
    if len(subpath) > MAX_SUBPATH_LENGTH:
        return False
    return all(SUBPATH_SEGMENT.match(s) and s.strip(".") for s in subpath.split("/"))


def _escape_query(raw: bytes) -> str:
    """`raw` with every byte that may not stand in a URL's query (space, `#`, controls, non-ASCII, a `%`
    that starts no escape...) percent-encoded, and every other byte, valid escapes included, as it is."""
    if _SAFE_QUERY_BYTES.fullmatch(raw):
        return raw.decode("ascii")
    out = bytearray()
    for i, byte in enumerate(raw):
        if byte in _QUERY_BYTE or (byte == 0x25 and _ESCAPE.match(raw, i)):
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return out.decode("ascii")


def forwarded_query(raw: bytes) -> str:
    """The query string the model gets: the client's, byte for byte, without the queue's own parameters
    (a key that decodes to `_...`, as the API reads them), and with only bytes a URL allows."""
    if not raw:
        return ""
    kept = []
    for piece in raw.split(b"&"):
        key = piece.split(b"=", 1)[0]
        if not unquote_to_bytes(key.replace(b"+", b" ")).startswith(b"_"):
            kept.append(piece)
    return _escape_query(b"&".join(kept))


def model_url(base_url: str, service: str, subpath: str, query: Query | list) -> str:
    """The model's URL for a request: every path segment percent-encoded and the query made of URL query
    characters only, so neither can change the host or the path."""
    segments = [service, *subpath.split("/")] if subpath else [service]
    url = base_url + "/api/predict/" + "/".join(quote(s, safe="") for s in segments)
    if not query:
        return url
    if isinstance(query, str):  # raw, as queued since raw forwarding
        if not _SAFE_QUERY.fullmatch(query):
            query = _escape_query(query.encode("utf-8", "surrogatepass"))
        return url + "?" + query
    return url + "?" + urlencode(list(query))  # (key, value) pairs, as jobs queued before held them


@dataclass(frozen=True)
class Attempt:
    """The outcome of one attempt: a result (success), or an error that is or is not worth retrying."""

    result: dict[str, Any] | None = None
    error: str | None = None
    retryable: bool = False
    answer_bytes: int = 0  # the size of the model's answer kept in `result` (before it was compressed)
    status_code: int | None = None  # the model's HTTP status code; None: it did not answer


def encode_answer(status_code: int, content_type: str, body: bytes) -> dict[str, Any]:
    """The model's answer as stored. Up to COMPRESS_ABOVE bytes as the sink shows it (readable in the
    dashboard too); a larger one as its exact bytes, zlib-compressed (`body_zlib`, base64): Redis keeps a
    result for `result_ttl`, and long text answers shrink several times over. expand_answer undoes it."""
    if len(body) > COMPRESS_ABOVE:
        packed = base64.b64encode(zlib.compress(body, 6)).decode("ascii")
        stored = {"status": "success", "target_status_code": status_code, "content_type": content_type}
        return {**stored, "body_zlib": packed}
    return _shown_answer(status_code, content_type, body)


def expand_answer(answer: Any) -> Any:
    """A stored answer as the sink shows it: `body` and `body_encoding`, whatever its size."""
    if not isinstance(answer, dict) or "body_zlib" not in answer:
        return answer
    code, content_type, body = decode_answer(answer)
    return _shown_answer(code, content_type, body)


def _shown_answer(status_code: int, content_type: str, body: bytes) -> dict[str, Any]:
    """JSON as JSON, text as text, anything else base64 with a marker."""
    answer: dict[str, Any] = {"status": "success", "target_status_code": status_code, "content_type": content_type}
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        try:  # JSON that any client's parser takes: not nested past Python's limit, no NaN or Infinity
            text = body.decode(json.detect_encoding(body), "surrogatepass")  # as json.loads reads bytes
            answer.update(body=_ANSWER_JSON.decode(text), body_encoding="json")
            return answer
        except (ValueError, RecursionError):
            pass
    if not body or media_type.startswith("text/") or "charset=" in content_type.lower() or not media_type:
        try:
            answer.update(body=body.decode("utf-8"), body_encoding="text")
            return answer
        except UnicodeDecodeError:
            pass
    answer.update(body=base64.b64encode(body).decode("ascii"), body_encoding="base64")
    return answer


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON every parser reads")


# json.loads(body, parse_constant=...) builds a decoder per call: 3.1 us for a small answer, where this
# one decoder, shared, takes 1.4 (timeit; every answer a worker records goes through it).
_ANSWER_JSON = json.JSONDecoder(parse_constant=_refuse_constant)


def decode_answer(answer: dict[str, Any]) -> tuple[int, str, bytes]:
    """The model's status code, content type and body bytes back from what encode_answer stored. A small
    JSON answer is written out again compactly: the same JSON value, whitespace may differ from the model's."""
    body, encoding = answer.get("body"), answer.get("body_encoding")
    if "body_zlib" in answer:
        data = zlib.decompress(base64.b64decode(answer["body_zlib"]))  # exactly the model's bytes
    elif encoding == "json":
        try:
            data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate (`"\ud800"`) has no UTF-8: the same value, escaped
            data = json.dumps(body, separators=(",", ":")).encode()
    elif encoding == "base64":
        data = base64.b64decode(body or "")
    else:
        data = (body or "").encode()
    return int(answer.get("target_status_code", 200)), answer.get("content_type", ""), data


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: " + " ".join(str(error).split())[:ERROR_SNIPPET]


def _snippet(body: bytes) -> str:
    text = body[:ERROR_SNIPPET].decode("utf-8", "replace")
    return " ".join(text.split())  # one line, so it reads well in a log and in error_info


class _Attempt(threading.local):
    """This thread's attempt in progress: its deadline (time.monotonic) and its exact request target."""

    deadline: float | None = None
    target: str | None = None


_attempt = _Attempt()


def _time_left() -> float | None:
    """Seconds left before this thread's attempt must be over; TimeoutError once it is past."""
    deadline = _attempt.deadline
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("forward_timeout reached")
    return left


class _DeadlineSocket:
    """A connected socket whose every send and receive may only take the time left before the attempt's
    deadline. Each read of the status line, the headers and the body is one or more receives, so a model
    that trickles bytes cannot hold an attempt past `forward_timeout`, however it spaces them."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def _limit(self) -> None:
        left = _time_left()
        if left is not None:
            self._sock.settimeout(left)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._limit()
        return self._sock.recv_into(buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._limit()
        return self._sock.recv(bufsize, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._limit()  # sendall's timeout bounds the whole call (Python >= 3.5)
        self._sock.sendall(data, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        self._limit()
        return self._sock.send(data, flags)

    def makefile(self, mode: str = "rb", buffering: int | None = None, **_: Any) -> io.BufferedReader:
        """What http.client reads the answer from: reading through this wrapper, not the bare socket."""
        if mode != "rb":
            raise ValueError("only makefile('rb') is supported")
        raw = socket.SocketIO(self, "rb")  # type: ignore[arg-type]  # it only needs recv_into and refs
        self._sock._io_refs += 1  # type: ignore[attr-defined]  # as socket.makefile counts its files
        return io.BufferedReader(raw, buffering or io.DEFAULT_BUFFER_SIZE)


class _Connection(HTTPConnection):
    """urllib3's connection, with the attempt's deadline on every socket operation, and the request target
    sent as built: urllib3 would upper-case `%ff` to `%FF`, and the model is owed the client's bytes."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        if _attempt.deadline is not None:  # the TLS handshake (HTTPS) gets only what is left too
            sock.settimeout(max(_attempt.deadline - time.monotonic(), 0.001))
        return sock

    def connect(self) -> None:
        super().connect()
        self.sock = _DeadlineSocket(self.sock)  # type: ignore[assignment]

    def putrequest(self, method: str, url: str, *args: Any, **kwargs: Any) -> None:
        exact = _attempt.target
        if exact is not None and exact.lower() == url.lower():  # urllib3 only changed the escapes' case
            url = exact
        super().putrequest(method, url, *args, **kwargs)


class _TlsConnection(_Connection, HTTPSConnection):
    pass


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TlsPool(HTTPSConnectionPool):
    ConnectionCls = _TlsConnection


_pools = threading.local()


def connections() -> urllib3.PoolManager:
    """This thread's connection pool: connections to the model are kept and reused across jobs.

    urllib3 directly, not requests on top of it: a POST costs about 200 us of CPU instead of 520 us
    (requests looks up proxies and ~/.netrc on every call), which is most of a worker's time against a
    fast model. The model is reached directly; HTTP(S)_PROXY does not apply.
    """
    if not hasattr(_pools, "pool"):
        pool = urllib3.PoolManager(retries=False)
        pool.pool_classes_by_scheme = {"http": _Pool, "https": _TlsPool}
        _pools.pool = pool
    return _pools.pool


def _request_target(url: str) -> str | None:
    """The path and query of `url` when urllib3 would rewrite them (it upper-cases escapes), else None."""
    if "%" not in url:
        return None
    return url[url.index("/", url.index("//") + 2) :]


def _read_capped(response: urllib3.BaseHTTPResponse, limit: int) -> tuple[bytes, bool]:
    """The answer's body, read in chunks up to `limit` bytes (after any Content-Encoding is decoded), and
    whether there was more: then only its start is kept (for an error's snippet), the rest is never read,
    and the connection is closed, not reused."""
    length = response.length_remaining
    if length is not None and length > limit and response.status < 400 and not response.headers.get("Content-Encoding"):
        return b"", True  # Content-Length says it at once (an error's start is still read: it says why)
    chunks, size = [], 0
    while chunk := response.read(min(READ_CHUNK, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return chunks[0], True
    return b"".join(chunks), False


def send(
    base_url: str,
    request_id: str,
    request: ModelRequest,
    timeout: float,
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
) -> Attempt:
    """POSTs the request to the model once, within `timeout` seconds from connecting to the answer's last
    byte, keeping at most `max_result_bytes` of the answer. Connection errors, timeouts, 5xx and 429 are
    retryable; an answer too large is not."""
    headers = {REQUEST_ID_HEADER: request_id}
    if request.content_type:
        headers["Content-Type"] = request.content_type
    if request.content_encoding:
        headers["Content-Encoding"] = request.content_encoding
    url = model_url(base_url, request.service, request.subpath, request.query)
    deadline = time.monotonic() + timeout
    _attempt.deadline, _attempt.target = deadline, _request_target(url)
    response = None
    complete = False
    try:
        response = connections().request(
            "POST",
            url,
            body=request.body,
            headers=headers,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            redirect=False,
            preload_content=False,
        )
        content, over = _read_capped(response, max_result_bytes)
        complete = not over
    except NewConnectionError as error:  # (a subclass of urllib3's TimeoutError, so caught first)
        return unreachable(error)
    except (HTTPError, OSError) as error:  # a timeout, or the deadline cutting a send or a read short
        if isinstance(error, (Urllib3Timeout, TimeoutError)) or time.monotonic() >= deadline:
            return too_slow(timeout)
        return unreachable(error)
    finally:
        _attempt.deadline = _attempt.target = None
        if response is not None:
            if not complete:
                response.close()  # unread answer left on the connection: never reuse it
            response.release_conn()
    return judge(response.status, response.headers.get("Content-Type", ""), content, over, max_result_bytes)


def unreachable(error: Exception) -> Attempt:
    """A connection that failed or broke: retryable."""
    return Attempt(error=f"could not reach the model: {_reason(error)}", retryable=True)


def too_slow(timeout: float) -> Attempt:
    """An attempt cut off at `forward_timeout`: retryable."""
    return Attempt(error=f"the model did not answer within {timeout:g}s", retryable=True)


def judge(code: int, content_type: str, content: bytes, over: bool, max_result_bytes: int) -> Attempt:
    """What an answer means, whichever HTTP client read it: 5xx and 429 retryable, other 4xx final, an
    answer over `max_result_bytes` final, anything else the result."""
    if code >= 500 or code == 429:
        return Attempt(error=f"the model answered HTTP {code}: {_snippet(content)}", retryable=True, status_code=code)
    if code >= 400:
        return Attempt(error=f"the model answered HTTP {code}: {_snippet(content)}", status_code=code)
    if over:
        # Final, not retried: the model would most likely send the same answer again, costing the same
        # transfer each time; it needs a smaller answer or a larger max_result_bytes.
        error = f"the model's answer is larger than max_result_bytes ({max_result_bytes} bytes)"
        return Attempt(error=error, status_code=code)
    return Attempt(result=encode_answer(code, content_type, content), answer_bytes=len(content), status_code=code)
