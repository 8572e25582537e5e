"""Jobs that start from an image, over real sockets, end to end on the simulator: ``--image
URL`` (fetched at accept from a real HTTP server on 127.0.0.1, which the SSRF guard refuses
unless the operator allows it), a multipart upload, and the follow-ups ``--upscale`` and
``--vary`` (also ``POST /job/{id}/upscale``), with the input uploaded to ComfyUI as it runs."""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import trio
from PIL import Image, ImageChops, ImageStat

from conftest import open_stack

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


class ImageServer:
    """Serves ``files`` on 127.0.0.1 and records each request's path and Host header."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.seen: list[tuple[str, str]] = []
        self.base = ""

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ImageServer]:
        from hypercorn.config import Config
        from hypercorn.trio import serve
        from quart import Response, request
        from quart_trio import QuartTrio

        app = QuartTrio(__name__)

        @app.get("/<path:name>")
        async def file(name: str) -> Response:
            self.seen.append((name, request.headers.get("Host", "")))
            if name == "away":
                return Response("", 302, {"Location": "http://10.1.2.3/cat.png"})
            data = self.files.get(name)
            if data is None:
                return Response("no", 404)
            return Response(data, 200, content_type="image/png")

        config = Config()
        config.bind = ["127.0.0.1:0"]
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(functools.partial(serve, app, config))  # type: ignore[arg-type]
            self.base = binds[0]
            yield self
            nursery.cancel_scope.cancel()


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
        assert done["input"]["source"] == url and done["input"]["strength"] == 0.2
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
