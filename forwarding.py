"""One forwarding attempt: POST a queued request to the model API and classify what came back.

Kept apart from RQ so the plain `rq worker` job function and the concurrent worker share every rule:
which URL a request may reach, what is retried, and how the model's answer is stored.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import quote, urlencode

import urllib3
from urllib3.exceptions import HTTPError, NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

REQUEST_ID_HEADER = "X-Eas-Queueservice-Request-Id"
SUBPATH_SEGMENT = re.compile(r"^[A-Za-z0-9_.~-]{1,128}$")
MAX_SUBPATH_LENGTH = 1024
ERROR_SNIPPET = 200


class ModelRequest(NamedTuple):
    """What is forwarded to the model. A job stores it as worker.forward's arguments, a plain tuple."""

    service: str
    subpath: str
    query: tuple[tuple[str, str], ...]
    content_type: str | None
    body: bytes


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


def model_url(base_url: str, service: str, subpath: str, query: tuple[tuple[str, str], ...] | list) -> str:
    """The model's URL for a request: every path segment percent-encoded, so none can change the host."""
    segments = [service, *subpath.split("/")] if subpath else [service]
    url = base_url + "/api/predict/" + "/".join(quote(s, safe="") for s in segments)
    return url + "?" + urlencode(list(query)) if query else url


@dataclass(frozen=True)
class Attempt:
    """The outcome of one attempt: a result (success), or an error that is or is not worth retrying."""

    result: dict[str, Any] | None = None
    error: str | None = None
    retryable: bool = False


def encode_answer(status_code: int, content_type: str, body: bytes) -> dict[str, Any]:
    """The model's answer as stored: JSON as JSON, text as text, anything else base64 with a marker."""
    answer: dict[str, Any] = {"status": "success", "target_status_code": status_code, "content_type": content_type}
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        try:
            answer.update(body=json.loads(body), body_encoding="json")
            return answer
        except ValueError:
            pass
    if not body or media_type.startswith("text/") or "charset=" in content_type.lower() or not media_type:
        try:
            answer.update(body=body.decode("utf-8"), body_encoding="text")
            return answer
        except UnicodeDecodeError:
            pass
    answer.update(body=base64.b64encode(body).decode("ascii"), body_encoding="base64")
    return answer


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: " + " ".join(str(error).split())[:ERROR_SNIPPET]


def _snippet(body: bytes) -> str:
    text = body[:ERROR_SNIPPET].decode("utf-8", "replace")
    return " ".join(text.split())  # one line, so it reads well in a log and in error_info


_pools = threading.local()


def connections() -> urllib3.PoolManager:
    """This thread's connection pool: connections to the model are kept and reused across jobs.

    urllib3 directly, not requests on top of it: a POST costs about 200 us of CPU instead of 520 us
    (requests looks up proxies and ~/.netrc on every call), which is most of a worker's time against a
    fast model. The model is reached directly; HTTP(S)_PROXY does not apply.
    """
    if not hasattr(_pools, "pool"):
        _pools.pool = urllib3.PoolManager(retries=False)
    return _pools.pool


def send(base_url: str, request_id: str, request: ModelRequest, timeout: float) -> Attempt:
    """POSTs the request to the model once. Connection errors, timeouts, 5xx and 429 are retryable."""
    headers = {REQUEST_ID_HEADER: request_id}
    if request.content_type:
        headers["Content-Type"] = request.content_type
    url = model_url(base_url, request.service, request.subpath, request.query)
    try:
        response = connections().request(
            "POST",
            url,
            body=request.body,
            headers=headers,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            redirect=False,
        )
    except NewConnectionError as error:  # (a subclass of urllib3's TimeoutError, so caught first)
        return Attempt(error=f"could not reach the model: {_reason(error)}", retryable=True)
    except Urllib3Timeout:
        return Attempt(error=f"the model did not answer within {timeout:g}s", retryable=True)
    except HTTPError as error:
        return Attempt(error=f"could not reach the model: {_reason(error)}", retryable=True)
    code, content = response.status, response.data
    if code >= 500 or code == 429:
        return Attempt(error=f"the model answered HTTP {code}: {_snippet(content)}", retryable=True)
    if code >= 400:
        return Attempt(error=f"the model answered HTTP {code}: {_snippet(content)}", retryable=False)
    return Attempt(result=encode_answer(code, response.headers.get("Content-Type", ""), content))
