"""The simulator's own extras: GET /sim/executions, the bearer-token knob, websocket pings."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from functools import partial

import httpx
import pytest
import trio
import trio_websocket
from simulator_fixtures import (
    TINY_CKPT,
    emptyimage_prompt,
    recorder,
    running_simulator,
    txt2img_prompt,
)

from conftest import free_port
from fategen.simulator import SimulatorKnobs

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_executions_lists_runs_in_order_with_wall_clock_times() -> None:
    with trio.fail_after(10):
        async with running_simulator() as running:
            before = time.time()
            first = await running.run_prompt({"prompt": emptyimage_prompt()})
            second = await running.run_prompt({"prompt": txt2img_prompt()})
            after = time.time()
            answer = await running.http.get("/sim/executions")
            assert (await running.http.get("/api/sim/executions")).json() == answer.json()
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/json; charset=utf-8"
    executions = answer.json()["executions"]
    assert list(answer.json()) == ["executions"]
    assert [e["prompt_id"] for e in executions] == [first, second]
    assert [sorted(e) for e in executions] == [
        ["checkpoint", "ended", "input_images", "prompt_id", "started", "status"]
    ] * 2
    assert [e["input_images"] for e in executions] == [[], []]
    assert [(e["status"], e["checkpoint"]) for e in executions] == [
        ("success", None),
        ("success", TINY_CKPT),
    ]
    times = [t for e in executions for t in (e["started"], e["ended"])]
    assert all(isinstance(t, float) for t in times)
    assert before <= times[0] <= times[1] <= times[2] <= times[3] <= after
    records = running.sim.executions
    assert times == [t for r in records for t in (r.started_wall, r.finished_wall)]


async def test_executions_report_error_and_interrupted() -> None:
    knobs = SimulatorKnobs(step_seconds=0.001, execution_error=1)
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs) as running:
            failed = await running.run_prompt({"prompt": emptyimage_prompt(color=1)})
            running.sim.knobs.hang = 1
            hung = (await running.post_prompt({"prompt": emptyimage_prompt(color=2)}))["prompt_id"]
            await running.sim.wait_running(hung)
            await running.http.post("/interrupt", json={"prompt_id": hung})
            await running.sim.wait_idle()
            executions = (await running.http.get("/sim/executions")).json()["executions"]
    assert [(e["prompt_id"], e["status"]) for e in executions] == [
        (failed, "error"),
        (hung, "interrupted"),
    ]


async def test_each_execution_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fategen.simulator")
    with trio.fail_after(10):
        async with running_simulator() as running:
            plain = await running.run_prompt({"prompt": emptyimage_prompt()})
            sampled = await running.run_prompt({"prompt": txt2img_prompt()})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("executed ")]
    assert len(lines) == 2
    assert re.fullmatch(
        rf"executed prompt {plain} \(no checkpoint\): success in \d+\.\d{{3}} s", lines[0]
    )
    assert re.fullmatch(
        rf"executed prompt {sampled} \({re.escape(TINY_CKPT)}\): success in \d+\.\d{{3}} s",
        lines[1],
    )


async def test_required_token_guards_every_route() -> None:
    knobs = SimulatorKnobs(step_seconds=0.001, required_token=TOKEN)
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs) as running:
            http = running.http
            for method, path in [
                ("GET", "/system_stats"),
                ("GET", "/api/queue"),
                ("GET", "/sim/executions"),
                ("GET", "/api/sim/executions"),
                ("POST", "/prompt"),
                ("GET", "/nosuchroute"),
            ]:
                for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]:
                    refused = await http.request(method, path, headers=headers)
                    assert refused.status_code == 401, (method, path, headers)
                    assert refused.json() == {"error": "unauthorized"}
                    assert refused.headers["WWW-Authenticate"] == "Bearer"
            assert not running.sim.queue.pending
            assert (await http.get("/system_stats", headers=AUTH)).status_code == 200
            http.headers.update(AUTH)
            prompt_id = await running.run_prompt({"prompt": emptyimage_prompt()})
            executions = (await http.get("/sim/executions")).json()["executions"]
            assert [e["prompt_id"] for e in executions] == [prompt_id]
            running.sim.knobs.required_token = None  # a knob: read on every request
            assert (await http.get("/prompt", headers={"Authorization": ""})).status_code == 200


async def test_required_token_guards_the_websocket_handshake() -> None:
    knobs = SimulatorKnobs(step_seconds=0.001, required_token=TOKEN)
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs) as running:
            for path, headers in [
                ("/ws", []),
                ("/api/ws", []),
                ("/ws", [(b"Authorization", b"Bearer wrong")]),
            ]:
                url = f"ws://127.0.0.1:{running.port}{path}?clientId=c1"
                with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                    async with trio_websocket.open_websocket_url(url, extra_headers=headers):
                        pass
                assert rejected.value.status_code == 401
                assert rejected.value.body is not None
                assert json.loads(rejected.value.body) == {"error": "unauthorized"}
            async with recorder(running.ws_url("c1"), headers=AUTH) as rec:
                running.http.headers.update(AUTH)
                body = {"prompt": emptyimage_prompt(), "client_id": "c1"}
                prompt_id = await running.run_prompt(body)
                await rec.wait_type("executing", node=None, prompt_id=prompt_id)


@pytest.mark.parametrize("token", [None, TOKEN])
async def test_websocket_answers_pings(token: str | None) -> None:
    knobs = SimulatorKnobs(step_seconds=0.001, required_token=token)
    headers = [(b"Authorization", f"Bearer {token}".encode())] if token else []
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs) as running:
            url = running.ws_url("pinger")
            async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
                assert json.loads(await ws.get_message())["type"] == "status"
                for _ in range(3):
                    with trio.fail_after(1):
                        await ws.ping()


async def _read_until(stream: trio.abc.ReceiveStream, needle: str, seen: list[str]) -> str:
    """The first line of ``stream`` holding ``needle`` (every line read goes into ``seen``)."""
    buffer = b""
    while True:
        chunk = await stream.receive_some()
        if not chunk:
            raise AssertionError(f"stream ended before {needle!r}: {seen}")
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            seen.append(line.decode())
            if needle in seen[-1]:
                return seen[-1]


async def test_main_module_token_and_name() -> None:
    port = free_port()
    command = [sys.executable, "-m", "fategen.simulator", "--port", str(port)]
    command += ["--step-seconds", "0", "--token", TOKEN, "--name", "sim-a"]
    base = f"http://127.0.0.1:{port}"
    seen: list[str] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery, httpx.AsyncClient(base_url=base) as http:
            process: trio.Process = await nursery.start(
                partial(trio.run_process, command, check=False, stderr=subprocess.PIPE)
            )
            assert process.stderr is not None
            await _read_until(process.stderr, "Running on", seen)
            refused = await http.get("/system_stats")
            assert (refused.status_code, refused.json()) == (401, {"error": "unauthorized"})
            http.headers.update(AUTH)
            answer = await http.post("/prompt", json={"prompt": emptyimage_prompt()})
            prompt_id = answer.json()["prompt_id"]
            line = await _read_until(process.stderr, f"executed prompt {prompt_id}", seen)
            assert re.search(
                rf"\[sim-a\] fategen\.simulator\.engine: executed prompt {prompt_id} "
                r"\(no checkpoint\): success in \d+\.\d{3} s$",
                line,
            )
            executions = (await http.get("/sim/executions")).json()["executions"]
            assert [e["prompt_id"] for e in executions] == [prompt_id]
            nursery.cancel_scope.cancel()
