"""Durability: the service process is killed (SIGKILL) and restarted; nothing is lost or doubled.

The simulator runs in the test's nursery and keeps running across fategen's restarts, like a
real ComfyUI on its own machine: a prompt posted before the kill keeps executing there, and the
restarted service must find it (prompt id = job id) instead of posting it again.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from conftest import free_port, service_env
from fategen.simulator import Simulator, SimulatorKnobs

JOB = "-m tiny -w 256 -h 256"


class ServiceProcess:
    """``python -m fategen serve`` in a subprocess, against the in-process simulator."""

    def __init__(self, tmp_path: Path, sim_port: int, **env: str) -> None:
        self.tmp_path = tmp_path
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            **service_env(
                tmp_path,
                FATEGEN_STALL_TIMEOUT="10",
                COMFYUI_ADDRESS="127.0.0.1",
                COMFYUI_PORT=str(sim_port),
                LOG_LEVEL="DEBUG",
                **env,
            ),
        }
        self.proc: trio.Process | None = None
        self.starts = 0
        self.url = ""

    async def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.starts += 1
        log = (self.tmp_path / f"service-{self.starts}.log").open("wb")
        try:
            self.proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "fategen", "serve"],
                env={**self.env, "FATEGEN_PORT": str(port)},
                cwd=self.tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        with trio.fail_after(10):
            async with httpx.AsyncClient(base_url=self.url, timeout=1) as client:
                while True:
                    assert self.proc.returncode is None, self.log()
                    try:
                        if (await client.get("/health")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.proc is not None
        self.proc.kill()
        with trio.fail_after(5):
            await self.proc.wait()

    def log(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.tmp_path.glob("service-*.log"))
        )


@asynccontextmanager
async def open_setup(
    tmp_path: Path, knobs: SimulatorKnobs, **env: str
) -> AsyncIterator[tuple[Simulator, ServiceProcess]]:
    sim = Simulator(knobs)
    async with trio.open_nursery() as nursery:
        sim_port = await nursery.start(sim.serve)
        service = ServiceProcess(tmp_path, sim_port, **env)
        try:
            yield sim, service
        finally:
            if service.proc is not None and service.proc.returncode is None:
                await service.kill()
            nursery.cancel_scope.cancel()


async def submit(url: str, message: str, nick: str, **kw: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        r = await client.post("/request", json={"message": message, "nick": nick}, **kw)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def get(url: str, path: str, **params: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=20) as client:
        return await client.get(path, params=params)


async def job(url: str, job_id: str) -> dict[str, Any]:
    r = await get(url, f"/job/{job_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def wait_done(url: str, job_id: str) -> dict[str, Any]:
    r = await get(url, f"/wait/{job_id}", timeout=10)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def wait_processing(url: str, job_id: str) -> None:
    # Another process: polling over HTTP is the only way to watch it.
    while (await job(url, job_id))["status"] != "processing":  # noqa: ASYNC110
        await trio.sleep(0.02)


async def positions_of(
    url: str, ids: list[str], valid: Callable[[list[int | None]], bool] | None = None
) -> dict[str, int | None]:
    """The jobs' queue positions at one moment. The queue moves while it is read one job at
    a time, so it is read until a reading is ``valid`` or, without that test, until two
    readings in a row agree: no job is counted before a shift and another after it."""
    previous: dict[str, int | None] = {}
    for _ in range(100):
        reading = {i: (await job(url, i))["queue_position"] for i in ids}
        if valid(list(reading.values())) if valid is not None else reading == previous:
            return reading
        previous = reading
    raise AssertionError(f"the queue never held still: {previous}")


def result_files(job_id: str, count: int) -> list[str]:
    """The files a completed job leaves: its grid, and each image when it has several."""
    return [f"{job_id}.webp"] + (
        [f"{job_id}-{n}.webp" for n in range(1, count + 1)] if count > 1 else []
    )


def executions(sim: Simulator) -> Counter[str]:
    return Counter(e.prompt_id for e in sim.executions)


async def test_kill_while_processing_and_queued_loses_and_repeats_nothing(tmp_path: Path) -> None:
    knobs = SimulatorKnobs(step_seconds=0.08, model_load_seconds=0.01)
    with trio.fail_after(14):
        async with open_setup(tmp_path, knobs) as (sim, service):
            await service.start()
            nicks = ["alice", "alice", "alice", "bob", "bob", "carol"]
            ids = [
                (await submit(service.url, f"n{i} {JOB}", n))["job_id"] for i, n in enumerate(nicks)
            ]
            await wait_processing(service.url, ids[0])
            positions = await positions_of(
                service.url,
                ids,
                lambda seen: sorted(p for p in seen if p is not None) == list(range(len(ids))),
            )
            predicted = sorted(ids, key=lambda i: positions[i])
            assert sorted(positions.values()) == list(range(len(ids)))

            await service.kill()
            # ComfyUI carries on without fategen: the running prompt and the one posted ahead.
            await sim.wait_idle()
            assert list(executions(sim)) == predicted[:2]

            await service.start()
            # Queued jobs kept their places (the two ComfyUI already ran come first).
            after = await positions_of(service.url, ids)
            # Jobs already started or finished (position 0 or None: several may be, their
            # images are made in parallel) are the first of the predicted order; the ones
            # still queued follow in it, with their places counted after those.
            started = [i for i in ids if not after[i]]
            queued = sorted((i for i in ids if after[i]), key=lambda i: after[i])
            assert set(started) == set(predicted[: len(started)]), (after, predicted)
            assert queued == predicted[len(started) :], (after, predicted)
            assert [after[i] for i in queued] == list(range(1, len(queued) + 1))
            done = [await wait_done(service.url, i) for i in ids]

    assert [d["status"] for d in done] == ["completed"] * len(ids), done
    assert executions(sim) == Counter(ids), "every job ran exactly once"
    assert [e.prompt_id for e in sim.executions] == predicted
    for i in ids:
        assert (tmp_path / "output" / f"{i}.webp").is_file()


async def test_kill_right_after_post_and_finished_jobs_survive(tmp_path: Path) -> None:
    knobs = SimulatorKnobs(step_seconds=0.01, model_load_seconds=0.01)
    with trio.fail_after(14):
        async with open_setup(tmp_path, knobs) as (sim, service):
            await service.start()
            ok = await submit(service.url, f"fine {JOB}", "dora")
            ok_done = await wait_done(service.url, ok["job_id"])
            sim.knobs.execution_error = 1  # the next job to start fails on ComfyUI
            bad = await submit(service.url, f"broken {JOB} -s 5", "dora")
            bad_done = await wait_done(service.url, bad["job_id"])
            assert (ok_done["status"], bad_done["status"]) == ("completed", "failed")

            # The answer to POST /request means the job is on disk: kill at once.
            key = {"Idempotency-Key": "retry-7"}
            fresh = await submit(service.url, f"fresh {JOB}", "dora", headers=key)
            await service.kill()

            await service.start()
            again = await submit(service.url, f"fresh {JOB}", "dora", headers=key)
            assert again["job_id"] == fresh["job_id"]
            fresh_done = await wait_done(service.url, fresh["job_id"])
            assert fresh_done["status"] == "completed"
            # Finished jobs answer as before, at once.
            for before in (ok_done, bad_done):
                now = await wait_done(service.url, before["job_id"])
                # The same answer, but for the port (a new one after the restart).
                # The links name the service's address, which changes with each start.
                links = {"image_url": None, "images": None}
                assert now | links == before | links
            assert bad_done["error"]
            r = await get(service.url, f"/job/{ok['job_id']}/image")
            assert r.status_code == 200 and r.headers["content-type"] == "image/webp"

    counts = executions(sim)
    assert counts[fresh["job_id"]] == 1 and counts[ok["job_id"]] == 1


async def test_a_second_kill_during_the_same_job_fails_it_and_stops_it(tmp_path: Path) -> None:
    # The job hangs on ComfyUI, so it is still running at each kill.
    knobs = SimulatorKnobs(step_seconds=0.01, model_load_seconds=0.01, hang=1)
    with trio.fail_after(14):
        async with open_setup(tmp_path, knobs) as (sim, service):
            await service.start()
            stuck = (await submit(service.url, f"stuck {JOB}", "eve"))["job_id"]
            after = (await submit(service.url, f"after {JOB}", "eve"))["job_id"]
            await wait_processing(service.url, stuck)
            await service.kill()
            with sqlite3.connect(tmp_path / "data" / "jobs.sqlite3") as raw:
                (status,) = raw.execute("SELECT status FROM jobs WHERE id = ?", (stuck,)).fetchone()
            assert status == "processing"

            await service.start()  # runs it again once: it is still running on ComfyUI
            await wait_processing(service.url, stuck)
            assert (await job(service.url, stuck))["status"] == "processing"
            await service.kill()

            await service.start()
            failed = await wait_done(service.url, stuck)
            assert failed["status"] == "failed"
            assert "interrupted twice" in failed["error"]
            # ComfyUI was told to stop it, and the next job ran.
            assert (await wait_done(service.url, after))["status"] == "completed"

    assert [(e.prompt_id, e.status) for e in sim.executions] == [
        (stuck, "interrupted"),
        (after, "success"),
    ]


def _rows(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Every job as the service's database holds it (read while the service is down)."""
    import json

    with sqlite3.connect(tmp_path / "data" / "jobs.sqlite3") as raw:
        rows = raw.execute("SELECT id, body FROM jobs").fetchall()
    return {job_id: json.loads(body) for job_id, body in rows}


async def wait_generated(tmp_path: Path, count: int) -> None:
    """Until ``count`` jobs are generated on ComfyUI but not yet completed (post-processing)."""
    while True:
        try:
            rows = _rows(tmp_path)
        except sqlite3.OperationalError:  # busy: the service is writing
            rows = {}
        busy = [r for r in rows.values() if r["generated"] and r["status"] == "processing"]
        if len(busy) >= count:
            return
        await trio.sleep(0.005)


async def test_kill_during_post_processing_fails_no_job(tmp_path: Path) -> None:
    """Jobs ComfyUI had finished (their images being fetched and encoded, or waiting for
    that) are not "interrupted" by a kill: after the restart their images are made from
    ComfyUI's history, and none runs again on ComfyUI. A result file written just before
    the kill is the job's result; partial files are removed."""
    knobs = SimulatorKnobs(step_seconds=0.002, model_load_seconds=0.0)
    big = "-m tiny -w 1024 -h 1024 -c 4"
    with trio.fail_after(40):
        async with open_setup(tmp_path, knobs) as (sim, service):
            await service.start()
            ids = [
                (await submit(service.url, f"big {i} {big}", f"u{i}"))["job_id"] for i in range(6)
            ]
            await wait_generated(tmp_path, 2)
            await service.kill()
            rows = _rows(tmp_path)
            generated = [
                i for i in ids if rows[i]["generated"] and rows[i]["status"] == "processing"
            ]
            assert len(generated) >= 2
            # As if the kill had come between writing a result and recording it, and while
            # another was half-written.
            output = tmp_path / "output"
            written, partial = generated[0], generated[1]
            picture = output / f"{written}.webp"
            if not picture.exists():
                from PIL import Image

                # What a render leaves before it is recorded: each image, then the grid.
                count = rows[written]["request"]["count"]
                for name in result_files(written, count)[1:]:
                    Image.new("RGB", (32, 32), (1, 2, 3)).save(output / name, format="WEBP")
                Image.new("RGB", (64, 32), (1, 2, 3)).save(picture, format="WEBP")
            before = picture.read_bytes()
            leftover = output / f".{partial}.webp.0123456789abcdef.tmp"
            leftover.write_bytes(b"half an image")

            await service.start()
            done = [await wait_done(service.url, i) for i in ids]
            log = service.log()
    assert [d["status"] for d in done] == ["completed"] * len(ids), [d["error"] for d in done]
    assert executions(sim) == Counter(ids), "no prompt ran twice on ComfyUI"
    assert picture.read_bytes() == before, "the result written before the kill was kept"
    assert not leftover.exists()
    expected = [n for d in done for n in result_files(d["job_id"], d["count"])]
    assert sorted(p.name for p in output.iterdir()) == sorted(expected)
    assert "ComfyUI had finished it; making its image" in log
    assert "interrupted" not in " ".join(str(d["error"]) for d in done)


KILLS = int(os.environ.get("DURABILITY_KILLS", "50"))


async def test_random_kills_under_submit_bursts_lose_fail_and_repeat_nothing(
    tmp_path: Path,
) -> None:
    """The goal of the crash work: SIGKILLs at random instants while bots submit in bursts.
    Every accepted job completes (none lost), no prompt runs twice on ComfyUI, no job fails
    unless ComfyUI was executing it at two kills, and no partial or orphan file is left."""
    import random

    rng = random.Random(20261201)
    knobs = SimulatorKnobs(step_seconds=0.004, model_load_seconds=0.002)
    accepted: list[str] = []
    kills: list[float] = []
    with trio.fail_after(30 + KILLS * 4):
        async with open_setup(tmp_path, knobs) as (sim, service):

            async def one(nick: str, n: int) -> None:
                count = rng.choice([1, 1, 2, 4])
                try:
                    body = await submit(service.url, f"burst {n} {JOB} -c {count}", nick)
                except (httpx.TransportError, AssertionError):
                    return  # not accepted: the service died before it answered
                accepted.append(body["job_id"])

            for k in range(KILLS):
                await service.start()
                async with trio.open_nursery() as nursery:
                    for n in range(rng.randint(2, 6)):
                        nursery.start_soon(one, f"nick{rng.randrange(12)}", k * 10 + n)
                    await trio.sleep(rng.uniform(0.0, 0.4))
                    kills.append(trio.current_time())
                    await service.kill()
            await service.start()
            # Also the jobs whose answer the kill cut off: they are on disk, so they run too.
            every = list(dict.fromkeys([*accepted, *_rows(tmp_path)]))
            done = {i: await wait_done(service.url, i) for i in every}
            log = service.log()
    assert len(accepted) > KILLS, "the bursts got jobs in"
    statuses = Counter(d["status"] for d in done.values())
    failed = {i: d["error"] for i, d in done.items() if d["status"] != "completed"}
    for job_id in failed:
        spans = [(e.started, e.finished) for e in sim.executions if e.prompt_id == job_id]
        during = [t for t in kills if any(a <= t <= b for a, b in spans)]
        assert len(during) >= 2, (job_id, failed[job_id], spans, statuses)
    ran = executions(sim)
    assert all(ran[i] == 1 for i in done), [i for i in done if ran[i] != 1]
    output = tmp_path / "output"
    expected = {
        n
        for i, d in done.items()
        if d["status"] == "completed"
        for n in result_files(i, d["count"])
    }
    assert {p.name for p in output.iterdir()} == expected, "no partial or orphan files"
    assert "Traceback" not in log


async def test_a_webhook_is_delivered_after_a_kill_in_between(tmp_path: Path) -> None:
    """The job ends while its webhook's receiver is down; fategen is killed (SIGKILL) before
    the delivery succeeds; the receiver comes up; after the restart the delivery arrives,
    signed, exactly once (the outbox was committed with the job's end)."""
    import base64

    from standardwebhooks.webhooks import Webhook

    from conftest import Receiver

    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    port = free_port()
    knobs = SimulatorKnobs(step_seconds=0.002, model_load_seconds=0.0)
    async with open_setup(
        tmp_path, knobs, FATEGEN_WEBHOOK_SECRET=secret, FATEGEN_WEBHOOK_ALLOW_PRIVATE="1"
    ) as (_, service):
        await service.start()
        hook = f"http://127.0.0.1:{port}/hook"
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
            r = await client.post(
                "/request", json={"message": f"kept {JOB}", "nick": "kim", "webhook_url": hook}
            )
            assert r.status_code == 200, r.text
            job_id = r.json()["job_id"]
        assert (await wait_done(service.url, job_id))["status"] == "completed"
        with trio.fail_after(10):
            while True:  # the first attempt failed: nobody listens on the port yet
                hooks = (await job(service.url, job_id))["webhooks"]
                if hooks and hooks[0]["attempts"] >= 1:
                    break
                await trio.sleep(0.05)
        assert hooks[0]["state"] == "pending" and "could not be reached" in hooks[0]["last_error"]
        await service.kill()
        async with Receiver().running(port) as receiver:
            await service.start()
            headers, payload = await receiver.next()
            assert payload["type"] == "job.completed" and payload["data"]["job_id"] == job_id
            assert Webhook(secret).verify(receiver.received[0][1], headers)["type"] == (
                "job.completed"
            )
            with trio.fail_after(10):
                # Another process: polling over HTTP is the only way to watch it.
                while (await job(service.url, job_id))["webhooks"][0]["state"] != "delivered":  # noqa: ASYNC110
                    await trio.sleep(0.05)
            await trio.sleep(0.5)
            assert len(receiver.received) == 1
