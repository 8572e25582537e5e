"""Jobs that start from an image, over real sockets, end to end on the simulator: ``--image
URL`` (fetched at accept from a real HTTP server on 127.0.0.1, which the SSRF guard refuses
unless the operator allows it), a multipart upload, and the follow-ups ``--upscale`` and
``--vary`` (also ``POST /job/{id}/upscale``), with the input uploaded to ComfyUI as it runs."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import trio
from PIL import Image, ImageChops, ImageStat

from conftest import ImageServer, open_stack

TINY = "-m tiny"
#: The operator's allowance for the test's image server (a private address otherwise).
LOCAL = {"FATEGEN_IMAGE_ALLOW_NETWORKS": "127.0.0.1/32"}


def png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def decoded(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def distance(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference per channel (0 to 255), at ``a``'s size."""
    diff = ImageChops.difference(a, b.resize(a.size))
    return sum(ImageStat.Stat(diff).mean) / 3


async def image_of(client: httpx.AsyncClient, url: str) -> Image.Image:
    r = await client.get(url)
    assert r.status_code == 200, r.text
    return decoded(r.content)


async def test_a_job_starts_from_an_image_url(tmp_path: Path) -> None:
    red = png((640, 480), (220, 30, 30))
    async with (
        ImageServer({"cat.png": red}).running() as server,
        open_stack(tmp_path, **LOCAL) as stack,
    ):
        url = f"{server.base}/cat.png?ex=1&hm=signed"
        job = await stack.submit(f"a cat --image {url} --strength 0.2 {TINY}")
        assert server.seen == [("cat.png", server.base.removeprefix("http://"))]  # at accept
        done = await stack.wait(job["job_id"])
        assert done["status"] == "completed", done
        assert done["kind"] == "img2img"
        # The source without its signed query: anyone may read a job.
        assert done["input"]["source"] == f"{server.base}/cat.png"
        assert done["input"]["strength"] == 0.2
        # tiny draws 512x512: the image's 4:3 at that pixel count, sides multiples of 64
        assert (done["width"], done["height"]) == (576, 448)
        kept = await image_of(stack.client, done["input"]["url"])
        assert kept.size == (576, 448)
        assert distance(kept, decoded(red)) < 2
        result = await image_of(stack.client, done["image_url"])
        assert result.size == (576, 448)
        assert distance(result, decoded(red)) < 60  # mostly the input, at strength 0.2
        (record,) = stack.sim.executions
        (uploaded,) = record.input_images
        assert uploaded.startswith("fategen-") and uploaded.endswith(".png")
        assert len(server.seen) == 1  # fetched once, when accepted


async def test_the_ssrf_guard_refuses_a_private_address(tmp_path: Path) -> None:
    red = png((64, 64), (200, 0, 0))
    async with ImageServer({"cat.png": red}).running() as server, open_stack(tmp_path) as stack:
        for url in (f"{server.base}/cat.png", f"http://localhost:{server.base.rsplit(':', 1)[1]}/"):
            r = await stack.client.post(
                "/request", json={"message": f"a cat --image {url} {TINY}", "nick": "al"}
            )
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert "loopback" in error and "\n" not in error
        assert server.seen == []  # refused before connecting
        assert stack.running.store.count_queued() == 0
        output = stack.running.service.settings.output_dir
        assert not await trio.to_thread.run_sync(lambda: list(output.glob("*-input.png")))


async def test_a_redirect_to_a_private_address_is_refused(tmp_path: Path) -> None:
    async with ImageServer({}).running() as server, open_stack(tmp_path, **LOCAL) as stack:
        r = await stack.client.post(
            "/request",
            json={"message": f"a cat {TINY}", "nick": "al", "image_url": f"{server.base}/away"},
        )
        assert r.status_code == 422, r.text
        assert "10.1.2.3" in r.json()["error"]
        r = await stack.client.post(
            "/request",
            json={"message": f"a cat {TINY}", "nick": "al", "image_url": f"{server.base}/x"},
        )
        assert r.status_code == 422 and "404" in r.json()["error"], r.text


async def test_a_multipart_upload(tmp_path: Path) -> None:
    blue = png((300, 600), (20, 40, 230))
    async with open_stack(tmp_path) as stack:
        r = await stack.client.post(
            "/request",
            data={"message": f"a cat --strength 0.1 {TINY}", "nick": "al", "previews": "false"},
            files={"image": ("blue.png", blue, "image/png")},
        )
        assert r.status_code == 200, r.text
        done = await stack.wait(r.json()["job_id"])
        assert done["status"] == "completed", done
        assert done["input"]["source"] == "upload"
        assert abs(done["width"] / done["height"] - 0.5) < 0.1
        result = await image_of(stack.client, done["image_url"])
        assert distance(result, decoded(blue)) < 40


async def test_bad_uploads_are_refused_in_one_line(tmp_path: Path) -> None:
    async with open_stack(tmp_path, FATEGEN_IMAGE_MAX_MIB="1") as stack:
        cases: list[tuple[Any, int, str]] = [
            (b"GIF87a nope", 422, "not a PNG, JPEG, WebP, GIF or BMP"),
            (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, 422, "the input image"),
            (b"x" * (2 * 2**20), 413, "at most 1 MiB"),
            (b"", 422, "empty"),
        ]
        for data, status, fragment in cases:
            r = await stack.client.post(
                "/request",
                data={"message": f"a cat {TINY}", "nick": "al"},
                files={"image": ("x.png", data, "image/png")},
            )
            assert r.status_code == status, (data[:10], r.text)
            assert fragment in r.json()["error"] and "\n" not in r.json()["error"]
        assert stack.running.store.count_queued() == 0


async def test_upscale_and_vary_an_earlier_image(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        first = await stack.submit(f"a fox in snow -c 2 -w 256 -h 320 {TINY}")
        base = await stack.wait(first["job_id"])
        assert base["status"] == "completed", base
        one, two = [await image_of(stack.client, url) for url in base["images"]]
        job_id = base["job_id"]

        up = await stack.submit(f"--upscale {job_id}:2")
        done = await stack.wait(up["job_id"])
        assert done["status"] == "completed", done
        assert done["kind"] == "upscale"
        assert (done["width"], done["height"], done["count"]) == (512, 640, 1)
        assert (done["prompt"], done["seed"], done["model"]) == (
            "a fox in snow",
            base["seed"],
            "tiny",
        )
        assert done["input"]["job_id"] == job_id and done["input"]["image"] == 2
        upscaled = await image_of(stack.client, done["image_url"])
        assert upscaled.size == (512, 640)
        assert distance(upscaled, two) < distance(upscaled, one)  # it is image 2, larger

        vary = await stack.submit(f"--vary {job_id}:1 -c 1")
        done = await stack.wait(vary["job_id"])
        assert done["status"] == "completed", done
        assert done["kind"] == "img2img" and (done["width"], done["height"]) == (256, 320)
        assert done["seed"] != base["seed"]
        kept = await image_of(stack.client, done["input"]["url"])
        assert distance(kept, one) < 3

        r = await stack.client.post(
            f"/job/{job_id}/upscale",
            json={"nick": "bob", "n": 1},
            headers={"Idempotency-Key": "up-1"},
        )
        assert r.status_code == 200, r.text
        again = await stack.client.post(
            f"/job/{job_id}/upscale",
            json={"nick": "bob", "n": 1},
            headers={"Idempotency-Key": "up-1"},
        )
        assert again.json()["job_id"] == r.json()["job_id"]
        assert again.headers["Idempotent-Replayed"] == "true"
        done = await stack.wait(r.json()["job_id"])
        assert done["status"] == "completed" and done["nick"] == "bob"

        r = await stack.client.post(f"/job/{job_id}/upscale", json={"nick": "bob", "n": 3})
        assert r.status_code == 400 and "pick 1 to 2" in r.json()["error"]


async def test_follow_ups_need_a_completed_job(tmp_path: Path) -> None:
    from fategen.simulator import SimulatorKnobs

    knobs = SimulatorKnobs(step_seconds=0.002, model_load_seconds=0.0, hang=1)
    async with open_stack(tmp_path, knobs) as stack:
        running = await stack.submit(f"a cat {TINY}")
        r = await stack.client.post(
            "/request", json={"message": f"--vary {running['job_id']}:1", "nick": "al"}
        )
        assert r.status_code == 409 and "works on a completed job" in r.json()["error"]
        missing = "3f0c2a9e-5b7d-4c1e-9a8f-1d2e3c4b5a69"
        r = await stack.client.post(
            "/request", json={"message": f"--upscale {missing}:1", "nick": "al"}
        )
        assert r.status_code == 400 and "there is no job" in r.json()["error"]
        r = await stack.client.get(f"/job/{running['job_id']}/input")
        assert r.status_code == 404 and "draws from text" in r.json()["error"]


async def test_a_chunked_upload_past_the_limit_is_refused(tmp_path: Path) -> None:
    async with open_stack(tmp_path, FATEGEN_IMAGE_MAX_MIB="1") as stack:
        boundary = "fategenboundary"

        async def body() -> AsyncIterator[bytes]:
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="message"\r\n\r\n'
                f"a cat {TINY}\r\n--{boundary}\r\n"
                'Content-Disposition: form-data; name="nick"\r\n\r\nal\r\n'
                f"--{boundary}\r\n"
                'Content-Disposition: form-data; name="image"; filename="x.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            )
            yield head.encode()
            for _ in range(5 * 16):  # 5 MiB, no Content-Length: chunked
                yield b"x" * 65536
            yield f"\r\n--{boundary}--\r\n".encode()

        r = await stack.client.post(
            "/request",
            content=body(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert r.status_code == 413, r.text
        assert "at most 1 MiB" in r.json()["error"]
        assert stack.running.store.count_queued() == 0


async def test_fetches_hold_a_place_under_the_caps(tmp_path: Path) -> None:
    red = png((64, 64), (200, 0, 0))
    env = {**LOCAL, "FATEGEN_MAX_QUEUE_PER_USER": "2"}
    async with (
        ImageServer({"cat.png": red}).running() as server,
        open_stack(tmp_path, **env) as stack,
    ):
        codes: list[int] = []
        refused = trio.Event()

        async def submit() -> None:
            r = await stack.client.post(
                "/request",
                json={"message": f"a cat --image {server.base}/held/cat.png {TINY}", "nick": "al"},
            )
            codes.append(r.status_code)
            if codes.count(429) == 8:
                refused.set()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(submit)
                await refused.wait()  # eight refused while two fetches are held
                assert codes == [429] * 8
                assert len(server.seen) <= 2  # only the two with a place fetch
                server.release.set()
        assert sorted(codes) == [200] * 2 + [429] * 8
        assert len(server.seen) == 2


async def test_an_idempotency_key_replay_must_send_the_same_image(tmp_path: Path) -> None:
    red, blue = png((64, 64), (200, 0, 0)), png((64, 64), (0, 0, 200))
    async with (
        ImageServer({"red.png": red, "blue.png": blue}).running() as server,
        open_stack(tmp_path, **LOCAL) as stack,
    ):
        key = {"Idempotency-Key": "k1"}

        async def send(**body: object) -> httpx.Response:
            return await stack.client.post(
                "/request", json={"message": f"a cat {TINY}", "nick": "al", **body}, headers=key
            )

        first = await send(image_url=f"{server.base}/red.png")
        assert first.status_code == 200, first.text
        again = await send(image_url=f"{server.base}/red.png")
        assert again.json()["job_id"] == first.json()["job_id"]
        for other in ({"image_url": f"{server.base}/blue.png"}, {}):
            r = await send(**other)
            assert r.status_code == 422 and "used for another image" in r.json()["error"]
        uploads = []
        for data in (red, red, blue):
            uploads.append(
                await stack.client.post(
                    "/request",
                    data={"message": f"a cat {TINY}", "nick": "al"},
                    files={"image": ("x.png", data, "image/png")},
                    headers={"Idempotency-Key": "k2"},
                )
            )
        assert [r.status_code for r in uploads] == [200, 200, 422]
        assert uploads[0].json()["job_id"] == uploads[1].json()["job_id"]
        both = await stack.client.post(
            "/request",
            data={"message": f"a cat {TINY}", "nick": "al", "image_url": f"{server.base}/red.png"},
            files={"image": ("x.png", red, "image/png")},
        )
        assert both.status_code == 400 and "give one input image" in both.json()["error"]


async def test_a_job_whose_input_is_gone_fails_without_naming_a_path(tmp_path: Path) -> None:
    from fategen.simulator import SimulatorKnobs

    knobs = SimulatorKnobs(step_seconds=0.002, model_load_seconds=0.0, hang=1)
    async with open_stack(tmp_path, knobs) as stack:
        blocker = await stack.submit(f"a slow cat {TINY}")
        await stack.sim.wait_running(blocker["job_id"])
        r = await stack.client.post(
            "/request",
            data={"message": f"a cat {TINY}", "nick": "bo"},
            files={"image": ("x.png", png((64, 64), (1, 2, 3)), "image/png")},
        )
        assert r.status_code == 200, r.text
        job_id = r.json()["job_id"]
        output = stack.running.service.settings.output_dir
        # Deleted before it is posted (it waits behind the blocker, unless already ahead).
        await trio.to_thread.run_sync((output / f"{job_id}-input.png").unlink)
        await stack.client.delete(f"/job/{blocker['job_id']}", params={"nick": "alice"})
        done = await stack.wait(job_id)
        if done["status"] == "failed":
            assert done["error"] == (
                "the image this job starts from is no longer kept; submit it again"
            )
            assert str(output) not in done["error"]
        else:  # it was posted ahead of the blocker, with its image, before the delete
            assert done["status"] == "completed"


async def test_one_user_cannot_hold_every_fetch(tmp_path: Path) -> None:
    red = png((64, 64), (200, 0, 0))
    async with (
        ImageServer({"cat.png": red}).running() as server,
        open_stack(tmp_path, **LOCAL) as stack,
    ):
        answers: list[tuple[str, int, str]] = []
        refused = trio.Event()

        async def submit(nick: str, path: str) -> None:
            r = await stack.client.post(
                "/request",
                json={"message": f"a cat --image {server.base}/{path} {TINY}", "nick": nick},
            )
            answers.append((nick, r.status_code, r.json().get("error", "")))
            if sum(code == 429 for _, code, _ in answers) == 2:
                refused.set()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(submit, "al", "held/cat.png")
                await refused.wait()  # al's two past the two under way
                await submit("bo", "cat.png")  # bo's fetch is not held up by al's
                assert answers[-1][:2] == ("bo", 200), answers
                server.release.set()
        mine = sorted(code for nick, code, _ in answers if nick == "al")
        assert mine == [200, 200, 429, 429], answers
        errors = [error for _, code, error in answers if code == 429]
        assert all("2 of your images are being fetched already" in e for e in errors), errors
