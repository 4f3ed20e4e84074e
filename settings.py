"""Settings shared by the API and the workers.

Read from settings.toml next to this file, then from the TOML file named by EAS_QUEUE_SETTINGS (its keys
are laid over the defaults), then from the environment (EAS_QUEUE_<KEY>, plus bare REDIS_URL and
TARGET_API_BASE_URL). Validated once, so a typo stops a process at start instead of at the first request.
"""

from __future__ import annotations

import base64
import functools
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import callback_urls
from redis_connection import SENTINEL_SCHEME, parse_sentinel_url

DEFAULT_FILE = Path(__file__).with_name("settings.toml")
ENV_PREFIX = "EAS_QUEUE_"
BARE_ENV_KEYS = ("redis_url", "target_api_base_url")


class SettingsError(Exception):
    """A setting that cannot be used; the message starts with the key's name."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


@dataclass(frozen=True)
class Service:
    """Overrides for one named service."""

    target_api_base_url: str | None = None
    tokens: tuple[str, ...] | None = None
    callback_url: str | None = None  # completion webhook for requests that do not name one (webhooks.py)
    callback_secret: str | None = None  # its own signing secret instead of the global one


@dataclass(frozen=True)
class Settings:
    redis_url: str
    redis_timeout: float
    redis_memory_high_water: float
    target_api_base_url: str
    tokens: tuple[str, ...]
    max_body_bytes: int
    max_queue_length: int
    result_ttl: int
    failure_ttl: int
    queue_ttl: float
    forward_timeout: float
    max_result_bytes: int
    retry_intervals: tuple[float, ...]
    worker_concurrency: int
    listed_services_only: bool
    log_format: str = "text"  # "text" or "json": the processes' log lines (logs.py)
    max_waiting_clients: int = 500  # long-polls and streams one API process holds (notifier.py)
    services: dict[str, Service] = field(default_factory=dict)
    # Completion webhooks (webhooks.py, callback_urls.py); empty allowed hosts: callbacks are off.
    callback_allowed_hosts: tuple[str, ...] = ()
    callback_secret: str = ""
    callback_retry_intervals: tuple[float, ...] = (1, 5, 30)
    callback_timeout: float = 10.0

    def callback_secret_for(self, service: str) -> str:
        """The secret that signs `service`'s webhooks: its own if it has one, else the global one."""
        override = self.services.get(service)
        return (override.callback_secret if override else None) or self.callback_secret

    def redis_endpoints(self) -> tuple[tuple[str, int], ...]:
        """Redis's host and port (a Sentinel URL: the sentinels'), which a webhook may never reach."""
        parts = urlsplit(self.redis_url)
        if parts.scheme == SENTINEL_SCHEME:
            sentinels = parse_sentinel_url(self.redis_url).sentinels
            return tuple((callback_urls.normal_host(host), int(port)) for host, port in sentinels)
        if parts.scheme == "unix" or not parts.hostname:
            return ()
        return ((callback_urls.normal_host(parts.hostname), parts.port or 6379),)

    def target_for(self, service: str) -> str:
        """Base URL of the model API that serves `service`."""
        override = self.services.get(service)
        if override and override.target_api_base_url:
            return override.target_api_base_url
        return self.target_api_base_url

    def lookalike_of(self, service: str) -> str | None:
        """The configured service that `service` differs from only by case or trailing dots, if any: such a
        name would reach the same model without that service's own tokens."""
        if service in self.services or not self.services:
            return None
        return self._folded_services.get(_fold(service))

    @functools.cached_property
    def _folded_services(self) -> dict[str, str]:
        """Configured names by their folded form, worked out once (lookalike_of runs on every request)."""
        return {_fold(name): name for name in self.services}

    def tokens_for(self, service: str) -> tuple[str, ...]:
        """Tokens accepted for `service`: its own list if it has one, else the global list."""
        override = self.services.get(service)
        if override and override.tokens:
            return override.tokens
        return self.tokens


def _fold(name: str) -> str:
    return name.rstrip(".").lower()


# --- value checks: each takes the raw value and returns the clean one, or raises ValueError ---


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _redis_url(value: Any) -> str:
    url = _string(value)
    if urlsplit(url).scheme == SENTINEL_SCHEME:
        parse_sentinel_url(url)  # ValueError: one line saying what is wrong
    elif urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"must start with redis://, rediss://, unix:// or {SENTINEL_SCHEME}://")
    return url


def _http_url(value: Any) -> str:
    url = _string(value)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError("must be an http:// or https:// URL with a host and no query")
    return url.rstrip("/")


def _tokens(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("must be a non-empty list of tokens")
    for token in value:
        if not isinstance(token, str) or not token.strip() or token != token.strip() or "," in token:
            raise ValueError("each token must be a non-empty string without spaces at its ends or commas")
    return tuple(value)


def _integer(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"must be a whole number >= {minimum}")
        return value

    return check


def _number(minimum: float, exclusive: bool = False) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError("must be a number")
        if value < minimum or (exclusive and value == minimum):
            raise ValueError(f"must be {'>' if exclusive else '>='} {minimum:g}")
        return float(value)

    return check


def _fraction(value: Any) -> float:
    number = _number(0, exclusive=True)(value)
    if number > 1:
        raise ValueError("must be a fraction: more than 0, at most 1")
    return number


def _intervals(value: Any) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError("must be a list of seconds, e.g. [1, 5, 30]")
    return tuple(_number(0)(v) for v in value)


def _allowed_hosts(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError('must be a list of host:port, e.g. ["hooks.example.com:443"]')
    return tuple(callback_urls.parse_entry(v) for v in value)


def _webhook_secret(value: Any) -> str:
    """Standard Webhooks' form, whsec_<base64 of 24-64 random bytes>; '' for none."""
    if value == "":
        return value
    if not isinstance(value, str) or not value.startswith("whsec_"):
        raise ValueError("must be whsec_<base64>, e.g. whsec_$(head -c 32 /dev/urandom | base64)")
    try:
        size = len(base64.b64decode(value[len("whsec_") :], validate=True))
    except ValueError:
        raise ValueError("must be whsec_<base64>: the part after whsec_ is not base64") from None
    if not 24 <= size <= 64:
        raise ValueError(f"must hold 24 to 64 random bytes, not {size}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _log_format(value: Any) -> str:
    if value not in ("text", "json"):
        raise ValueError('must be "text" or "json"')
    return value


CHECKS: dict[str, Callable[[Any], Any]] = {
    "redis_url": _redis_url,
    "redis_timeout": _number(0, exclusive=True),
    "redis_memory_high_water": _fraction,
    "target_api_base_url": _http_url,
    "tokens": _tokens,
    "max_body_bytes": _integer(1),
    "max_queue_length": _integer(1),
    "result_ttl": _integer(1),
    "failure_ttl": _integer(1),
    "queue_ttl": _number(0),
    "forward_timeout": _number(0, exclusive=True),
    "max_result_bytes": _integer(1),
    "retry_intervals": _intervals,
    "worker_concurrency": _integer(1),
    "log_format": _log_format,
    "max_waiting_clients": _integer(1),
    "listed_services_only": _boolean,
    "callback_allowed_hosts": _allowed_hosts,
    "callback_secret": _webhook_secret,
    "callback_retry_intervals": _intervals,
    "callback_timeout": _number(0, exclusive=True),
}
SERVICE_CHECKS: dict[str, Callable[[Any], Any]] = {
    "target_api_base_url": _http_url,
    "tokens": _tokens,
    "callback_url": _string,  # checked against callback_allowed_hosts once all is read (_check_callbacks)
    "callback_secret": _webhook_secret,
}
LIST_KEYS = {"tokens", "retry_intervals", "callback_allowed_hosts", "callback_retry_intervals"}


def _from_env_text(key: str, text: str) -> Any:
    """Turns an environment variable's text into the type its key expects."""
    text = text.strip()
    if key in LIST_KEYS:
        items = [item.strip() for item in text.split(",") if item.strip()]
        return [_env_number(key, item) for item in items] if key.endswith("retry_intervals") else items
    if key == "log_format":
        return text
    if key == "listed_services_only":
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(key, f"must be true or false, not {text!r}")
    if key in ("redis_url", "target_api_base_url", "callback_secret"):
        return text
    return _env_number(key, text)


def _env_number(key: str, text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise SettingsError(key, f"must be a number, not {text!r}") from None


def _read_toml(path: Path, key: str) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as error:
        raise SettingsError(key, f"cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(key, f"{path} is not valid TOML: {error}") from None


def _services(value: Any) -> dict[str, Service]:
    if not isinstance(value, dict):
        raise SettingsError("services", "must be a table of [services.<name>] tables")
    services = {}
    for name, table in value.items():
        key = f"services.{name}"
        if not is_service_name(name):
            raise SettingsError(key, "a service name is 1-128 letters, digits, '_', '-' or '.'")
        if not isinstance(table, dict):
            raise SettingsError(key, "must be a table")
        clean = {}
        for option, raw in table.items():
            if option not in SERVICE_CHECKS:
                raise SettingsError(f"{key}.{option}", "unknown key")
            try:
                clean[option] = SERVICE_CHECKS[option](raw)
            except ValueError as error:
                raise SettingsError(f"{key}.{option}", str(error)) from None
        services[name] = Service(**clean)
    return services


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Builds the settings from the files and `environ` (default: os.environ); raises SettingsError."""
    environ = os.environ if environ is None else environ
    raw = _read_toml(DEFAULT_FILE, "settings.toml")
    if environ.get("EAS_QUEUE_SETTINGS"):
        raw.update(_read_toml(Path(environ["EAS_QUEUE_SETTINGS"]), "EAS_QUEUE_SETTINGS"))

    for key in raw:
        if key not in CHECKS and key != "services":
            raise SettingsError(key, "unknown key")
    for key in BARE_ENV_KEYS:
        if environ.get(key.upper()):
            raw[key] = environ[key.upper()]
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "EAS_QUEUE_SETTINGS":
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in CHECKS:
            raise SettingsError(name, "unknown setting")
        raw[key] = _from_env_text(key, text)

    clean: dict[str, Any] = {}
    for key, check in CHECKS.items():
        if key not in raw:
            raise SettingsError(key, "missing")
        try:
            clean[key] = check(raw[key])
        except ValueError as error:
            raise SettingsError(key, str(error)) from None
    clean["services"] = _services(raw.get("services", {}))
    settings = Settings(**clean)
    _check_callbacks(settings)
    return settings


def _check_callbacks(settings: Settings) -> None:
    """Callbacks need a secret to sign with, and a service's own callback URL must be one a client could
    give (callback_urls.check_url)."""
    if settings.callback_allowed_hosts and not settings.callback_secret:
        raise SettingsError("callback_secret", "must be set (whsec_<base64>) when callback_allowed_hosts is not empty")
    for name, service in settings.services.items():
        if service.callback_url:
            try:
                callback_urls.check_url(service.callback_url, settings.callback_allowed_hosts)
            except callback_urls.CallbackRefused as error:
                raise SettingsError(f"services.{name}.callback_url", str(error)) from None


SERVICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def is_service_name(name: str) -> bool:
    """1-128 of letters, digits, '_', '-', '.'; not only dots (so it can never be '.' or '..')."""
    return SERVICE_NAME.fullmatch(name) is not None and name.strip(".") != ""


_loaded: Settings | None = None


def get_settings() -> Settings:
    """The process's settings, loaded once; a bad setting ends the process with one line naming it."""
    global _loaded
    if _loaded is None:
        try:
            _loaded = load_settings()
        except SettingsError as error:
            print(f"eas-queue: bad setting {error}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
    return _loaded
