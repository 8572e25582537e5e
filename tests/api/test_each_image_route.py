"""``GET /job/{id}/image/{n}`` over real sockets (simulator + service): each image of a job
alone, as cacheable WebP; 404 with a sentence for an n out of range or not a number; the
job's ``images`` URLs; a job of one image serves it as image 1."""

from __future__ import annotations

import io
from pathlib import Path

import trio
from PIL import Image

from conftest import open_stack

TINY = "-m tiny -w 256 -h 256"


def _webp_size(body: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(body)) as image:
        image.load()
        assert image.format == "WEBP"
        return image.size


async def test_each_image_of_a_job(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        with trio.fail_after(30):
            job_id = (await stack.submit(f"three foxes -c 3 {TINY}"))["job_id"]
            done = await stack.wait(job_id)
            assert done["status"] == "completed", done
            base = f"{stack.url}/job/{job_id}/image"
            assert done["images"] == [f"{base}/1", f"{base}/2", f"{base}/3"]
            assert (await stack.client.get(f"/job/{job_id}")).json()["images"] == done["images"]

            bodies = []
            for url in done["images"]:
                r = await stack.client.get(url)
                assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
                assert "immutable" in r.headers["cache-control"] and r.headers["etag"]
                assert _webp_size(r.content) == (256, 256)
                bodies.append(r.content)
            assert len(set(bodies)) == 3  # three different images
            grid = await stack.client.get(f"/job/{job_id}/image")
            assert _webp_size(grid.content) == (768, 256)

            etag = (await stack.client.get(f"{base}/2")).headers["etag"]
            again = await stack.client.get(f"{base}/2", headers={"If-None-Match": etag})
            assert again.status_code == 304

            for n in ("4", "0", "x"):
                r = await stack.client.get(f"{base}/{n}")
                assert r.status_code == 404, n
                assert r.json() == {"error": f"job {job_id} has 3 images; ask for 1 to 3"}


async def test_a_job_without_images_yet_is_404(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        stack.sim.knobs.hang = 1
        with trio.fail_after(30):
            job_id = (await stack.submit(f"stuck -c 2 {TINY}"))["job_id"]
            r = await stack.client.get(f"/job/{job_id}/image/1")
            assert r.status_code == 404
            error = r.json()["error"]
            assert error.startswith(f"job {job_id} has no images yet (it is ")
            assert "\n" not in error
            assert (await stack.client.get(f"/job/{job_id}")).json()["images"] == []


async def test_a_one_image_job_serves_it_as_image_1(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        with trio.fail_after(30):
            job_id = (await stack.submit(f"one fox -c 1 {TINY}"))["job_id"]
            done = await stack.wait(job_id)
            assert done["status"] == "completed", done
            assert done["images"] == [f"{stack.url}/job/{job_id}/image/1"]
            one = await stack.client.get(f"/job/{job_id}/image/1")
            assert one.status_code == 200 and one.headers["content-type"] == "image/webp"
            assert _webp_size(one.content) == (256, 256)
            grid = await stack.client.get(f"/job/{job_id}/image")
            assert one.content == grid.content
            r = await stack.client.get(f"/job/{job_id}/image/2")
            assert r.status_code == 404
            assert r.json() == {"error": f"job {job_id} has 1 image; ask for 1"}
