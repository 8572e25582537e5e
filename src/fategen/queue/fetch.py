"""Fetching an input image (``--image URL``, usually a Discord attachment), SSRF-safe.

A chat user names the URL, so every hop is checked before fategen connects: http or https
only, no user name or password, and a host that resolves to public addresses only (unless the
operator allows private ones, or names networks of their own, such as an internal CDN). The
connection goes to the very address that was checked (no second DNS look-up that a rebinding
name server could answer differently): the request is sent to the IP, with the real ``Host``
header and, for https, the real name for TLS (SNI and certificate check). Redirects are
followed here, each hop checked like the first.

Every refusal is an `InputImageError` whose text is one line that names the host, never the
whole URL (Discord's URLs carry signed query strings).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable

import attrs
import httpx
import trio

from fategen.core.webhooks import address_refusal, url_refusal
from fategen.errors import InputImageError

#: Redirect answers followed (with a ``Location``).
REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: The longest transport error text put in a sentence.
_MAX_REASON = 200
#: Headers of the caller's client never sent to a host a user named.
_PRIVATE_HEADERS = ("authorization", "cookie")

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> addresses``: how a host name becomes the addresses fategen may connect to
(tests answer made-up names)."""


@attrs.frozen
class FetchLimits:
    """How far `fetch_image` goes for one image."""

    #: The largest body taken.
    max_bytes: int = 20 * 2**20
    #: Seconds for the whole fetch: every hop's resolution, connection, headers and body.
    timeout: float = 20.0
    max_redirects: int = 5
    #: Skip the address check altogether (tests and trusted setups).
    allow_private: bool = False
    #: Networks fetched from even though private (an operator's internal CDN).
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses of ``host`` for a TCP connection (`trio.socket.getaddrinfo`), in the
    order the system prefers them."""
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@attrs.frozen
class _Hop:
    """One URL of the chain, checked: where to connect, and under which name."""

    url: httpx.URL
    host: str  # IDNA-encoded, as sent in Host and SNI
    addresses: tuple[str, ...]


@attrs.define
class _Progress:
    """The host being fetched from now, for the time-out sentence."""

    host: str


async def fetch_image(
    url: str,
    limits: FetchLimits,
    *,
    http: httpx.AsyncClient,
    resolve: Resolver | None = None,
) -> bytes:
    """The body of the image at ``url``, fetched SSRF-safe, following at most
    ``limits.max_redirects`` redirects (each hop checked again).

    It holds nothing of other jobs (O(1) in the jobs held) and is bounded in time (everything
    within ``limits.timeout``) and in memory (``limits.max_bytes`` plus one network read).

    ``http`` should be a client of fategen's own for this, speaking HTTP/1.1 (httpx's
    default): its redirects are not used (they are followed here) and its ``Authorization``
    and ``Cookie`` headers are not sent, but it keeps any cookies an image host sets. Each
    request asks the server to close the connection, so no connection opened for one host
    name is reused for another that resolved to the same address (its TLS check was made
    for the first name); an HTTP/2 client would share connections that way.

    Raises:
        InputImageError: every refusal (a bad or private URL, a host that does not resolve or
            cannot be reached, too many redirects, an answer other than 200, a body that is
            empty, compressed or larger than ``limits.max_bytes``, or no image within
            ``limits.timeout``), as one sentence.
    """
    progress = _Progress(_host_of(url))
    try:
        with trio.fail_after(limits.timeout):
            return await _follow(url, limits, http, resolve or resolve_host, progress)
    except trio.TooSlowError:
        raise InputImageError(
            f"the image at {progress.host} did not arrive within {limits.timeout:g} s"
        ) from None
    except httpx.HTTPError as exc:
        raise InputImageError(
            f"cannot fetch the image from {progress.host}: {_reason(exc)}"
        ) from None


async def _follow(
    url: str,
    limits: FetchLimits,
    http: httpx.AsyncClient,
    resolve: Resolver,
    progress: _Progress,
) -> bytes:
    for redirects in range(limits.max_redirects + 1):
        what = "the image URL" if redirects == 0 else "the image URL's redirect"
        progress.host = _host_of(url)
        hop = await _check(url, what, limits, resolve)
        answer = await _get(hop, limits, http)
        if isinstance(answer, bytes):
            return answer
        try:
            url = str(hop.url.join(answer))
        except httpx.InvalidURL:
            raise InputImageError("the image URL redirects to an invalid URL") from None
    raise InputImageError(f"the image URL redirects more than {limits.max_redirects} times")


async def _check(url: str, what: str, limits: FetchLimits, resolve: Resolver) -> _Hop:
    """The hop to ``url`` once its scheme, host and addresses pass, or the refusal."""
    refusal = url_refusal(url, what=what)
    if refusal is not None:
        raise InputImageError(refusal)
    try:
        parsed = httpx.URL(url).copy_with(fragment=None)
        host = parsed.raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError):
        raise InputImageError(f"{what} is not a valid URL") from None
    # httpx's parse is the one that connects: it must agree with the check above.
    if parsed.scheme not in ("http", "https") or not host:
        raise InputImageError(f"{what} is not a valid URL")
    if parsed.userinfo:
        raise InputImageError(f"{what} must not hold a user name or password")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        addresses = tuple(dict.fromkeys(await resolve(host, port)))
    except (OSError, UnicodeError):
        addresses = ()
    if limits.allow_private and addresses:
        refusal = None
    else:
        refusal = address_refusal(
            host,
            addresses,
            what="image host",
            action="fetch from",
            allowed=limits.allowed_networks,
        )
    if refusal is not None:
        raise InputImageError(refusal)
    return _Hop(parsed, host, addresses)


async def _get(hop: _Hop, limits: FetchLimits, http: httpx.AsyncClient) -> bytes | str:
    """The image's bytes, or a redirect's ``Location``: from the first of the hop's addresses
    that takes a connection."""
    headers = {
        "Host": hop.url.netloc.decode("ascii"),
        "Accept": "image/*",
        # A compressed body could pass the size limit many times over once inflated.
        "Accept-Encoding": "identity",
        "Connection": "close",
    }
    extensions = {"sni_hostname": hop.host} if hop.url.scheme == "https" else {}
    failure = "no address to connect to"
    for address in hop.addresses:
        try:
            request = http.build_request(
                "GET", hop.url.copy_with(host=address), headers=headers, extensions=extensions
            )
        except httpx.InvalidURL:  # an address no URL can hold (an IPv6 zone)
            continue
        for name in _PRIVATE_HEADERS:
            request.headers.pop(name, None)
        try:
            response = await http.send(request, stream=True, follow_redirects=False, auth=None)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            failure = _reason(exc)
            continue
        try:
            return await _read(response, limits)
        finally:
            with trio.move_on_after(5, shield=True):
                await response.aclose()
    raise InputImageError(f"cannot fetch the image from {hop.host}: {failure}")


async def _read(response: httpx.Response, limits: FetchLimits) -> bytes | str:
    status = response.status_code
    location: str = response.headers.get("location", "")
    if status in REDIRECTS and location:
        return location
    if status != 200:
        phrase = httpx.codes.get_reason_phrase(status).lower()
        raise InputImageError(
            f"the image URL answered {status}" + (f" ({phrase})" if phrase else "")
        )
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise InputImageError(
            f"the image URL sent the image compressed ({encoding[:40]}), which fategen does "
            "not take"
        )
    limit = limits.max_bytes
    too_large = InputImageError(
        f"the image is larger than {limit / 2**20:g} MiB, the most fategen takes"
    )
    declared = response.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in response.aiter_bytes():  # identity: as it came
        body += chunk
        if len(body) > limit:
            raise too_large
    if not body:
        raise InputImageError("the image URL answered with an empty body")
    return bytes(body)


def _host_of(url: str) -> str:
    """The host named in ``url`` for a sentence (never the URL itself: its query may be
    signed)."""
    try:
        return httpx.URL(url).raw_host.decode("ascii") or "the image host"
    except (httpx.InvalidURL, UnicodeError, TypeError):
        return "the image host"


def _reason(exc: BaseException) -> str:
    """Why a transport failed, on one line: the first cause with something to say (httpx's
    error over a TLS failure is often empty; the ssl error under it says what went wrong)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        text = " ".join(str(seen).split())
        if text:
            return text[:_MAX_REASON]
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__
