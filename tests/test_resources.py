"""File descriptors: a flood of idle sockets at a 1,024-fd limit must not lock the service out
of ComfyUI or its database, nor fill the log; the cap on client connections holds the rest in
the listen backlog, and the service serves again once they go."""

from __future__ import annotations

import errno
import functools
import logging
import os
import resource
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from conftest import free_port, service_env, wait_healthy
from fategen.api import server
from fategen.simulator import Simulator, SimulatorKnobs

ROOT = Path(__file__).resolve().parent.parent
FD_LIMIT = 1024
IDLE_SOCKETS = 1100


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _statuses(db: Path) -> dict[str, tuple[str, str | None]]:
    """Read job states straight from the service's database (the HTTP port is flooded)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute("SELECT id, status, json_extract(body, '$.error') FROM jobs").fetchall()
    finally:
        conn.close()
    return {job_id: (status, error) for job_id, status, error in rows}


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def server_reserve() -> int:
    from fategen.service import FD_RESERVE

    return FD_RESERVE


async def _flood(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that never send a byte, opened in batches the server can take
    (a listen queue that overflows answers with SYN cookies, and an idle client never
    retries)."""
    sockets = []
    for start in range(0, count, 50):
        for _ in range(min(50, count - start)):
            sock = socket.socket()
            sock.setblocking(False)
            err = sock.connect_ex(("127.0.0.1", port))
            assert err in (0, errno.EINPROGRESS), os.strerror(err)
            sockets.append(sock)
        await trio.sleep(0.05)
    return sockets


async def test_idle_socket_flood_at_1024_fds_fails_no_job(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE_SOCKETS + 200:  # the test process itself holds the flood
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    # The first job loads its model for 3 s: the flood lands meanwhile, and every later call to
    # ComfyUI (posting the next prompts, history, images) needs a descriptor after it.
    sim = Simulator(SimulatorKnobs(step_seconds=0.2, model_load_seconds=3))
    port = free_port()
    async with trio.open_nursery() as nursery:
        sim_port = await nursery.start(functools.partial(sim.serve, host="127.0.0.1", port=0))
        env = {**os.environ, **service_env(tmp_path, FATEGEN_PORT=str(port))}
        env["COMFYUI_PORT"] = str(sim_port)
        log_path = tmp_path / "service.log"
        with log_path.open("wb") as log_file:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "fategen", "serve"],
                env=env,
                cwd=str(ROOT),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_limit_fds,
            )
        flood: list[socket.socket] = []
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                with trio.fail_after(20):
                    await wait_healthy(c)
                ids = []
                for i in range(3):
                    r = await c.post(
                        "/request",
                        json={"message": f"flooded {i} -m tiny -w 256 -h 256", "nick": f"u{i}"},
                    )
                    assert r.status_code == 200, r.text
                    ids.append(r.json()["job_id"])
                await sim.wait_running(ids[0])
                flood = await _flood(port, IDLE_SOCKETS)
                with trio.fail_after(20):  # until the service has taken all it will take
                    while _open_fds(proc.pid) < FD_LIMIT - server_reserve():  # noqa: ASYNC110
                        await trio.sleep(0.1)
                assert _statuses(tmp_path / "data" / "jobs.sqlite3")[ids[-1]][0] == "queued"
                db = tmp_path / "data" / "jobs.sqlite3"
                with trio.fail_after(30):
                    while not all(s[0] == "completed" for s in _statuses(db).values()):
                        failed = {k: v for k, v in _statuses(db).items() if v[0] == "failed"}
                        assert not failed, failed
                        await trio.sleep(0.2)
                assert proc.poll() is None, "the service exited"
                for sock in flood:
                    sock.close()
                flood = []
            # A fresh client (the old pool's sockets may have been dropped meanwhile).
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                with trio.fail_after(20):
                    while True:
                        try:
                            r = await c.get("/health")
                            break
                        except httpx.TransportError:
                            await trio.sleep(0.2)
                assert r.status_code == 200
                for job_id in ids:
                    job = (await c.get(f"/job/{job_id}")).json()
                    assert job["status"] == "completed" and job["error"] is None, job
        finally:
            for sock in flood:
                sock.close()
            proc.send_signal(2)
            with trio.move_on_after(15):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
            nursery.cancel_scope.cancel()
    output = log_path.read_text(errors="replace")
    assert "Traceback" not in output, output[-3000:]
    assert output.count("Too many open files") <= 2, output[-3000:]
    assert "at most 896 client connections at once" in output, output[:2000]


class _ExhaustedListener:
    """A listener whose every accept fails as a process out of descriptors does."""

    def __init__(self) -> None:
        self.accepts = 0

    async def accept(self) -> trio.SocketStream:
        self.accepts += 1
        await trio.lowlevel.checkpoint()
        raise OSError(errno.EMFILE, "Too many open files")


async def test_emfile_is_logged_once_per_interval(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="fategen.http")
    listener = _ExhaustedListener()
    slots = trio.Semaphore(4)

    async def never(stream: trio.SocketStream) -> None:
        raise AssertionError("nothing was accepted")

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(server.CAPACITY_LOG_INTERVAL * 2.5):
            await server._accept_forever(listener, never, nursery, slots)  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records if r.name == "fategen.http"]
    # Accept is retried ten times a second, but it says so at t = 0, 60 and 120 only.
    assert listener.accepts > 1000
    assert len(lines) == 3, lines
    assert all("Too many open files" in line for line in lines)
    assert "more like it" in lines[1] and "more like it" in lines[2]
    assert slots.value == 4  # every failed accept gave its slot back
