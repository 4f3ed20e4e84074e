"""Who may call: API tokens, compared in constant time."""

from __future__ import annotations

import hmac

from flask import request

from errors import ApiError
from settings import Settings


def token_accepted(candidate: str, accepted: tuple[str, ...]) -> bool:
    """Constant-time comparison against every accepted token (no early exit)."""
    found = False
    for token in accepted:
        found |= hmac.compare_digest(candidate.encode(), token.encode())
    return found


def check_token(settings: Settings, service: str) -> None:
    """`Authorization: <token>` or `Authorization: Bearer <token>`: 401 without one, 403 if not accepted."""
    header = request.headers.get("Authorization", "").strip()
    if not header:
        raise ApiError(401, "missing Authorization header", {"WWW-Authenticate": "Bearer"})
    scheme, _, rest = header.partition(" ")
    token = rest.strip() if scheme.lower() == "bearer" and rest.strip() else header
    if not token_accepted(token, settings.tokens_for(service)):
        raise ApiError(403, "token not accepted")
