"""The query parameters of the sink and the EAS calls, each kind read by one rule wherever it is taken: the
JSON sink and cancel (api.py), the EAS SDK's calls (eas_sink.py) and event streams (events.py). A parameter
the call does not take, one given twice, or a value that is not exactly what the rule allows is a 400
naming it: never ignored, never read in part (`1e3` as 1, `²` as a digit)."""

from __future__ import annotations

import re
from collections.abc import Collection

from flask import request

import queueing
from errors import ApiError

MAX_WAIT = 60.0  # seconds a client may wait for a request to end (_timeout_)
TRUE_WORDS, FALSE_WORDS = ("true", "1"), ("false", "0")  # any case: the EAS SDKs write true/false
# A sink index or a count: ASCII digits only (str.isdigit() takes '²', which int() refuses, and int() takes
# '١٢'), and at most 18 of them, so that an index stays below 2**63 and Redis never sees an invalid stream id.
WHOLE_NUMBER = re.compile(r"[0-9]{1,18}")
_DURATION = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,9})?)(ms|s|m)?")  # ASCII digits: "١٢" is not a number here


def only(allowed: Collection[str], where: str) -> None:
    """400 for the first parameter that `where` does not take, so that a typo is not silently ignored. A
    name without underscores is a tag: EAS's get filters by tags, this queue does not."""
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        name = unknown[0]
        what = "filtering by tags is not supported" if not name.startswith("_") else "unknown parameter"
        raise ApiError(400, f"{what}: {name!r} ({where} takes {', '.join(sorted(allowed))})")


def single(name: str) -> str | None:
    """The parameter's value, None when absent; given twice, a 400 (answering either would be a guess)."""
    values = request.args.getlist(name)
    if len(values) > 1:
        raise ApiError(400, f"{name} given more than once")
    return values[0] if values else None


def flag(name: str, default: bool = False) -> bool:
    """A true/false parameter: `true`/`1` or `false`/`0`, in any case (absent: `default`)."""
    text = single(name)
    if text is None:
        return default
    if text.lower() not in TRUE_WORDS + FALSE_WORDS:
        raise ApiError(400, f"{name} must be true or false")
    return text.lower() in TRUE_WORDS


def whole_number(name: str, default: int, minimum: int, maximum: int | None = None) -> int:
    """A sink index or a count (WHOLE_NUMBER) from `minimum` to `maximum` (None: no bound)."""
    text = single(name)
    if text is None:
        return default
    value = int(text) if WHOLE_NUMBER.fullmatch(text) else -1
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f"{minimum} or more"
        raise ApiError(400, f"{name} must be a whole number {bounds} (ASCII digits, at most 18)")
    return value


def indexes() -> list[int]:
    """`_indexes_`: sink indexes separated by commas."""
    parts = [p.strip() for p in (single("_indexes_") or "").split(",")]
    if not all(WHOLE_NUMBER.fullmatch(p) for p in parts):
        raise ApiError(400, "_indexes_ must be sink indexes (ASCII digits, at most 18) separated by commas, e.g. 3,4")
    return [int(p) for p in parts]


def priority() -> bool | None:
    """`_priority_`: 1 (the `high` queue) or 0 (`default`); None when absent."""
    text = single("_priority_")
    if text not in (None, "0", "1"):
        raise ApiError(400, "_priority_ must be 0 or 1")
    return None if text is None else text == "1"


def request_id() -> str | None:
    """`request_id` (or the EAS SDKs' `requestId`; both with the same value is fine): a lowercase UUID;
    None when absent. Two different ids are a 400: answering (or canceling) either would be a guess."""
    snake, camel = single("request_id"), single("requestId")
    if snake is not None and camel is not None and snake != camel:
        raise ApiError(400, "request_id and requestId name different requests: give one of them")
    found = snake or camel
    if found is not None and not queueing.is_request_id(found):
        raise ApiError(400, "request_id is not a request id (a lowercase UUID)")
    return found


def wait() -> float:
    """`_timeout_`: seconds, or an EAS duration (`5s`, `500ms`, `1m`), at most MAX_WAIT; 0 when absent."""
    text = single("_timeout_")
    if text is None:
        return 0.0
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ApiError(400, "_timeout_ must be seconds or a duration such as 5s or 500ms")
    seconds = float(match[1]) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[match[2]]
    if seconds > MAX_WAIT:
        raise ApiError(400, f"_timeout_ may be at most {MAX_WAIT:g}s")
    return seconds
