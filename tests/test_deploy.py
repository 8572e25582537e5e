"""The README's ways of running the service, as real processes: ``fategen serve --simulate`` and
plain ``hypercorn --worker-class trio 'fategen.asgi:create_app()'``."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from conftest import free_port, service_env, wait_healthy
from fategen.simulator import Simulator, SimulatorKnobs

ROOT = Path(__file__).resolve().parent.parent


def process_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    return {**os.environ, **service_env(tmp_path, FATEGEN_PORT=str(port), **extra)}


async def one_job(client: httpx.AsyncClient) -> None:
    r = await client.post("/request", json={"message": "a harbour -m tiny -c 2", "nick": "n"})
    assert r.status_code == 200, r.text
    job = (await client.get(f"/wait/{r.json()['job_id']}", params={"timeout": 30})).json()
    assert job["status"] == "completed", job
    image = await client.get(f"/job/{job['job_id']}/image")
    assert image.headers["content-type"] == "image/webp"


async def _malformed_chunked(port: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            b"GET /models HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        )
        with trio.move_on_after(1):
            while await stream.receive_some(65536):
                pass


async def run_and_stop(argv: list[str], env: dict[str, str], port: int, sig: int) -> str:
    proc = await trio.lowlevel.open_process(
        argv, env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output = bytearray()

    async def read() -> None:
        assert proc.stdout is not None
        async for chunk in proc.stdout:
            output.extend(chunk)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                with trio.fail_after(20):
                    await wait_healthy(c)
                    # Malformed chunked requests (hypercorn #203 ended the process) end
                    # their own connections only, under either way of running.
                    for _ in range(20):
                        await _malformed_chunked(port)
                    await wait_healthy(c)
                await one_job(c)
            proc.send_signal(sig)
            with trio.fail_after(20):
                code = await proc.wait()
        assert code == 0, output.decode(errors="replace")
    finally:
        if proc.returncode is None:
            proc.kill()
    return output.decode(errors="replace")


async def test_fategen_serve_simulate(tmp_path: Path) -> None:
    port = free_port()
    log = await run_and_stop(
        [sys.executable, "-m", "fategen", "serve", "--simulate"],
        process_env(tmp_path, port),
        port,
        signal.SIGINT,
    )
    assert "fategen is ready on" in log
    assert "finished in" in log and "fategen stopped" in log
    assert "HTTP Request:" not in log  # httpx's per-request lines stay at DEBUG


async def test_plain_hypercorn_deployment(tmp_path: Path) -> None:
    sim = Simulator(SimulatorKnobs(step_seconds=0.002))
    port = free_port()
    async with trio.open_nursery() as nursery:
        sim_port = await nursery.start(functools.partial(sim.serve, port=0))
        argv = [
            sys.executable,
            "-m",
            "hypercorn",
            "--worker-class",
            "trio",
            "--bind",
            f"127.0.0.1:{port}",
            "fategen.asgi:create_app()",
        ]
        log = await run_and_stop(
            argv, process_env(tmp_path, port, COMFYUI_PORT=str(sim_port)), port, signal.SIGTERM
        )
        nursery.cancel_scope.cancel()
    assert "fategen stopped" in log
    assert len(sim.executions) == 1
