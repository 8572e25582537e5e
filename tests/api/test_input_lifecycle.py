"""The life of a job's input image (``<output>/<job id>-input.png``), over real sockets on the
simulator: kept across a kill and a restart and uploaded to ComfyUI when the job runs (again,
to a ComfyUI that lost it), removed at start-up when no job has it, deleted by retention with
its job, copied for an operator's retry, written once per Idempotency-Key, never left behind
by a refusal, and kept (not uploaded) for a job cancelled while it waited."""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import trio

from conftest import ImageServer, Stack, open_stack, png, solid
from fategen.simulator import Simulator, SimulatorKnobs
from fategen.store.jobs import JobStatus
from fategen.store.retention import input_path, prune
from test_durability import open_setup

TINY = "-m tiny -w 256 -h 256"
#: The operator's allowance for a test's image server (a private address otherwise).
LOCAL = {"FATEGEN_IMAGE_ALLOW_NETWORKS": "127.0.0.1/32"}
GREEN = png(solid((30, 160, 60), (320, 256)))
BLUE = png(solid((20, 40, 230), (200, 300)))


async def upload(
    client: httpx.AsyncClient,
    message: str,
    data: bytes = GREEN,
    nick: str = "al",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST /request as multipart/form-data, ``data`` as the file field ``image``."""
    return await client.post(
        "/request",
        data={"message": message, "nick": nick},
        files={"image": ("in.png", data, "image/png")},
        headers=headers or {},
    )


async def accepted(client: httpx.AsyncClient, message: str, data: bytes = GREEN, **kw: Any) -> str:
    """`upload`, which must be accepted; the new job's id."""
    r = await upload(client, message, data, **kw)
    assert r.status_code == 200, r.text
    job_id: str = r.json()["job_id"]
    return job_id


def output_of(stack: Stack) -> Path:
    return stack.running.settings.output_dir


async def inputs(output: Path) -> list[str]:
    """The input images kept in the output folder (their names, sorted)."""
    return sorted(p.name for p in await trio.Path(output).glob("*-input.png"))


async def kept(output: Path, job_id: str) -> bytes:
    return await trio.Path(input_path(output, job_id)).read_bytes()


def upload_name(data: bytes) -> str:
    """The name fategen uploads an input image under (a name of its content)."""
    return f"fategen-{hashlib.sha256(data).hexdigest()[:24]}.png"


def uploaded(sim: Simulator) -> list[str]:
    """What fategen uploaded to the simulated ComfyUI's input folder."""
    return [name for name in sim.store.input_images() if name.startswith("fategen-")]


def inputs_of_run(sim: Simulator, job_id: str) -> tuple[str, ...]:
    """The ``LoadImage`` images of the job's one run on the simulator."""
    (record,) = [e for e in sim.executions if e.prompt_id == job_id]
    return record.input_images


async def wait_processing(stack: Stack, job_id: str) -> None:
    """Until fategen has seen the job start on ComfyUI (it no longer counts as queued)."""
    store = stack.running.store
    while (job := store.held(job_id)) is not None and job.status is not JobStatus.PROCESSING:
        await store.wait_change(job_id)


def one_line(r: httpx.Response, status: int, fragment: str) -> None:
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert fragment in message and "\n" not in message, message


async def test_a_paused_img2img_job_survives_a_kill_and_is_uploaded_after_it(
    tmp_path: Path,
) -> None:
    knobs = SimulatorKnobs(step_seconds=0.002, model_load_seconds=0.0)
    output = tmp_path / "output"
    with trio.fail_after(40):
        async with open_setup(tmp_path, knobs) as (sim, service):
            await service.start()
            async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
                assert (await client.post("/queue/pause")).status_code == 200
                job_id = await accepted(client, f"a meadow {TINY}")
            await service.kill()  # SIGKILL: no shutdown code runs
            before = await kept(output, job_id)
            assert sim.executions == [] and uploaded(sim) == []

            await service.start()
            async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
                assert (await client.get("/queue")).json()["paused"] is True
                assert (await client.get(f"/job/{job_id}")).json()["status"] == "queued"
                assert (await client.post("/queue/resume")).status_code == 200
                r = await client.get(f"/wait/{job_id}", params={"timeout": 20})
                assert r.status_code == 200 and r.json()["status"] == "completed", r.text
                assert r.json()["kind"] == "img2img"
                r = await client.get(f"/job/{job_id}/input")
                assert r.status_code == 200 and r.content == before
    assert await kept(output, job_id) == before
    assert [e.prompt_id for e in sim.executions] == [job_id]
    assert sim.executions[-1].input_images == (upload_name(before),)
    stored = sim.store.get("input", "", upload_name(before))
    assert stored is not None and stored.data == before


async def test_a_job_posted_ahead_at_a_stop_is_uploaded_again_to_a_new_comfyui(
    tmp_path: Path,
) -> None:
    """The img2img job is uploaded and posted behind a hanging one; fategen stops (the
    prompt posted ahead is withdrawn) and ComfyUI is replaced by one that has no files:
    after the restart the job uploads its input again and completes."""
    knobs = SimulatorKnobs(step_seconds=0.002, model_load_seconds=0.0, hang=1)
    env = {"FATEGEN_SHUTDOWN_GRACE": "0"}
    with trio.fail_after(40):
        async with open_stack(tmp_path, knobs, **env) as stack:
            blocker = (await stack.submit(f"stuck {TINY}"))["job_id"]
            await stack.sim.wait_running(blocker)
            job_id = await accepted(stack.client, f"a meadow {TINY}")
            store = stack.running.store
            job = store.held(job_id)
            assert job is not None
            while job.submitted is None:  # uploaded, and on its way to ComfyUI's queue
                await store.wait_change(job_id)
            before = await kept(output_of(stack), job_id)
            assert uploaded(stack.sim) == [upload_name(before)]
        async with open_stack(tmp_path, None, **env) as stack:
            assert uploaded(stack.sim) == []
            done = await stack.wait(job_id)
            assert done["status"] == "completed", done
            assert (await stack.wait(blocker))["status"] == "completed"
            assert await kept(output_of(stack), job_id) == before
            assert inputs_of_run(stack.sim, job_id) == (upload_name(before),)
            stored = stack.sim.store.get("input", "", upload_name(before))
            assert stored is not None and stored.data == before


async def test_orphan_inputs_are_removed_at_start_and_jobs_inputs_are_kept(
    tmp_path: Path,
) -> None:
    output = tmp_path / "output"
    with trio.fail_after(30):
        async with open_stack(tmp_path) as stack:
            done = await stack.wait(await accepted(stack.client, f"a meadow {TINY}"))
            assert done["status"] == "completed", done
            await stack.client.post("/queue/pause")
            waiting = await accepted(stack.client, f"a lake {TINY}", BLUE)
        finished = done["job_id"]
        before = {i: await kept(output, i) for i in (finished, waiting)}
        # What a crash between writing an input and committing its job leaves, and a crash
        # while writing one.
        never_added = uuid.uuid4()
        orphan = trio.Path(output / f"{never_added}-input.png")
        await orphan.write_bytes(GREEN)
        partial = trio.Path(output / f".{never_added}-input.png.0123456789abcdef.tmp")
        await partial.write_bytes(GREEN[:100])
        async with open_stack(tmp_path) as stack:
            assert not await orphan.exists() and not await partial.exists()
            assert await inputs(output) == sorted(f"{i}-input.png" for i in before)
            for job_id, data in before.items():
                r = await stack.client.get(f"/job/{job_id}/input")
                assert r.status_code == 200 and r.content == data
            assert (await stack.client.get(f"/job/{waiting}")).json()["status"] == "queued"
            await stack.client.post("/queue/resume")
            assert (await stack.wait(waiting))["status"] == "completed"
            assert inputs_of_run(stack.sim, waiting) == (upload_name(before[waiting]),)


async def test_retention_deletes_a_finished_jobs_input_with_its_row(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_stack(tmp_path) as stack:
            output, store = output_of(stack), stack.running.store
            first = await accepted(stack.client, f"a meadow {TINY}")
            assert (await stack.wait(first))["status"] == "completed"
            vary = (await stack.submit(f"--vary {first}:1"))["job_id"]
            assert (await stack.wait(vary))["status"] == "completed"
            await stack.client.post("/queue/pause")
            waiting = await accepted(stack.client, f"a lake {TINY}", BLUE)
            upscale = (await stack.submit(f"--upscale {first}:1"))["job_id"]
            assert await inputs(output) == sorted(
                f"{i}-input.png" for i in (first, vary, waiting, upscale)
            )
            images = {i: await kept(output, i) for i in (waiting, upscale)}

            pruned = await prune(store, output, max_age=0, now=time.time() + 10)
            assert pruned == 2
            for job_id in (first, vary):
                assert await store.get(job_id) is None
                r = await stack.client.get(f"/job/{job_id}/input")
                assert r.status_code == 404, r.text
            # Queued jobs are never pruned: only their inputs are left.
            assert sorted(p.name for p in await trio.Path(output).iterdir()) == sorted(
                f"{i}-input.png" for i in images
            )
            for job_id, data in images.items():
                r = await stack.client.get(f"/job/{job_id}/input")
                assert r.status_code == 200 and r.content == data
            # The upscale runs from its own copy of the image of the job pruned meanwhile.
            await stack.client.post("/queue/resume")
            for job_id, data in images.items():
                assert (await stack.wait(job_id))["status"] == "completed"
                assert inputs_of_run(stack.sim, job_id) == (upload_name(data),)


async def test_a_retried_img2img_job_has_its_own_copy_of_the_input(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_stack(tmp_path) as stack:
            output = output_of(stack)
            stack.sim.knobs.execution_error = 1
            failed = await accepted(stack.client, f"a meadow {TINY}")
            assert (await stack.wait(failed))["status"] == "failed"
            original = await kept(output, failed)

            r = await stack.client.post(f"/job/{failed}/retry")
            assert r.status_code == 200, r.text
            again = r.json()["job_id"]
            assert again != failed and r.json()["retry_of"] == failed
            done = await stack.wait(again)
            assert done["status"] == "completed", done
            assert done["kind"] == "img2img" and done["input"]["source"] == "upload"
            assert await kept(output, again) == original
            r = await stack.client.get(f"/job/{again}/input")
            assert r.status_code == 200 and r.content == original
            r = await stack.client.get(f"/job/{failed}/input")  # the failed job keeps its own
            assert r.status_code == 200 and r.content == original
            assert inputs_of_run(stack.sim, again) == (upload_name(original),)

            # A failed job whose input is gone cannot be retried, and leaves nothing.
            stack.sim.knobs.execution_error = 1
            lost = await accepted(stack.client, f"a lake {TINY}", BLUE)
            assert (await stack.wait(lost))["status"] == "failed"
            await trio.Path(input_path(output, lost)).unlink()
            before = await inputs(output)
            r = await stack.client.post(f"/job/{lost}/retry")
            one_line(r, 410, "no longer kept")
            assert await inputs(output) == before
            assert stack.running.store.count_queued() == 0


async def test_one_idempotency_key_makes_one_job_and_one_input(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_stack(tmp_path) as stack:
            output = output_of(stack)
            key = {"Idempotency-Key": "meadow-1"}
            first = await upload(stack.client, f"a meadow {TINY}", headers=key)
            second = await upload(stack.client, f"a meadow {TINY}", headers=key)
            assert first.status_code == second.status_code == 200, (first.text, second.text)
            job_id = first.json()["job_id"]
            assert second.json()["job_id"] == job_id
            assert "Idempotent-Replayed" not in first.headers
            assert second.headers["Idempotent-Replayed"] == "true"
            assert await inputs(output) == [f"{job_id}-input.png"]

            # Sent at once: the second waits for the first, and finds it.
            answers: list[httpx.Response] = []

            async def send() -> None:
                headers = {"Idempotency-Key": "lake-1"}
                answers.append(await upload(stack.client, f"a lake {TINY}", BLUE, headers=headers))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(send)
            assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
            (lake,) = {a.json()["job_id"] for a in answers}
            assert sorted(a.headers.get("Idempotent-Replayed", "") for a in answers) == [
                "",
                "true",
            ]
            assert await inputs(output) == sorted(f"{i}-input.png" for i in (job_id, lake))
            for i in (job_id, lake):
                assert (await stack.wait(i))["status"] == "completed"

            up = {"Idempotency-Key": "up-1"}
            one = await stack.submit(f"--upscale {job_id}:1", headers=up)
            two = await stack.client.post(
                "/request", json={"message": f"--upscale {job_id}:1", "nick": "alice"}, headers=up
            )
            assert two.status_code == 200 and two.json()["job_id"] == one["job_id"], two.text
            assert two.headers["Idempotent-Replayed"] == "true"
            assert (await stack.wait(one["job_id"]))["status"] == "completed"
            assert await inputs(output) == sorted(
                f"{i}-input.png" for i in (job_id, lake, one["job_id"])
            )
            ran = [e.prompt_id for e in stack.sim.executions]
            assert sorted(ran) == sorted([job_id, lake, one["job_id"]])


async def test_a_follow_up_is_replayed_after_the_job_it_follows_is_pruned(
    tmp_path: Path,
) -> None:
    """The Idempotency-Key of a follow-up still names its job once the earlier job is gone:
    a bot's retry gets the queued upscale back, not a refusal."""
    with trio.fail_after(30):
        async with open_stack(tmp_path) as stack:
            base = (await stack.submit(f"a fox {TINY}"))["job_id"]
            assert (await stack.wait(base))["status"] == "completed"
            await stack.client.post("/queue/pause")
            key = {"Idempotency-Key": "up-2"}
            up = (await stack.submit(f"--upscale {base}:1", headers=key))["job_id"]
            output = output_of(stack)
            assert await prune(stack.running.store, output, max_age=0, now=time.time() + 10) == 1
            r = await stack.client.post(
                "/request", json={"message": f"--upscale {base}:1", "nick": "alice"}, headers=key
            )
            assert r.status_code == 200, r.text
            assert r.json()["job_id"] == up and r.headers["Idempotent-Replayed"] == "true"
            assert await inputs(output) == [f"{up}-input.png"]


async def test_a_follow_up_route_is_replayed_after_the_job_it_follows_is_pruned(
    tmp_path: Path,
) -> None:
    """The same through ``POST /job/{id}/upscale``: the route does not look the earlier job
    up before the replay is."""
    with trio.fail_after(30):
        async with open_stack(tmp_path) as stack:
            base = (await stack.submit(f"a fox {TINY}"))["job_id"]
            assert (await stack.wait(base))["status"] == "completed"
            await stack.client.post("/queue/pause")
            key = {"Idempotency-Key": "up-3"}
            body = {"nick": "alice", "n": 1}
            first = await stack.client.post(f"/job/{base}/upscale", json=body, headers=key)
            assert first.status_code == 200, first.text
            output = output_of(stack)
            assert await prune(stack.running.store, output, max_age=0, now=time.time() + 10) == 1
            again = await stack.client.post(f"/job/{base}/upscale", json=body, headers=key)
            assert again.status_code == 200, again.text
            assert again.json()["job_id"] == first.json()["job_id"]
            assert again.headers["Idempotent-Replayed"] == "true"
            fresh = await stack.client.post(f"/job/{base}/upscale", json=body)
            one_line(fresh, 400, f"there is no job {base} to follow up on")


async def test_an_img2img_job_refused_by_a_cap_leaves_no_input(tmp_path: Path) -> None:
    env = {"FATEGEN_MAX_QUEUE_PER_USER": "1", "FATEGEN_SHUTDOWN_GRACE": "0", **LOCAL}
    with trio.fail_after(30):
        async with (
            ImageServer({"cat.png": GREEN}).running() as server,
            open_stack(tmp_path, None, **env) as stack,
        ):
            output = output_of(stack)
            stack.sim.knobs.execution_error = 1
            failed = await accepted(stack.client, f"a meadow {TINY}", nick="bo")
            assert (await stack.wait(failed))["status"] == "failed"
            stack.sim.knobs.hang = 1
            blocker = (await stack.submit(f"stuck {TINY}", nick="al"))["job_id"]
            await wait_processing(stack, blocker)
            await stack.client.post("/queue/pause")  # what is queued stays queued
            await stack.submit(f"waiting {TINY}", nick="al")
            before = await inputs(output)
            assert before == [f"{failed}-input.png"]

            r = await upload(stack.client, f"a meadow {TINY}", nick="al")
            one_line(r, 429, "already has 1 jobs queued")
            assert r.headers["Retry-After"] == "30"
            r = await stack.client.post(
                "/request",
                json={
                    "message": f"a cat {TINY}",
                    "nick": "al",
                    "image_url": f"{server.base}/cat.png",
                },
            )
            one_line(r, 429, "already has 1 jobs queued")
            assert server.seen == []  # refused before the fetch
            assert await inputs(output) == before

            # Two at once from a nick with nothing queued: one is taken, the other refused
            # (by the first look at the caps, or by the second once its image was kept).
            answers: list[httpx.Response] = []

            async def send(data: bytes) -> None:
                answers.append(await upload(stack.client, f"a lake {TINY}", data, nick="bo"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, GREEN)
                nursery.start_soon(send, BLUE)
            assert sorted(a.status_code for a in answers) == [200, 429], [a.text for a in answers]
            (taken,) = [a.json()["job_id"] for a in answers if a.status_code == 200]
            assert await inputs(output) == sorted([*before, f"{taken}-input.png"])

            # A retry over the cap: its copy of the input is deleted again.
            r = await stack.client.post(f"/job/{failed}/retry")
            one_line(r, 429, "already has 1 jobs queued")
            assert await inputs(output) == sorted([*before, f"{taken}-input.png"])


async def test_follow_ups_on_gone_images_and_bad_ids_are_refused(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_stack(tmp_path) as stack:
            output, store = output_of(stack), stack.running.store
            one = (await stack.submit(f"a fox {TINY}"))["job_id"]
            two = (await stack.submit(f"two foxes {TINY} -c 2"))["job_id"]
            for job_id in (one, two):
                assert (await stack.wait(job_id))["status"] == "completed"
            await trio.Path(output / f"{one}.webp").unlink()
            await trio.Path(output / f"{two}-2.webp").unlink()

            for message in (f"--upscale {one}:1", f"--vary {one}:1", f"--vary {two}:2"):
                r = await stack.client.post("/request", json={"message": message, "nick": "al"})
                one_line(r, 410, "no longer kept")
            r = await stack.client.post(f"/job/{one}/upscale", json={"nick": "al", "n": 1})
            one_line(r, 410, "no longer kept")
            r = await stack.client.post(f"/job/{one}/vary", json={"nick": "al", "n": 1})
            one_line(r, 410, "no longer kept")
            assert store.count_queued() == 0 and await inputs(output) == []
            # Image 1 of the job of two is still there.
            vary = (await stack.submit(f"--vary {two}:1"))["job_id"]
            assert (await stack.wait(vary))["status"] == "completed"

            # A real image where a path out of the output folder would lead: never read.
            await trio.Path(output.parent / "secret.webp").write_bytes(
                await trio.Path(output / f"{two}-1.webp").read_bytes()
            )
            for bad in ("../../etc/passwd", "../secret", "not-a-uuid", f"{two}/../{two}"):
                for kind in ("upscale", "vary"):
                    r = await stack.client.post(
                        "/request", json={"message": f"--{kind} {bad}:1", "nick": "al"}
                    )
                    one_line(r, 400, "needs an earlier job's id")
            for bad in ("not-a-uuid", "..%2F..%2Fetc%2Fpasswd", "..%2Fsecret"):
                r = await stack.client.post(f"/job/{bad}/upscale", json={"nick": "al", "n": 1})
                assert r.status_code == 404, r.text
                assert "\n" not in r.json()["error"]
            assert store.count_queued() == 0
            assert await inputs(output) == [f"{vary}-input.png"]


async def test_a_job_cancelled_while_queued_keeps_its_input_until_retention(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with open_stack(tmp_path) as stack:
            output, store = output_of(stack), stack.running.store
            await stack.client.post("/queue/pause")
            job_id = await accepted(stack.client, f"a meadow {TINY}")
            r = await stack.client.delete(f"/job/{job_id}", params={"nick": "al"})
            assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
            await stack.client.post("/queue/resume")
            later = (await stack.submit(f"a fox {TINY}"))["job_id"]
            assert (await stack.wait(later))["status"] == "completed"  # the queue ran past it

            assert [e.prompt_id for e in stack.sim.executions] == [later]
            assert uploaded(stack.sim) == []
            original = await kept(output, job_id)
            r = await stack.client.get(f"/job/{job_id}/input")
            assert r.status_code == 200 and r.content == original

            # Retried, it runs from the same image (uploaded only now).
            r = await stack.client.post(f"/job/{job_id}/retry")
            assert r.status_code == 200, r.text
            again = r.json()["job_id"]
            assert (await stack.wait(again))["status"] == "completed"
            assert inputs_of_run(stack.sim, again) == (upload_name(original),)

            assert await prune(store, output, max_age=0, now=time.time() + 10) == 3
            assert await store.get(job_id) is None
            assert await inputs(output) == []
