"""Webhooks, the pure part: which URLs may be called, when a failed delivery is tried again,
and what a delivery carries (pure: no I/O; resolving and sending are in
`fategen.queue.webhooks`)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

import attrs

#: Seconds after the event of each attempt, as Svix does: at once, 5 s, 5 min, 30 min, 2 h,
#: 5 h, 10 h, 10 h (offsets from the previous attempt).
RETRY_SCHEDULE: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
#: An attempt must be answered (2xx) within this many seconds to count.
ATTEMPT_TIMEOUT = 15.0
#: The longest webhook URL taken.
MAX_URL = 2000
#: Events a job's webhook may get: its end (always), and optionally its start.
FINAL_EVENTS = ("job.completed", "job.failed", "job.cancelled")


@attrs.frozen
class DeliveryState:
    """One webhook delivery of one job event, as the job shows it."""

    id: str
    job_id: str
    event: str
    url: str
    state: str  # pending, delivered, failed
    attempts: int
    next_at: float | None
    last_status: int | None = None
    last_error: str | None = None
    delivered: float | None = None


def next_attempt(attempts: int, now: float) -> float | None:
    """When to try again after ``attempts`` failed attempts (None: give up)."""
    if attempts >= len(RETRY_SCHEDULE):
        return None
    return now + RETRY_SCHEDULE[attempts]


def url_refusal(url: str, *, what: str = "the webhook URL") -> str | None:
    """Why ``url`` cannot be a webhook URL (one sentence), before any look-up; None if it
    may be. ``what`` names the URL in the sentence (``"the image URL"``)."""
    if len(url) > MAX_URL:
        return f"{what} is longer than {MAX_URL} characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return f"{what} is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return f"{what} must start with http:// or https://"
    if not parts.hostname:
        return f"{what} has no host"
    if parts.username is not None or parts.password is not None:
        return f"{what} must not hold a user name or password"
    if port == 0:
        return f"{what}'s port must be from 1 to 65535"
    return None


#: IPv6 prefixes that carry an IPv4 address a gateway turns them into: NAT64's well-known
#: prefix (RFC 6052) and 6to4 (RFC 3056). Such an address is judged by its IPv4 address.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_6TO4 = ipaddress.IPv6Network("2002::/16")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped, IPv4-compatible, NAT64 or 6to4 address."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    packed = int(address)
    if address in _NAT64 or (packed >> 32 == 0 and packed > 1):  # NAT64, ::a.b.c.d
        return ipaddress.IPv4Address(packed & 0xFFFFFFFF)
    return None


def address_refusal(
    host: str,
    addresses: Iterable[str],
    *,
    what: str = "webhook host",
    action: str = "call",
    allowed: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
) -> str | None:
    """Why a webhook to ``host``, which resolves to ``addresses``, is refused: any loopback,
    private, link-local, multicast, reserved or unspecified address (a bot must not make
    fategen call into the operator's network). None if every address is public.

    ``what`` and ``action`` word the sentence for another use ("the image host ... which
    fategen does not fetch from"); an address inside one of the ``allowed`` networks is
    taken even if private (an operator's internal CDN)."""
    found = False
    for text in addresses:
        found = True
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address):
            address = _embedded_ipv4(address) or address
        if any(address in network for network in allowed):
            continue
        if (
            address.is_loopback
            or address.is_private
            or address.is_link_local
            or address.is_multicast
            or address.is_reserved
            or address.is_unspecified
            or not address.is_global
        ):
            return (
                f"the {what} {host!r} resolves to {address}, a loopback, private or "
                f"link-local address, which fategen does not {action}"
            )
    if not found:
        return f"the {what} {host!r} does not resolve"
    return None
