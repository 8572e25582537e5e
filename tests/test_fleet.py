"""A fleet of ComfyUI backends over real sockets: each backend is a simulator PROCESS started by
the test (so it can die by SIGKILL and come back on the same port, like a ComfyUI machine), the
service runs in process against them (``COMFYUI_BACKENDS``), and everything is read over HTTP:
the service's ``/job``, ``/backends``, ``/ready``, and each simulator's ``/sim/executions``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from PIL import Image

from conftest import free_port, open_service, submit

TINY = "-m tiny -w 256 -h 256"  # 4 steps
PAINTED = "-m paSanctuary -w 256 -h 256"  # 30 steps
SLOW = "-m illustriousXL -w 256 -h 256"  # 28 steps
TINY_CKPT = "tiny-sd15-random.safetensors"
PAINTED_CKPT = "paSanctuary_v10.safetensors"
TOKEN = "fleet-test-token-1234"
FINISHED = ("completed", "failed", "cancelled")


class SimProcess:
    """``python -m fategen.simulator`` on a port of its own, started, killed (SIGKILL: nothing
    of it survives, its executions neither) and started again on the same port."""

    def __init__(
        self,
        name: str,
        log_dir: Path,
        *,
        step_seconds: float = 0.01,
        checkpoints: tuple[str, ...] = (),
        token: str | None = None,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.log_dir = log_dir
        self.token = token
        self.argv = [
            sys.executable,
            "-m",
            "fategen.simulator",
            "--port",
            str(self.port),
            "--step-seconds",
            str(step_seconds),
            "--model-load-seconds",
            "0.05",
            "--name",
            name,
        ]
        for checkpoint in checkpoints:
            self.argv += ["--checkpoint", checkpoint]
        if token is not None:
            self.argv += ["--token", token]
        self.proc: trio.Process | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.token is None else {"Authorization": f"Bearer {self.token}"}

    async def start(self) -> float:
        """Start the process; returns (trio's clock) when it first answered HTTP."""
        self.starts += 1
        log = (self.log_dir / f"sim-{self.name}-{self.starts}.log").open("wb")
        try:
            self.proc = await trio.lowlevel.open_process(
                self.argv, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            log.close()
        async with httpx.AsyncClient(base_url=self.url, timeout=1) as client:
            while True:
                assert self.proc.returncode is None, self.log()
                try:
                    await client.get("/system_stats")  # any answer, 401 too
                    return trio.current_time()
                except httpx.TransportError:
                    pass
                await trio.sleep(0.02)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        with trio.move_on_after(5, shield=True):
            await self.proc.wait()

    async def executions(self) -> list[dict[str, Any]]:
        """The finished executions of the current process."""
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=5) as c:
            r = await c.get("/sim/executions")
        assert r.status_code == 200, r.text
        found: list[dict[str, Any]] = r.json()["executions"]
        return found

    def log(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.log_dir.glob(f"sim-{self.name}-*"))
        )


@contextlib.asynccontextmanager
async def open_sims(*sims: SimProcess) -> AsyncIterator[None]:
    """Start the simulators side by side; kill whichever still runs at the end."""
    try:
        async with trio.open_nursery() as nursery:
            for sim in sims:
                nursery.start_soon(sim.start)
        yield
    finally:
        for sim in sims:
            if sim.proc is not None and sim.proc.returncode is None:
                await sim.kill()


def entry(s: SimProcess, token: str | None = None) -> str:
    """``name=URL[;token=T]`` of ``COMFYUI_BACKENDS``."""
    return f"{s.name}={s.url}" + ("" if token is None else f";token={token}")


async def submit_all(client: httpx.AsyncClient, messages: list[str]) -> list[str]:
    """Submit at once (concurrent requests), each from its own nick; ids in message order."""
    ids: list[str] = [""] * len(messages)

    async def one(index: int) -> None:
        ids[index] = await submit(client, messages[index], nick=f"user{index}")

    async with trio.open_nursery() as nursery:
        for index in range(len(messages)):
            nursery.start_soon(one, index)
    return ids


async def job(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    r = await client.get(f"/job/{job_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def wait_done(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    r = await client.get(f"/wait/{job_id}", params={"timeout": 20})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["status"] in FINISHED, body
    return body


async def wait_status(client: httpx.AsyncClient, job_id: str, status: str) -> dict[str, Any]:
    """Until /job shows ``status`` (the service is polled over HTTP, as a client would)."""
    while True:
        info = await job(client, job_id)
        if info["status"] == status:
            return info
        await trio.sleep(0.02)


async def backends(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    r = await client.get("/backends")
    assert r.status_code == 200, r.text
    return {b["name"]: b for b in r.json()["backends"]}


async def wait_checked(client: httpx.AsyncClient, *names: str) -> dict[str, dict[str, Any]]:
    """Until each named backend is up and checked (it says which models it runs)."""
    views: dict[str, dict[str, Any]] = {}
    with trio.move_on_after(10):
        while True:
            views = await backends(client)
            if all(views[n]["state"] == "up" and views[n]["models"] is not None for n in names):
                return views
            await trio.sleep(0.02)
    raise AssertionError(f"{', '.join(names)} not up and checked within 10 s: {views}")


async def wait_state(client: httpx.AsyncClient, name: str, state: str) -> float:
    """Until the backend shows ``state`` in /backends; returns when (trio's clock)."""
    view: dict[str, Any] = {}
    with trio.move_on_after(10):
        while True:
            view = (await backends(client))[name]
            if view["state"] == state:
                return trio.current_time()
            await trio.sleep(0.02)
    raise AssertionError(f"{name} not {state} within 10 s: {view}")


async def admin(client: httpx.AsyncClient, name: str, action: str) -> dict[str, Any]:
    r = await client.post(f"/backends/{name}/{action}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def successes(executions: list[dict[str, Any]]) -> Counter[str]:
    return Counter(e["prompt_id"] for e in executions if e["status"] == "success")


# -- placement --------------------------------------------------------------------------------


async def test_jobs_go_where_their_checkpoint_is_installed(tmp_path: Path) -> None:
    a = SimProcess("a", tmp_path, step_seconds=0.02, checkpoints=(TINY_CKPT,))
    b = SimProcess("b", tmp_path, step_seconds=0.02, checkpoints=(TINY_CKPT, PAINTED_CKPT))
    with trio.fail_after(30):
        async with (
            open_sims(a, b),
            open_service(tmp_path, COMFYUI_BACKENDS=f"{entry(a)},{entry(b)}") as (_, client),
        ):
            views = await wait_checked(client, "a", "b")
            assert "paSanctuary" not in views["a"]["models"]
            assert "paSanctuary" in views["a"]["unavailable"]
            assert {"paSanctuary", "tiny"} <= set(views["b"]["models"])
            # a is idle all along, yet takes none of them.
            painted = await submit_all(client, [f"painted {i} {PAINTED}" for i in range(3)])
            for job_id in painted:
                done = await wait_done(client, job_id)
                assert done["status"] == "completed", done
                assert done["backend"] == "b", done
            # Several tiny jobs queued at once: both backends take some.
            tiny = await submit_all(client, [f"tiny {i} {TINY}" for i in range(6)])
            placed: Counter[str] = Counter()
            for job_id in tiny:
                done = await wait_done(client, job_id)
                assert done["status"] == "completed", done
                placed[done["backend"]] += 1
            assert set(placed) == {"a", "b"}, placed
            ran_a, ran_b = await a.executions(), await b.executions()
    assert all(e["checkpoint"] == TINY_CKPT for e in ran_a), ran_a
    assert successes(ran_b) & Counter(painted) == Counter(painted)
    assert not set(painted) & {e["prompt_id"] for e in ran_a}
    assert {e["checkpoint"] for e in ran_b if e["prompt_id"] in painted} == {PAINTED_CKPT}
    # Each tiny job ran once, on the backend /job names.
    assert successes(ran_a) + successes(ran_b) == Counter(tiny + painted)
    assert Counter(e["prompt_id"] for e in ran_a + ran_b) == Counter(tiny + painted)
    assert sum(successes(ran_a).values()) == placed["a"]


async def test_a_model_no_backend_has_is_refused_naming_what_is_missing(tmp_path: Path) -> None:
    a = SimProcess("a", tmp_path, checkpoints=(TINY_CKPT,))
    b = SimProcess("b", tmp_path, checkpoints=(TINY_CKPT, PAINTED_CKPT))
    with trio.fail_after(20):
        async with (
            open_sims(a, b),
            open_service(tmp_path, COMFYUI_BACKENDS=f"{entry(a)},{entry(b)}") as (_, client),
        ):
            await wait_checked(client, "a", "b")
            models = {m["id"]: m for m in (await client.get("/models")).json()["models"]}
            assert models["lumina2"]["available"] is False, models["lumina2"]
            assert models["paSanctuary"]["available"] is True, models["paSanctuary"]
            r = await client.post(
                "/request", json={"message": "a lighthouse -m lumina2", "nick": "alice"}
            )
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            # Only one backend has it: that one takes it.
            done = await wait_done(client, await submit(client, f"fine {PAINTED}"))
            assert done["status"] == "completed" and done["backend"] == "b", done
            ran = await a.executions() + await b.executions()
    assert "\n" not in error
    assert error.startswith('model "lumina2" cannot run now: '), error
    assert error.count('"lumina_2.safetensors" is not installed on ComfyUI a') == 1, error
    assert error.count('"lumina_2.safetensors" is not installed on ComfyUI b') == 1, error
    assert error.endswith("available: paSanctuary, tiny"), error
    assert [e["prompt_id"] for e in ran] == [done["job_id"]], ran  # the refused one never ran


# -- a backend that dies, and one that comes back ---------------------------------------------


async def test_a_backend_killed_mid_job_loses_it_to_the_other(tmp_path: Path) -> None:
    """SIGKILL of the ComfyUI running a job: the backend is down within ~2.5 s, its running
    and posted-ahead jobs show queued (never processing on the dead one) and run once on the
    survivor."""
    # illustriousXL: 28 steps of 0.04 s, so a job surely runs when its backend is killed.
    a = SimProcess("a", tmp_path, step_seconds=0.04)
    b = SimProcess("b", tmp_path, step_seconds=0.04)
    sims = {"a": a, "b": b}
    with trio.fail_after(40):
        async with (
            open_sims(a, b),
            open_service(tmp_path, COMFYUI_BACKENDS=f"{entry(a)},{entry(b)}") as (_, client),
        ):
            await wait_checked(client, "a", "b")
            ids = await submit_all(client, [f"slow {i} {SLOW}" for i in range(4)])
            while True:
                views = await backends(client)
                busy = [v for v in views.values() if v["running"]]
                if busy:
                    break
                await trio.sleep(0.02)
            victim = sims[busy[0]["name"]]
            survivor = b if victim is a else a
            (lost,) = busy[0]["running"]
            await trio.sleep(0.3)  # well into its steps
            await victim.kill()
            killed = trio.current_time()
            down_at: float | None = None
            samples: list[tuple[float, str, str | None]] = []
            while True:
                if down_at is None and (await backends(client))[victim.name]["state"] == "down":
                    down_at = trio.current_time() - killed
                info = await job(client, lost)
                samples.append((trio.current_time() - killed, info["status"], info["backend"]))
                if down_at is not None and info["status"] in FINISHED:
                    break
                await trio.sleep(0.02)
            health = (await client.get("/health")).json()
            finals = {job_id: await wait_done(client, job_id) for job_id in ids}
            views = await backends(client)
            ran = await survivor.executions()
    assert down_at is not None and down_at <= 2.5, (down_at, samples)
    assert {"name": victim.name, "state": "down"} in health["backends"], health
    on_dead = [s for s in samples if s[1] == "processing" and s[2] == victim.name]
    assert all(t < 2.5 for t, _, _ in on_dead), samples
    assert all(t < down_at + 0.5 for t, _, _ in on_dead), (down_at, samples)
    assert any(status == "queued" for _, status, _ in samples), samples
    after_down = [s for s in samples if s[0] > down_at + 0.5 and s[1] != "queued"]
    assert all(backend == survivor.name for _, _, backend in after_down), samples
    for final in finals.values():
        assert final["status"] == "completed", final
        assert final["backend"] == survivor.name, final
    # Every job ran exactly once where it completed (the dead one's record died with it).
    assert Counter(e["prompt_id"] for e in ran) == Counter(ids), ran
    assert successes(ran) == Counter(ids), ran
    assert views[victim.name]["jobs_lost"] == 1, views[victim.name]
    assert views[survivor.name]["jobs_done"] == 4, views[survivor.name]


async def test_an_img2img_job_lost_with_its_backend_is_uploaded_to_the_survivor(
    tmp_path: Path,
) -> None:
    """The image a job starts from goes to whichever backend runs it: killed on one mid-job,
    the job uploads its input again to the other, which runs it from that very image."""
    a = SimProcess("a", tmp_path, step_seconds=0.04)
    b = SimProcess("b", tmp_path, step_seconds=0.04)
    sims = {"a": a, "b": b}
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 120, 40)).save(buffer, "PNG")
    with trio.fail_after(40):
        async with (
            open_sims(a, b),
            open_service(tmp_path, COMFYUI_BACKENDS=f"{entry(a)},{entry(b)}") as (running, client),
        ):
            await wait_checked(client, "a", "b")
            r = await client.post(
                "/request",
                data={"message": f"a fox {SLOW} --strength 0.5", "nick": "al"},
                files={"image": ("fox.png", buffer.getvalue(), "image/png")},
            )
            assert r.status_code == 200, r.text
            job_id = r.json()["job_id"]
            info = await wait_status(client, job_id, "processing")
            victim = sims[info["backend"]]
            survivor = b if victim is a else a
            await trio.sleep(0.3)  # well into its steps
            await victim.kill()
            final = await wait_done(client, job_id)
            ran = await survivor.executions()
            kept = running.service.settings.output_dir / f"{job_id}-input.png"
            stored = await trio.to_thread.run_sync(kept.read_bytes)
            (record,) = [e for e in ran if e["prompt_id"] == job_id]
            (name,) = record["input_images"]
            async with httpx.AsyncClient(base_url=survivor.url, timeout=5) as comfy:
                view = await comfy.get("/view", params={"filename": name, "type": "input"})
    assert final["status"] == "completed" and final["backend"] == survivor.name, final
    assert record["status"] == "success", record
    assert view.status_code == 200 and view.content == stored  # the job's own input


async def test_a_backend_enabled_while_another_dies_takes_its_jobs_calmly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """a holds a running job and one posted ahead when it is killed; b, idle, is enabled
    just after: b runs both once a is down, and meanwhile does not hammer the dead a with
    attempts to take back the job posted ahead (one a millisecond, each with a warning, was
    seen)."""
    caplog.set_level(logging.WARNING, logger="fategen.worker")
    a = SimProcess("a", tmp_path, step_seconds=0.04)  # illustriousXL: 28 steps
    b = SimProcess("b", tmp_path, step_seconds=0.04)
    with trio.fail_after(30):
        async with (
            open_sims(a, b),
            open_service(tmp_path, COMFYUI_BACKENDS=f"{entry(a)},{entry(b)}") as (_, client),
        ):
            await wait_checked(client, "a", "b")
            await admin(client, "b", "drain")
            ids = await submit_all(client, [f"on a {i} {SLOW}" for i in range(2)])
            while True:
                view = (await backends(client))["a"]
                if view["running"] and view["ahead"]:
                    break
                await trio.sleep(0.02)
            await trio.sleep(0.3)
            await a.kill()
            await admin(client, "b", "enable")
            await wait_state(client, "a", "down")
            finals = [await wait_done(client, job_id) for job_id in ids]
            ran = await b.executions()
    for final in finals:
        assert final["status"] == "completed" and final["backend"] == "b", final
    assert successes(ran) == Counter(ids), ran
    attempts = [r.getMessage() for r in caplog.records if "could not take job" in r.getMessage()]
    assert len(attempts) <= 5, f"{len(attempts)} take-back attempts, the first: {attempts[:1]}"


async def test_a_backend_that_comes_back_is_used_again(tmp_path: Path) -> None:
    a = SimProcess("a", tmp_path)
    b = SimProcess("b", tmp_path)
    with trio.fail_after(30):
        async with (
            open_sims(a, b),
            open_service(tmp_path, COMFYUI_BACKENDS=f"{entry(a)},{entry(b)}") as (_, client),
        ):
            await wait_checked(client, "a", "b")
            await a.kill()
            killed = trio.current_time()
            await wait_state(client, "a", "down")
            meanwhile = await submit_all(client, [f"meanwhile {i} {TINY}" for i in range(2)])
            for job_id in meanwhile:
                done = await wait_done(client, job_id)
                assert done["status"] == "completed" and done["backend"] == "b", done
            # Down for a while (reconnect attempts stay at most 1 s apart), then back.
            await trio.sleep_until(killed + 3)
            answered = await a.start()  # a new process on the same port
            up = await wait_state(client, "a", "up")
            await wait_checked(client, "a")
            await admin(client, "b", "drain")
            ids = await submit_all(client, [f"back {i} {TINY}" for i in range(3)])
            finals = [await wait_done(client, job_id) for job_id in ids]
            ran_a, ran_b = await a.executions(), await b.executions()
    assert up - answered <= 2.0, up - answered
    for final in finals:
        assert final["status"] == "completed" and final["backend"] == "a", final
    assert successes(ran_a) == Counter(ids), ran_a
    assert successes(ran_b) == Counter(meanwhile), ran_b  # only those run while a was down


# -- the operator -----------------------------------------------------------------------------


async def test_drain_and_enable(tmp_path: Path) -> None:
    a = SimProcess("a", tmp_path, step_seconds=0.01)
    b = SimProcess("b", tmp_path, step_seconds=0.25)  # tiny: 1 s a job
    with trio.fail_after(30):
        async with (
            open_sims(a, b),
            open_service(tmp_path, COMFYUI_BACKENDS=f"{entry(a)},{entry(b)}") as (_, client),
        ):
            await wait_checked(client, "a", "b")
            assert (await client.get("/ready")).status_code == 200
            # A job that runs on b while b is drained.
            assert (await admin(client, "a", "drain"))["state"] == "drained"
            held = await submit(client, f"held {TINY}")
            info = await wait_status(client, held, "processing")
            assert info["backend"] == "b", info
            assert (await admin(client, "a", "enable"))["state"] == "up"
            drained = await admin(client, "b", "drain")
            assert drained["state"] == "draining" and drained["enabled"] is False, drained
            ids = await submit_all(client, [f"elsewhere {i} {TINY}" for i in range(4)])
            finals = [await wait_done(client, job_id) for job_id in ids]
            held_final = await wait_done(client, held)
            assert (await backends(client))["b"]["state"] == "drained"

            unknown = await client.post("/backends/nope/drain")
            assert unknown.status_code == 404, unknown.text
            assert unknown.json()["error"] == "there is no backend 'nope' (there are: a, b)"

            await admin(client, "a", "drain")
            not_ready = await client.get("/ready")
            assert not_ready.status_code == 503, not_ready.text
            reason = not_ready.json()["reason"]
            assert "a is drained" in reason and "b is drained" in reason, reason
            assert (await admin(client, "b", "enable"))["state"] == "up"
            assert (await client.get("/ready")).status_code == 200
            again = await wait_done(client, await submit(client, f"again {TINY}"))
            ran_a, ran_b = await a.executions(), await b.executions()
    for final in finals:
        assert final["status"] == "completed" and final["backend"] == "a", final
    assert held_final["status"] == "completed" and held_final["backend"] == "b", held_final
    assert again["status"] == "completed" and again["backend"] == "b", again
    assert successes(ran_a) == Counter(ids), ran_a
    assert successes(ran_b) == Counter([held, again["job_id"]]), ran_b


# -- a token per backend ----------------------------------------------------------------------


async def test_a_backend_with_its_token_runs_jobs(tmp_path: Path) -> None:
    locked = SimProcess("locked", tmp_path, token=TOKEN)
    plain = SimProcess("plain", tmp_path)
    backends_env = f"{entry(locked, TOKEN)},{entry(plain)}"
    with trio.fail_after(20):
        async with (
            open_sims(locked, plain),
            open_service(tmp_path, COMFYUI_BACKENDS=backends_env) as (_, client),
        ):
            await wait_checked(client, "locked", "plain")
            await admin(client, "plain", "drain")
            ids = await submit_all(client, [f"locked {i} {TINY}" for i in range(2)])
            finals = [await wait_done(client, job_id) for job_id in ids]
            ran = await locked.executions()
    for final in finals:
        assert final["status"] == "completed" and final["backend"] == "locked", final
    assert successes(ran) == Counter(ids), ran


async def test_a_backend_with_a_wrong_token_never_comes_up(tmp_path: Path) -> None:
    locked = SimProcess("locked", tmp_path, token=TOKEN)
    plain = SimProcess("plain", tmp_path)
    backends_env = f"{entry(locked, 'not-the-token')},{entry(plain)}"
    with trio.fail_after(20):
        async with (
            open_sims(locked, plain),
            open_service(tmp_path, COMFYUI_BACKENDS=backends_env) as (_, client),
        ):
            started = trio.current_time()
            await wait_checked(client, "plain")
            ids = await submit_all(client, [f"plain {i} {TINY}" for i in range(3)])
            states: set[str] = set()
            finals = []
            for job_id in ids:
                finals.append(await wait_done(client, job_id))
                states.add((await backends(client))["locked"]["state"])
            # Long enough for several connection attempts.
            while trio.current_time() < started + 2:
                states.add((await backends(client))["locked"]["state"])
                await trio.sleep(0.1)
            view = (await backends(client))["locked"]
            ran = await locked.executions()
    assert states <= {"connecting", "down"}, states
    assert view["state"] == "down", view
    assert view["models"] is None, view
    assert "401" in (view["last_error"] or ""), view
    for final in finals:
        assert final["status"] == "completed" and final["backend"] == "plain", final
    assert ran == [], ran
