"""Fault injection over real sockets: each scenario ends with the service still serving and every
job in a truthful final state with a clear error; nothing is left ``processing``."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import fategen.queue.postprocess
from conftest import Stack, free_port, open_service, open_stack, submit
from fategen.simulator import Simulator, SimulatorKnobs
from fategen.store.jobs import JobStatus, JobStore

TINY = "-m tiny -w 256 -h 256"


class SimServer:
    """A simulator that can be stopped and started again on the same port (its state lives on
    the `Simulator`, like a ComfyUI whose process restarts)."""

    def __init__(self, sim: Simulator, nursery: trio.Nursery, port: int) -> None:
        self.sim = sim
        self.nursery = nursery
        self.port = port
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    async def start(self) -> None:
        await self.nursery.start(self._serve)

    async def _serve(self, *, task_status: trio.TaskStatus[int]) -> None:
        self._stopped = trio.Event()
        try:
            with trio.CancelScope() as self._scope:
                await self.sim.serve(host="127.0.0.1", port=self.port, task_status=task_status)
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()
        await self._stopped.wait()


async def wait(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    r = await client.get(f"/wait/{job_id}", params={"timeout": 30})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def assert_settled(store: JobStore) -> None:
    """Every job is in a final state; failed ones say why in one line."""
    for job in store.held_jobs():  # all of them: these tests run fewer than RECENT_FINISHED
        assert job.status.finished, (job.id, job.status)
        if job.status is JobStatus.FAILED:
            assert job.error and "\n" not in job.error


def no_stray_files(output: Path) -> list[str]:
    """Files in the output folder that are not finished results (temporary or partial)."""
    if not output.is_dir():
        return []
    return [p.name for p in output.iterdir() if not p.name.endswith(".webp") or p.name[0] == "."]


async def eventually(condition: Callable[[], bool], what: str, limit: float = 10) -> None:
    with trio.move_on_after(limit):
        while not condition():  # noqa: ASYNC110 (polls counters that have no event)
            await trio.sleep(0.02)
        return
    raise AssertionError(f"{what} did not happen within {limit} s")


# -- ComfyUI availability -------------------------------------------------------------------


async def test_comfy_down_at_start_then_up_runs_queued_jobs(tmp_path: Path) -> None:
    port = free_port()
    sim = Simulator(SimulatorKnobs(step_seconds=0.002, model_load_seconds=0.01))
    with trio.fail_after(30):
        async with (
            trio.open_nursery() as nursery,
            open_service(tmp_path, COMFYUI_PORT=str(port)) as (running, client),
        ):
            health = (await client.get("/health")).json()
            assert health["comfyui"]["reachable"] is False
            jobs = [await submit(client, f"early {i} {TINY}") for i in range(2)]
            await trio.sleep(0.3)
            for job_id in jobs:
                assert (await client.get(f"/job/{job_id}")).json()["status"] == "queued"
            server = SimServer(sim, nursery, port)
            await server.start()
            for job_id in jobs:
                assert (await wait(client, job_id))["status"] == "completed"
            assert (await client.get("/health")).json()["comfyui"]["reachable"] is True
            assert_settled(running.store)
            await server.stop()
    assert sorted(e.prompt_id for e in sim.executions) == sorted(jobs)


async def _kill_while_running(server: SimServer, job_id: str, times: int) -> None:
    for _ in range(times):
        await server.sim.wait_running(job_id)
        await trio.sleep(0.05)
        await server.stop()
        await trio.sleep(0.1)
        await server.start()


@pytest.mark.parametrize("deaths", [1, 3])
async def test_comfy_dies_mid_job_retried_then_failed(tmp_path: Path, deaths: int) -> None:
    """A job ComfyUI loses while it runs is queued again at the front; the third loss in a
    row (FATEGEN_MAX_LOSSES) fails it, naming why."""
    port = free_port()
    sim = Simulator(SimulatorKnobs(step_seconds=0.1, model_load_seconds=0.01))
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            server = SimServer(sim, nursery, port)
            await server.start()
            async with open_service(tmp_path, COMFYUI_PORT=str(port)) as (running, client):
                job_id = await submit(client, f"fragile {TINY}")
                await _kill_while_running(server, job_id, deaths)
                done = await wait(client, job_id)
                if deaths == 1:
                    assert done["status"] == "completed", done
                    # It ran twice; "finished in" counts from its first start.
                    job = await running.store.get(job_id)
                    assert job is not None and job.first_started is not None
                    assert job.started is not None and job.first_started < job.started
                else:
                    assert done["status"] == "failed", done
                    assert "lost the job" in done["error"]
                    assert "lost 3 times in a row" in done["error"]
                # still serving
                sim.knobs.step_seconds = 0.002
                after = await wait(client, await submit(client, f"after {TINY}"))
                assert after["status"] == "completed"
                assert_settled(running.store)
            await server.stop()
    statuses = [e.status for e in sim.executions if e.prompt_id == job_id]
    assert statuses[:deaths] == ["interrupted"] * deaths
    # One more run after a single loss; none after the third.
    assert len(statuses) == (2 if deaths == 1 else 3)


async def test_websocket_drop_mid_job_still_completes(tmp_path: Path) -> None:
    knobs = SimulatorKnobs(step_seconds=0.02, model_load_seconds=0.01, drop_ws_mid_job=1)
    with trio.fail_after(30):
        async with open_stack(tmp_path, knobs) as stack:
            done = await stack.wait((await stack.submit(f"dropped {TINY}"))["job_id"])
            assert done["status"] == "completed", done
            assert stack.running.session.statistics().connections >= 2
            assert_settled(stack.running.store)


async def test_hang_hits_the_stall_timeout_and_next_job_runs(tmp_path: Path) -> None:
    knobs = SimulatorKnobs(step_seconds=0.01, model_load_seconds=0.01, hang=1)
    with trio.fail_after(30):
        async with open_stack(tmp_path, knobs, FATEGEN_STALL_TIMEOUT="1") as stack:
            hung = (await stack.submit(f"hung {TINY}"))["job_id"]
            nxt = (await stack.submit(f"next {TINY}"))["job_id"]
            done = await stack.wait(hung)
            assert done["status"] == "failed"
            assert "reported nothing about the job for 1 s" in done["error"]
            assert (await stack.wait(nxt))["status"] == "completed"
            assert_settled(stack.running.store)
    statuses = {e.prompt_id: e.status for e in stack.sim.executions}
    assert statuses[hung] == "interrupted"  # /interrupt reached ComfyUI


# -- errors from ComfyUI and from the output folder -----------------------------------------


@pytest.mark.parametrize(
    ("fault", "needle"),
    [
        ("execution_error", 'failed in node "sampler" (KSampler)'),
        ("http_500", "500"),
        ("corrupt_image", "cannot be decoded"),
    ],
)
async def test_comfy_errors_fail_the_job_clearly(tmp_path: Path, fault: str, needle: str) -> None:
    with trio.fail_after(30):
        async with open_stack(tmp_path) as stack:
            setattr(stack.sim.knobs, fault, 1 if fault == "execution_error" else True)
            done = await stack.wait((await stack.submit(f"doomed {TINY}"))["job_id"])
            assert done["status"] == "failed", done
            assert needle in done["error"], done["error"]
            assert done["result"] is None and done["image_url"] is None
            setattr(stack.sim.knobs, fault, 0 if fault == "execution_error" else False)
            assert (await stack.wait((await stack.submit(f"fine {TINY}"))["job_id"]))[
                "status"
            ] == "completed"
            assert_settled(stack.running.store)
            output = stack.running.settings.output_dir
            assert no_stray_files(output) == []
            assert len(list(output.iterdir())) == 1


@pytest.mark.parametrize(
    ("knob", "value", "needle"),
    [
        ("view_trickle_seconds", 0.4, "did not answer the image"),
        ("view_extra_bytes", 2 * 2**30, "is larger than 2 MiB"),
    ],
    ids=["trickling-view", "2-GiB-view"],
)
async def test_comfy_answers_are_bounded_in_time_and_size(
    tmp_path: Path, knob: str, value: float, needle: str
) -> None:
    """A /view trickling a byte at a time kept the job processing forever (and every job
    behind it); a 2 GiB /view took the service to 4 GiB. Both now fail the job in one line,
    and the next job runs."""
    env = {"FATEGEN_COMFYUI_CALL_TIMEOUT": "1.5", "FATEGEN_COMFYUI_MAX_RESPONSE_MIB": "2"}
    with trio.fail_after(30):
        async with open_stack(tmp_path, **env) as stack:
            setattr(stack.sim.knobs, knob, value)
            doomed = (await stack.submit(f"doomed {TINY}"))["job_id"]
            done = await stack.wait(doomed)
            assert done["status"] == "failed", done
            assert needle in done["error"], done["error"]
            setattr(stack.sim.knobs, knob, type(value)(0))
            behind = (await stack.submit(f"behind {TINY}", "bob"))["job_id"]
            assert (await stack.wait(behind))["status"] == "completed"
            assert_settled(stack.running.store)
            assert no_stray_files(stack.running.settings.output_dir) == []


async def test_output_folder_replaced_by_a_file(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_stack(tmp_path) as stack:
            output = stack.running.settings.output_dir
            output.rmdir()
            output.write_bytes(b"not a folder")
            done = await stack.wait((await stack.submit(f"nowhere {TINY}"))["job_id"])
            assert done["status"] == "failed"
            assert "cannot write the result" in done["error"], done["error"]
            assert (await stack.client.get("/health")).status_code == 200
            output.unlink()
            output.mkdir()
            ok = await stack.wait((await stack.submit(f"somewhere {TINY}"))["job_id"])
            assert ok["status"] == "completed"
            assert_settled(stack.running.store)
            assert no_stray_files(output) == []


async def test_disk_full_leaves_no_half_written_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    full = True

    def fsync(fd: int) -> None:
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(fategen.queue.postprocess.os, "fsync", fsync)
    with trio.fail_after(30):
        async with open_stack(tmp_path) as stack:
            done = await stack.wait((await stack.submit(f"full {TINY}"))["job_id"])
            assert done["status"] == "failed"
            assert "No space left on device" in done["error"], done["error"]
            output = stack.running.settings.output_dir
            assert list(output.iterdir()) == []
            full = False
            ok = await stack.wait((await stack.submit(f"room {TINY}"))["job_id"])
            assert ok["status"] == "completed"
            assert_settled(stack.running.store)


# -- long-poll clients that go away ---------------------------------------------------------


async def _park_wait(port: int, job_id: str) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        f"GET /wait/{job_id}?timeout=60 HTTP/1.1\r\nHost: t\r\n\r\n".encode("ascii")
    )
    return stream


async def test_a_thousand_disconnecting_waiters_leak_nothing(tmp_path: Path) -> None:
    knobs = SimulatorKnobs(step_seconds=0.002, model_load_seconds=0.01, hang=1)
    with trio.fail_after(45):
        async with open_stack(tmp_path, knobs, FATEGEN_STALL_TIMEOUT="60") as stack:
            store = stack.running.store
            job_id = (await stack.submit(f"parked {TINY}"))["job_id"]
            await stack.sim.wait_running(job_id)
            await trio.sleep(0.2)
            baseline = trio.lowlevel.current_statistics().tasks_living
            port = int(stack.url.rsplit(":", 1)[1])
            streams = [await _park_wait(port, job_id) for _ in range(1000)]

            def waiting() -> int:
                event = store._changed.get(job_id)
                return 0 if event is None else event.statistics().tasks_waiting

            await eventually(lambda: waiting() == 1000, "1000 parked waiters", limit=20)
            assert trio.lowlevel.current_statistics().tasks_living > baseline + 1000
            for stream in streams:
                await stream.aclose()
            await eventually(lambda: job_id not in store._changed, "waiter events released")
            await eventually(
                lambda: trio.lowlevel.current_statistics().tasks_living <= baseline + 5,
                "request tasks ended",
            )
            # The job and the service are unaffected.
            assert (await stack.client.get(f"/job/{job_id}")).json()["status"] == "processing"
            r = await stack.client.delete(f"/job/{job_id}", params={"nick": "alice"})
            assert r.json()["status"] == "cancelled"
            assert_settled(store)


async def test_fault_free_stack_for_reference(stack: Stack) -> None:
    """The helpers agree with a healthy stack."""
    with trio.fail_after(20):
        done = await stack.wait((await stack.submit(f"plain {TINY}"))["job_id"])
    assert done["status"] == "completed"
    assert_settled(stack.running.store)
    assert no_stray_files(stack.running.settings.output_dir) == []
