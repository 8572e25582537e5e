"""Malformed HTTP framing over raw sockets: one connection's trouble never ends the service.

hypercorn 0.18 (issue #203) let a malformed chunked request end the whole process with
``trio.BusyResourceError``; each framing here is sent on a fresh connection, and after each one
the service must still answer a normal request.
"""

from __future__ import annotations

import itertools
import logging

import pytest
import trio

from conftest import Stack

PATHS = [b"GET /models", b"GET /health", b"POST /request", b"DELETE /job/x", b"GET /wait/x"]

CHUNK_SIZES = [b"zz", b"-1", b"0x10", b"1g", b"99999999999999999999999", b" ", b"", b"5;" * 40]


def framings() -> list[tuple[str, bytes]]:
    cases: list[tuple[str, bytes]] = []
    for path, size in itertools.product(PATHS, CHUNK_SIZES):
        head = path + b" HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        cases.append((f"bad-chunk-size {path!r} {size[:8]!r}", head + size + b"\r\nab\r\n"))
    for path in PATHS:
        chunked = path + b" HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        cases += [
            (f"truncated-chunk {path!r}", chunked + b"5\r\nab"),
            (f"chunk-longer-than-said {path!r}", chunked + b"2\r\nabcdef\r\n0\r\n\r\n"),
            (f"no-final-chunk {path!r}", chunked + b"2\r\nab\r\n"),
            (f"bad-trailer {path!r}", chunked + b"0\r\n\x00bad\r\n\r\n"),
            (
                f"chunked-and-length {path!r}",
                path + b" HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
            ),
            (
                f"two-lengths {path!r}",
                path + b" HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
                b"Content-Length: 5\r\n\r\n[]xyz",
            ),
            (
                f"negative-length {path!r}",
                path + b" HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\n[]",
            ),
            (
                f"garbage-after-body {path!r}",
                path + b" HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: 2\r\n\r\n[]\x00\xff\xfeGARBAGE\r\n\r\n",
            ),
            (
                f"pipelined-junk {path!r}",
                path + b" HTTP/1.1\r\nHost: t\r\n\r\n" + b"\x16\x03\x01junk\r\n\r\n" * 3,
            ),
            (
                f"pipelined-bad-chunks {path!r}",
                (chunked + b"zz\r\n") * 3,
            ),
            (
                f"length-shorter-than-body-then-request {path!r}",
                path + b" HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\n[]"
                b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n",
            ),
            (f"bad-version {path!r}", path + b" HTTP/9.9\r\nHost: t\r\n\r\n"),
            (f"bare-lf {path!r}", path + b" HTTP/1.1\nHost: t\nTransfer-Encoding: chunked\n\nzz\n"),
            (f"header-no-colon {path!r}", path + b" HTTP/1.1\r\nHost t\r\n\r\n"),
            (
                f"http10-chunked {path!r}",
                path + b" HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            ),
        ]
    cases += [
        ("tls-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64),
        ("nul-bytes", b"\x00" * 512),
        ("request-line-only", b"GET\r\n\r\n"),
        ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 32),
    ]
    return cases


CASES = framings()


async def _port(stack: Stack) -> int:
    return int(stack.url.rsplit(":", 1)[1])


async def _send_and_drop(port: int, data: bytes, how: str) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(data)
        if how == "half-close":
            await stream.send_eof()
        if how != "abort":
            with trio.move_on_after(0.5):
                while await stream.receive_some(65536):
                    pass
    except trio.BrokenResourceError:
        pass  # the server may reset a connection it refused
    finally:
        await stream.aclose()


async def _healthy(stack: Stack) -> None:
    r = await stack.client.get("/health")
    assert r.status_code == 200, r.text


async def test_hundreds_of_malformed_framings_each_end_only_their_connection(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    assert len(CASES) * 3 >= 300
    port = await _port(stack)
    with trio.fail_after(120):
        for name, data in CASES:
            for how in ("read", "half-close", "abort"):
                await _send_and_drop(port, data, how)
                try:
                    await _healthy(stack)
                except Exception as exc:  # pragma: no cover - the failure message
                    raise AssertionError(f"after {name} ({how}): {exc!r}") from exc
        # The same framings at once, on many connections.
        async with trio.open_nursery() as nursery:
            for _name, data in CASES:
                nursery.start_soon(_send_and_drop, port, data, "read")
        await _healthy(stack)
        job = await stack.submit("still serving -m tiny -w 256 -h 256")
        done = await stack.wait(job["job_id"])
    assert done["status"] == "completed"
    tracebacks = [r for r in caplog.records if r.exc_info and r.levelno >= logging.WARNING]
    assert not tracebacks, tracebacks[0].getMessage()
