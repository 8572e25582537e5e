"""Fetching an input image: SSRF-safe (every hop's addresses checked, the connection pinned
to the checked address), bounded in size and time, and every refusal one line naming the host.

A small real HTTP server on 127.0.0.1 serves the images and redirects; the time-out tests run
on the autojump clock with an in-memory transport (a real socket does not count as busy)."""

from __future__ import annotations

import functools
import ipaddress
import shutil
import ssl
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from conftest import free_port, png, solid
from fategen.errors import InputImageError
from fategen.queue.fetch import FetchLimits, fetch_image

CAT = png(solid((200, 120, 40), (64, 48)))
MIB = 2**20
LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)
LOCAL = FetchLimits(allowed_networks=LOOPBACK, max_bytes=MIB, timeout=10)
#: A signed query string, as Discord's attachment URLs carry: never in a sentence.
SIGNED = "?ex=6650a1b2&is=664f5032&hm=5ec7e75ec7e75ec7e75ec7e7"
REASONS = {200: "OK", 301: "Moved Permanently", 302: "Found", 307: "Temporary Redirect"}


class ImageServer:
    """A minimal HTTP/1.1 server (one request per connection) that records what it saw."""

    def __init__(self) -> None:
        self.port = 0
        self.seen: list[tuple[str, dict[str, str]]] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, stream: trio.abc.Stream) -> None:
        async with stream:
            try:
                await self.serve_one(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client gave up (a body past the cap, a certificate it refused)

    async def serve_one(self, stream: trio.abc.Stream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        target = lines[0].split(" ")[1]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.seen.append((target, headers))
        await self.answer(stream, target.split("?", 1)[0])

    async def answer(self, stream: trio.abc.Stream, path: str) -> None:
        async def send(status: int, headers: dict[str, str], body: bytes = b"") -> None:
            lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Whatever')}"]
            lines += [f"{name}: {value}" for name, value in headers.items()]
            lines += ["Connection: close", "", ""]
            await stream.send_all("\r\n".join(lines).encode() + body)

        def redirect(location: str, status: int = 302) -> Awaitable[None]:
            return send(status, {"Location": location, "Content-Length": "0"})

        if path == "/cat.png":
            await send(200, {"Content-Type": "image/png", "Content-Length": str(len(CAT))}, CAT)
        elif path.startswith("/hop/"):  # /hop/2 -> /hop/1 -> /hop/0 -> /cat.png
            left = int(path.removeprefix("/hop/"))
            await redirect(f"/hop/{left - 1}" if left else "/cat.png")
        elif path == "/relative":
            await redirect("cat.png", 301)
        elif path == "/absolute":
            await redirect(f"{self.base}/cat.png", 307)
        elif path == "/to-private":
            await redirect("http://10.1.2.3/x.png")
        elif path == "/to-loopback":
            await redirect(f"http://127.0.0.2:{self.port}/cat.png")
        elif path == "/to-ftp":
            await redirect("ftp://127.0.0.1/cat.png")
        elif path == "/loop":
            await redirect("/loop")
        elif path == "/big":
            await send(200, {"Content-Length": str(2 * MIB)}, b"x" * 1024)
        elif path == "/big-chunked":
            await send(200, {"Transfer-Encoding": "chunked"})
            chunk = b"x" * 65536
            for _ in range(64):  # 4 MiB if read to the end
                await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await stream.send_all(b"0\r\n\r\n")
        elif path == "/empty":
            await send(200, {"Content-Length": "0"})
        elif path == "/gzip":
            await send(200, {"Content-Encoding": "gzip", "Content-Length": "3"}, b"abc")
        else:
            await send(404, {"Content-Length": "9"}, b"not found")


@pytest.fixture
async def server() -> AsyncIterator[ImageServer]:
    served = ImageServer()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, served.handle, 0, host="127.0.0.1")
        )
        served.port = listeners[0].socket.getsockname()[1]
        yield served
        nursery.cancel_scope.cancel()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        yield client


async def refusal(url: str, limits: FetchLimits, http: httpx.AsyncClient, **kw: Any) -> str:
    """The sentence ``fetch_image`` refuses ``url`` with (within 60 s, beyond every fetch's
    own time-out): one line, no query string."""
    with trio.fail_after(60), pytest.raises(InputImageError) as err:
        await fetch_image(url, limits, http=http, **kw)
    message = str(err.value)
    assert "\n" not in message and "\r" not in message
    assert "hm=" not in message and "5ec7e7" not in message
    return message


# --- the SSRF guard ----------------------------------------------------------------------------


async def test_loopback_is_refused_by_default(server: ImageServer, http: httpx.AsyncClient) -> None:
    message = await refusal(f"{server.base}/cat.png{SIGNED}", FetchLimits(), http)
    assert message == (
        "the image host '127.0.0.1' resolves to 127.0.0.1, a loopback, private or link-local "
        "address, which fategen does not fetch from"
    )
    assert server.seen == []


async def test_localhost_is_refused_after_resolution(
    server: ImageServer, http: httpx.AsyncClient
) -> None:
    message = await refusal(f"http://localhost:{server.port}/", FetchLimits(), http)
    assert message.startswith("the image host 'localhost' resolves to ")
    assert "loopback, private or link-local address, which fategen does not fetch from" in message
    assert server.seen == []


async def test_an_allowed_network_is_fetched_from(
    server: ImageServer, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(20):
        body = await fetch_image(f"{server.base}/cat.png{SIGNED}", LOCAL, http=http)
    assert body == CAT
    [(target, headers)] = server.seen
    assert target == f"/cat.png{SIGNED}"  # the query goes to the server, untouched
    assert headers["host"] == f"127.0.0.1:{server.port}"
    assert headers["accept-encoding"] == "identity"
    assert headers["connection"] == "close"


async def test_allow_private_skips_the_address_check(
    server: ImageServer, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(20):
        body = await fetch_image(
            f"{server.base}/cat.png", FetchLimits(allow_private=True), http=http
        )
    assert body == CAT


@pytest.mark.parametrize(
    ("path", "host", "address"),
    [("/to-loopback", "127.0.0.2", "127.0.0.2"), ("/to-private", "10.1.2.3", "10.1.2.3")],
)
async def test_a_redirect_to_a_private_address_is_refused_at_the_hop(
    server: ImageServer, http: httpx.AsyncClient, path: str, host: str, address: str
) -> None:
    message = await refusal(f"{server.base}{path}", LOCAL, http)
    assert message == (
        f"the image host {host!r} resolves to {address}, a loopback, private or link-local "
        "address, which fategen does not fetch from"
    )
    assert [target for target, _ in server.seen] == [path]  # refused before connecting


@pytest.mark.parametrize("path", ["/hop/3", "/relative", "/absolute"])
async def test_redirects_within_the_allowed_network_are_followed(
    server: ImageServer, http: httpx.AsyncClient, path: str
) -> None:
    with trio.fail_after(20):
        assert await fetch_image(f"{server.base}{path}", LOCAL, http=http) == CAT
    assert server.seen[-1][0] == "/cat.png"


async def test_five_redirects_are_followed_six_are_not(
    server: ImageServer, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(20):
        assert await fetch_image(f"{server.base}/hop/4", LOCAL, http=http) == CAT
    assert len(server.seen) == 6  # 5 redirects, then the image
    message = await refusal(f"{server.base}/hop/5", LOCAL, http)
    assert message == "the image URL redirects more than 5 times"


async def test_an_endless_redirect_loop_is_refused(
    server: ImageServer, http: httpx.AsyncClient
) -> None:
    message = await refusal(f"{server.base}/loop", LOCAL, http)
    assert message == "the image URL redirects more than 5 times"
    assert len(server.seen) == 6


async def test_a_redirect_to_another_scheme_is_refused(
    server: ImageServer, http: httpx.AsyncClient
) -> None:
    message = await refusal(f"{server.base}/to-ftp", LOCAL, http)
    assert message == "the image URL's redirect must start with http:// or https://"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://127.0.0.1/cat.png", "the image URL must start with http:// or https://"),
        ("file:///etc/passwd", "the image URL must start with http:// or https://"),
        ("gopher://example.com/", "the image URL must start with http:// or https://"),
        (
            "http://user:secret@127.0.0.1/cat.png",
            "the image URL must not hold a user name or password",
        ),
        ("http:///cat.png", "the image URL has no host"),
        ("cat.png", "the image URL must start with http:// or https://"),
        ("http://[::1/cat.png", "the image URL is not a valid URL"),
        ("http://127.0.0.1:0/cat.png", "the image URL's port must be from 1 to 65535"),
        ("http://example.com/" + "a" * 2000, "the image URL is longer than 2000 characters"),
    ],
)
async def test_bad_urls_are_refused_in_one_line(
    http: httpx.AsyncClient, url: str, expected: str
) -> None:
    async def resolve(host: str, port: int) -> list[str]:
        raise AssertionError("no look-up for a bad URL")

    message = await refusal(url, LOCAL, http, resolve=resolve)
    assert message == expected
    assert "secret" not in message


async def test_a_host_that_does_not_resolve_is_named(http: httpx.AsyncClient) -> None:
    async def resolve(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    async def nothing(host: str, port: int) -> list[str]:
        return []

    url = f"https://nowhere.example/cat.png{SIGNED}"
    expected = "the image host 'nowhere.example' does not resolve"
    assert await refusal(url, LOCAL, http, resolve=resolve) == expected
    assert await refusal(url, LOCAL, http, resolve=nothing) == expected
    assert await refusal(url, FetchLimits(allow_private=True), http, resolve=nothing) == expected


async def test_one_private_address_among_public_ones_is_refused(http: httpx.AsyncClient) -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return ["93.184.215.14", "::ffff:192.168.1.20"]

    message = await refusal("http://mixed.example/", FetchLimits(), http, resolve=resolve)
    assert message.startswith("the image host 'mixed.example' resolves to 192.168.1.20, ")


# --- DNS pinning ---------------------------------------------------------------------------------


async def test_the_connection_goes_to_the_checked_address_with_the_real_host(
    server: ImageServer, http: httpx.AsyncClient
) -> None:
    """A made-up name resolved once per hop; the server sees that name in Host, while the
    connection went to the address that was checked (no second look-up)."""
    looked_up: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        looked_up.append((host, port))
        return ["127.0.0.1"] if host == "images.example" else []

    url = f"http://images.example:{server.port}/hop/1{SIGNED}"
    with trio.fail_after(20):
        body = await fetch_image(url, LOCAL, http=http, resolve=resolve)
    assert body == CAT
    assert [target for target, _ in server.seen] == [f"/hop/1{SIGNED}", "/hop/0", "/cat.png"]
    assert {headers["host"] for _, headers in server.seen} == {f"images.example:{server.port}"}
    assert looked_up == [("images.example", server.port)] * 3  # one per hop


async def test_the_next_address_is_tried_when_one_refuses_the_connection(
    server: ImageServer, http: httpx.AsyncClient
) -> None:
    looked_up: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        looked_up.append(host)
        return ["127.0.0.3", "127.0.0.1"]  # nothing listens on 127.0.0.3

    limits = FetchLimits(allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    with trio.fail_after(20):
        body = await fetch_image(
            f"http://cdn.example:{server.port}/cat.png", limits, http=http, resolve=resolve
        )
    assert body == CAT
    assert looked_up == ["cdn.example"]


async def test_no_address_taking_a_connection_is_one_line(http: httpx.AsyncClient) -> None:
    port = free_port()
    message = await refusal(f"http://127.0.0.1:{port}/cat.png{SIGNED}", LOCAL, http)
    assert message.startswith("cannot fetch the image from 127.0.0.1: ")


async def test_https_sends_the_real_name_for_tls_and_no_credentials() -> None:
    """In memory: the request goes to the IP, with Host and the ``sni_hostname`` extension
    (httpcore's name for TLS: server_hostname, the certificate check) set to the real name;
    the client's own Authorization and cookies stay home."""
    requests: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, content=CAT)

    async def resolve(host: str, port: int) -> list[str]:
        return ["2606:2800:21f:cb07:6820:80da:af6b:8b2c"]

    async with httpx.AsyncClient(
        transport=httpx.MockTransport(handler),
        headers={"Authorization": "Bearer fategen-admin"},
        cookies={"session": "operator"},
    ) as client:
        body = await fetch_image(
            f"https://cdn.example:8443/a/cat.png{SIGNED}",
            FetchLimits(),
            http=client,
            resolve=resolve,
        )
    assert body == CAT
    [request] = requests
    assert str(request.url) == (
        f"https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]:8443/a/cat.png{SIGNED}"
    )
    assert request.headers["host"] == "cdn.example:8443"
    assert request.extensions["sni_hostname"] == "cdn.example"
    assert "authorization" not in request.headers
    assert "cookie" not in request.headers


async def _certificate(tmp_path: Path, name: str) -> ssl.SSLContext:
    """A server context with a self-signed certificate for ``name`` (made by openssl)."""
    openssl = shutil.which("openssl")
    # As the IRC TLS test: the openssl command is part of the test machine (Debian's, CI's).
    assert openssl is not None, "the openssl command is needed to make a test certificate"
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    await trio.run_process(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        capture_stdout=True,
        capture_stderr=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.parametrize("certified", ["images.example", "other.example"])
async def test_tls_is_checked_against_the_real_name_not_the_address(
    tmp_path: Path, certified: str
) -> None:
    """Over real TLS on 127.0.0.1: the client connects to the address, sends the name in SNI
    and checks the certificate against the name (httpcore's ``sni_hostname``), so a
    certificate for the name passes and one for another name does not."""
    server_context = await _certificate(tmp_path, certified)
    names: list[str | None] = []
    server_context.sni_callback = lambda _sock, name, _context: names.append(name)
    client_context = ssl.create_default_context(cafile=tmp_path / f"{certified}.pem")

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    served = ImageServer()
    async with (
        httpx.AsyncClient(verify=client_context, trust_env=False) as client,
        trio.open_nursery() as nursery,
    ):
        serve = functools.partial(
            trio.serve_ssl_over_tcp, served.handle, 0, server_context, host="127.0.0.1"
        )
        listeners = await nursery.start(serve)
        port = listeners[0].transport_listener.socket.getsockname()[1]
        url = f"https://images.example:{port}/cat.png{SIGNED}"
        if certified == "images.example":
            with trio.fail_after(20):
                assert await fetch_image(url, LOCAL, http=client, resolve=resolve) == CAT
            assert served.seen[0][1]["host"] == f"images.example:{port}"
        else:
            message = await refusal(url, LOCAL, client, resolve=resolve)
            assert message.startswith("cannot fetch the image from images.example: ")
            assert "CERTIFICATE_VERIFY_FAILED" in message
            assert served.seen == []
        assert names == ["images.example"]
        nursery.cancel_scope.cancel()


# --- what comes back -----------------------------------------------------------------------------


async def test_a_404_is_one_sentence_naming_the_status(
    server: ImageServer, http: httpx.AsyncClient
) -> None:
    message = await refusal(f"{server.base}/missing.png{SIGNED}", LOCAL, http)
    assert message == "the image URL answered 404 (not found)"


@pytest.mark.parametrize("path", ["/big", "/big-chunked"])
async def test_a_body_past_the_cap_is_refused(
    server: ImageServer, http: httpx.AsyncClient, path: str
) -> None:
    message = await refusal(f"{server.base}{path}", LOCAL, http)
    assert message == "the image is larger than 1 MiB, the most fategen takes"


async def test_a_declared_length_past_the_cap_is_refused_before_reading() -> None:
    read = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal read
        read = True
        yield b"x"

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": str(MIB + 1)}, content=body())

    async def resolve(host: str, port: int) -> list[str]:
        return ["93.184.215.14"]

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        message = await refusal("http://cdn.example/x.png", LOCAL, client, resolve=resolve)
    assert message == "the image is larger than 1 MiB, the most fategen takes"
    assert not read


async def test_an_empty_body_is_refused(server: ImageServer, http: httpx.AsyncClient) -> None:
    message = await refusal(f"{server.base}/empty", LOCAL, http)
    assert message == "the image URL answered with an empty body"


async def test_a_compressed_body_is_refused(server: ImageServer, http: httpx.AsyncClient) -> None:
    message = await refusal(f"{server.base}/gzip", LOCAL, http)
    assert message == "the image URL sent the image compressed (gzip), which fategen does not take"


# --- time --------------------------------------------------------------------------------------


async def _public(host: str, port: int) -> list[str]:
    return ["93.184.215.14"]


async def test_a_server_that_never_answers_is_given_up_at_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(1000)
        raise AssertionError("cancelled before this")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        start = trio.current_time()
        message = await refusal(
            f"https://cdn.example/cat.png{SIGNED}", FetchLimits(), client, resolve=_public
        )
    assert trio.current_time() - start == 20.0
    assert message == "the image at cdn.example did not arrive within 20 s"


async def test_a_trickling_body_is_given_up_at_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One byte a second: httpx's per-read timeout never fires; the whole fetch's does."""

    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(10_000):
            yield b"x"
            await trio.sleep(1)

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=trickle())

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        start = trio.current_time()
        message = await refusal(
            "http://cdn.example/cat.png", FetchLimits(timeout=7.5), client, resolve=_public
        )
    assert trio.current_time() - start == 7.5
    assert message == "the image at cdn.example did not arrive within 7.5 s"


async def test_the_timeout_covers_redirects_and_resolution(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each hop takes 3.5 s (a slow look-up and a slow redirect): the third one is cut off at
    10 s, and the sentence names the host it was waiting for."""

    async def resolve(host: str, port: int) -> list[str]:
        await trio.sleep(1.5)
        return ["93.184.215.14"]

    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.sleep(2)
        hop = int(request.url.path.strip("/") or 0)
        return httpx.Response(302, headers={"Location": f"http://hop{hop + 1}.example/{hop + 1}"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        start = trio.current_time()
        message = await refusal(
            "http://hop0.example/", FetchLimits(timeout=10), client, resolve=resolve
        )
    assert trio.current_time() - start == 10.0
    assert message == "the image at hop2.example did not arrive within 10 s"
