"""The lean load generator: raw keep-alive HTTP/1.1 over trio sockets, in its own process.

    python bench/rawload.py closed URL --connections 64 --duration 3 --out FILE
    python bench/rawload.py pairs URL --count 60 --max-seconds 4 --nicks 100 --out FILE
    python bench/rawload.py waiters URL --ids FILE --count 5000 --offset 0 --out FILE

No HTTP library: each request is a few pre-built bytes and each answer is read by its
``Content-Length`` (or chunks), so the generator costs far less CPU per request than the service
it measures. Every mode connects first, prints ``ready``, and (``closed``, ``pairs``) waits for
a line on stdin before the clock starts; the driver reads the service's CPU time around it.

- ``closed``: ``--connections`` sockets each loop ``POST /request`` (a closed loop) for
  ``--duration`` seconds; the number of answers by status and their latencies.
- ``pairs``: one socket, ``POST /request``, then ``DELETE /job/{id}`` of the job the previous
  pair made (a change the reader did not cause; the queue keeps its size), then
  ``GET /job/{id}`` of the job just made (the first read after that change), ``--count``
  times or for ``--max-seconds``.
- ``waiters``: ``--count`` sockets, each parks one ``GET /wait/{id}``; ``ready`` once all are
  sent; each answer's epoch time. A 202 (the wait timed out) is asked again.

A connection that fails is opened again and its request sent again (counted in ``retries``).
The JSON report (with this process's CPU time) goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

_RETRYABLE = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, EOFError)


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Connection:
    """One keep-alive HTTP/1.1 connection, reconnected on failure."""

    def __init__(self, host: str, port: int, stats: dict[str, int]) -> None:
        self.host, self.port = host, port
        self._stream: trio.SocketStream | None = None
        self._buffer = bytearray()
        self._stats = stats

    async def connect(self) -> None:
        self._stream = await trio.open_tcp_stream(self.host, self.port)
        self._buffer.clear()

    async def aclose(self) -> None:
        if self._stream is not None:
            with trio.CancelScope(shield=True):
                await self._stream.aclose()
            self._stream = None

    async def send(self, raw: bytes) -> None:
        """Send ``raw`` (connecting first if need be)."""
        if self._stream is None:
            await self.connect()
        assert self._stream is not None
        await self._stream.send_all(raw)

    async def request(self, raw: bytes, *, attempts: int = 5) -> tuple[int, bytes]:
        """Send ``raw`` and read the answer: (status, body); reconnects on failure."""
        for attempt in range(attempts):
            try:
                await self.send(raw)
                return await self.read_response()
            except _RETRYABLE:
                await self.aclose()
                if attempt == attempts - 1:
                    raise
                self._stats["retries"] = self._stats.get("retries", 0) + 1
                await trio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _fill(self) -> None:
        assert self._stream is not None
        data = await self._stream.receive_some(65536)
        if not data:
            raise EOFError("the server closed the connection")
        self._buffer += data

    async def _read_until(self, marker: bytes) -> bytes:
        while (index := self._buffer.find(marker)) < 0:
            await self._fill()
        chunk = bytes(self._buffer[:index])
        del self._buffer[: index + len(marker)]
        return chunk

    async def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            await self._fill()
        chunk = bytes(self._buffer[:n])
        del self._buffer[:n]
        return chunk

    async def read_response(self) -> tuple[int, bytes]:
        """The next answer on the connection: (status, body)."""
        head = (await self._read_until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self._read_exactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await self._read_until(b"\r\n")).split(b";")[0], 16):
                parts.append(await self._read_exactly(size))
                await self._read_until(b"\r\n")
            await self._read_until(b"\r\n")
            body = b"".join(parts)
        else:
            body = b""
        if headers.get("connection", "").lower() == "close":
            await self.aclose()
        return status, body


def request_bytes(method: str, host: str, path: str, body: Any = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    payload = b""
    if body is not None:
        payload = json.dumps(body).encode()
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def post_body(rng: random.Random, nicks: int, serial: str) -> dict[str, str]:
    return {"message": f"load {serial} -m tiny -c 1", "nick": f"nick{rng.randrange(nicks)}"}


async def _wait_for_go() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    await stdin.receive_some(100)
    await stdin.aclose()


async def closed(args: argparse.Namespace, host: str, port: int) -> dict[str, Any]:
    stats: dict[str, int] = {}
    rng = random.Random(args.seed)
    # Pre-built requests: building them is not what is measured.
    requests = [
        request_bytes("POST", args.host_header, "/request", post_body(rng, args.nicks, str(i)))
        for i in range(512)
    ]
    connections = [Connection(host, port, stats) for _ in range(args.connections)]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    async with trio.open_nursery() as nursery:
        for c in connections:
            nursery.start_soon(c.connect)
    print("ready", flush=True)
    await _wait_for_go()
    deadline = time.monotonic() + args.duration

    async def loop(index: int, connection: Connection) -> None:
        n = index
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            status, _ = await connection.request(requests[n % len(requests)])
            latencies.append(time.perf_counter() - t0)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            n += args.connections

    cpu0, wall0 = own_cpu_seconds(), time.monotonic()
    async with trio.open_nursery() as nursery:
        for index, connection in enumerate(connections):
            nursery.start_soon(loop, index, connection)
    wall, cpu = time.monotonic() - wall0, own_cpu_seconds() - cpu0
    for c in connections:
        await c.aclose()
    return {"latencies": latencies, "statuses": statuses, "wall": wall, "cpu": cpu, **stats}


async def pairs(args: argparse.Namespace, host: str, port: int) -> dict[str, Any]:
    stats: dict[str, int] = {}
    rng = random.Random(args.seed)
    connection = Connection(host, port, stats)
    await connection.connect()
    # One warm-up pair, not measured.
    await connection.request(
        request_bytes("POST", args.host_header, "/request", post_body(rng, args.nicks, "warm"))
    )
    print("ready", flush=True)
    await _wait_for_go()
    posts: list[float] = []
    gets: list[float] = []
    statuses: dict[str, int] = {}
    cpu0, wall0 = own_cpu_seconds(), time.monotonic()
    deadline = wall0 + args.max_seconds
    previous: tuple[str, str] | None = None
    for i in range(args.count):
        if i >= args.min_count and time.monotonic() > deadline:
            break
        body = post_body(rng, args.nicks, str(i))
        raw = request_bytes("POST", args.host_header, "/request", body)
        t0 = time.perf_counter()
        status, answer = await connection.request(raw)
        posts.append(time.perf_counter() - t0)
        statuses[f"POST {status}"] = statuses.get(f"POST {status}", 0) + 1
        if status != 200:
            continue
        job_id = json.loads(answer)["job_id"]
        if previous is not None:
            # A change the reader below did not cause (and one job fewer: the size holds).
            old_id, old_nick = previous
            raw = request_bytes("DELETE", args.host_header, f"/job/{old_id}?nick={old_nick}")
            status, _ = await connection.request(raw)
            statuses[f"DELETE {status}"] = statuses.get(f"DELETE {status}", 0) + 1
        previous = (job_id, body["nick"])
        raw = request_bytes("GET", args.host_header, f"/job/{job_id}")
        t0 = time.perf_counter()
        status, _ = await connection.request(raw)
        gets.append(time.perf_counter() - t0)
        statuses[f"GET {status}"] = statuses.get(f"GET {status}", 0) + 1
    wall, cpu = time.monotonic() - wall0, own_cpu_seconds() - cpu0
    await connection.aclose()
    return {"posts": posts, "gets": gets, "statuses": statuses, "wall": wall, "cpu": cpu, **stats}


async def waiters(args: argparse.Namespace, host: str, port: int) -> dict[str, Any]:
    stats: dict[str, int] = {}
    ids: list[str] = args.id_list
    answers: list[tuple[str, float]] = []
    statuses: dict[str, int] = {}
    sent = 0
    all_sent = trio.Event()
    limiter = trio.CapacityLimiter(args.concurrency)
    cpu0 = own_cpu_seconds()

    async def wait(job_id: str) -> None:
        nonlocal sent
        connection = Connection(host, port, stats)
        raw = request_bytes("GET", args.host_header, f"/wait/{job_id}?timeout={args.timeout}")
        async with limiter:  # at most that many connecting at once
            for attempt in range(5):
                try:
                    await connection.connect()
                    break
                except OSError:
                    if attempt == 4:
                        raise
                    stats["retries"] = stats.get("retries", 0) + 1
                    await trio.sleep(0.1)
        await connection.send(raw)
        sent += 1
        if sent == args.count:
            all_sent.set()
        try:
            status, _ = await connection.read_response()
        except _RETRYABLE:
            stats["retries"] = stats.get("retries", 0) + 1
            await connection.aclose()
            status, _ = await connection.request(raw)
        while status == 202:
            status, _ = await connection.request(raw)
        answers.append((job_id, time.time()))
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        await connection.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(args.count):
            nursery.start_soon(wait, ids[(args.offset + i) % len(ids)])
        await all_sent.wait()
        print("ready", flush=True)
    return {"answers": answers, "statuses": statuses, "cpu": own_cpu_seconds() - cpu0, **stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["closed", "pairs", "waiters"])
    parser.add_argument("url")
    parser.add_argument("--out", required=True)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--nicks", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--min-count", type=int, default=15)
    parser.add_argument("--max-seconds", type=float, default=4.0)
    parser.add_argument("--ids")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--concurrency", type=int, default=1000)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    url = urlsplit(args.url)
    assert url.hostname is not None and url.port is not None, args.url
    args.host_header = url.netloc
    args.id_list = json.loads(Path(args.ids).read_text()) if args.ids else []
    mode = {"closed": closed, "pairs": pairs, "waiters": waiters}[args.mode]
    report = trio.run(mode, args, url.hostname, url.port)
    Path(args.out).write_text(json.dumps(report))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
