"""Which completion-webhook URLs may be contacted: the allow-list, and the address rules against SSRF.

A callback URL comes from an API client, so a worker must never be steered by it at Redis, the cloud's
metadata service or anything else on the private side. The rules, applied twice:

- At submit (the API, 400 otherwise): the URL is `http://` or `https://`, without user info, and its
  host and port, exactly as written (names lower-cased, a default port filled in), are an entry of
  `callback_allowed_hosts`. An empty list means callbacks are off. A host written as an address must also
  pass the address rule below.
- At delivery (the worker, after DNS): the name is resolved once, and every address it resolves to must
  pass the address rule; the worker then connects to that checked address (webhooks.py), so a name cannot
  resolve to something else between the check and the connection (DNS rebinding).

The address rule: an address is refused when it is Redis's own (host and port of `redis_url`, always),
and otherwise refused when it is not a global unicast address (loopback 127.0.0.0/8 and ::1, link-local
169.254.0.0/16 with the metadata service, private 10/8, 172.16/12, 192.168/16, fc00::/7, shared
100.64/10, multicast, reserved, unspecified), unless that very address and port is itself an entry of
`callback_allowed_hosts`. So names and addresses are separate entries: allowing `hooks.internal:8080`
lets URLs name that host; if it resolves to a private address, `10.1.2.3:8080` must be listed too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048
DEFAULT_PORTS = {"http": 80, "https": 443}
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class CallbackRefused(ValueError):
    """A callback URL or address that may not be contacted; the message says why."""


def ip(text: str) -> Address | None:
    """`text` as an IP address (IPv4-mapped IPv6 as the IPv4 address it maps), or None for a name."""
    try:
        address = ipaddress.ip_address(text.strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def normal_host(host: str) -> str:
    """A host as entries and URLs are compared: an address in its canonical form, a name in lower case
    without a trailing dot."""
    address = ip(host)
    return str(address) if address is not None else host.lower().rstrip(".")


def entry(host: str, port: int) -> str:
    host = normal_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_entry(text: str) -> str:
    """One `callback_allowed_hosts` entry, `host:port` (an IPv6 address in brackets), normalised;
    ValueError otherwise."""
    if not isinstance(text, str) or "/" in text or "@" in text:
        raise ValueError(f"each entry must be host:port, not {text!r}")
    parts = urlsplit(f"//{text}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or port == 0:
        raise ValueError(f"each entry must be host:port with a port, not {text!r}")
    return entry(parts.hostname, port)


def check_address(address: Address, port: int, allowed: Iterable[str], forbidden: Iterable[tuple[str, int]]) -> None:
    """The address rule (module docstring): CallbackRefused unless `address`:`port` may be contacted."""
    if (str(address), port) in set(forbidden):
        raise CallbackRefused(f"{entry(str(address), port)} is the queue's Redis; it is never contacted")
    if entry(str(address), port) in allowed:
        return
    if not address.is_global or address.is_multicast:
        raise CallbackRefused(
            f"{entry(str(address), port)} is a loopback, link-local, private or reserved address; "
            "list it in callback_allowed_hosts to allow it"
        )


def check_url(url: str, allowed: tuple[str, ...], forbidden: Iterable[tuple[str, int]] = ()) -> tuple[str, int]:
    """The submit-time check (module docstring); returns the URL's host and port, or raises
    CallbackRefused saying why."""
    if not allowed:
        raise CallbackRefused("callbacks are off here (callback_allowed_hosts is empty)")
    if len(url) > MAX_URL_LENGTH or not url.isascii() or not url.isprintable() or " " in url:
        raise CallbackRefused(f"callback URL must be printable ASCII without spaces, at most {MAX_URL_LENGTH} chars")
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.fragment:
        raise CallbackRefused("callback URL must be an http:// or https:// URL with a host and no fragment")
    if parts.username is not None or parts.password is not None:
        raise CallbackRefused("callback URL must not carry user info")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise CallbackRefused("callback URL has a bad port") from None
    if entry(parts.hostname, port) not in allowed:
        raise CallbackRefused(f"callback URL's {entry(parts.hostname, port)} is not in callback_allowed_hosts")
    address = ip(parts.hostname)
    if address is not None:
        check_address(address, port, allowed, forbidden)
    return parts.hostname, port
