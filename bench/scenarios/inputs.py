"""Scenario 7: input images. What accepting a job that starts from an image costs.

The image is a phone photo's size (4032x3024 JPEG, about 2 MB). Three times, each the median
of the repeats: Pillow's own work on it (`fategen.core.inputimage.probe` then `prepare` to the
job's 1152x896, in this process: the floor), and the answer time of ``POST /request`` for a
text job, for the photo uploaded (multipart), and for it fetched from a URL (an HTTP server
in this process on 127.0.0.1, which the service is allowed to reach). The headlines: what
the service adds around Pillow, i.e. (upload answer - text answer) / Pillow's time, and the
same for the URL (a fetch over loopback, the SSRF checks, hashing, the atomic write).
"""

from __future__ import annotations

import contextlib
import functools
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio
from common import figure, http_client, median, service, simulator
from PIL import Image, ImageDraw

from fategen.core import inputimage

PHOTO = (4032, 3024)
MAX_PIXELS = 40_000_000


def _photo() -> bytes:
    """A JPEG about as hard to code as a phone photo: gradients, shapes and sensor-like noise,
    quality 90 (a few MiB)."""
    image = Image.linear_gradient("L").resize(PHOTO).convert("RGB")
    draw = ImageDraw.Draw(image)
    for i in range(0, PHOTO[0], 97):
        top = (i * 7) % PHOTO[1]
        draw.ellipse((i, top, i + 300, top + 200), fill=(i % 255, 90, 160))
    noise = Image.merge("RGB", [Image.effect_noise(PHOTO, 24) for _ in range(3)])
    image = Image.blend(image, noise, 0.25)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _pillow_seconds(data: bytes, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        inputimage.probe(data, max_pixels=MAX_PIXELS)
        inputimage.prepare(data, 1152, 896, max_pixels=MAX_PIXELS)
        times.append(time.perf_counter() - t0)
    return times


@contextlib.asynccontextmanager
async def _image_server(data: bytes) -> AsyncIterator[str]:
    from hypercorn.config import Config
    from hypercorn.trio import serve
    from quart import Response
    from quart_trio import QuartTrio

    app = QuartTrio(__name__)

    @app.get("/photo.jpg")
    async def photo() -> Response:
        return Response(data, 200, content_type="image/jpeg")

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, app, config))  # type: ignore[arg-type]
        yield binds[0]
        nursery.cancel_scope.cancel()


async def run(workdir: Path, *, quick: bool = False) -> dict[str, Any]:
    repeats = 5 if quick else 11
    data = await trio.to_thread.run_sync(_photo)
    pillow = await trio.to_thread.run_sync(_pillow_seconds, data, repeats)
    floor = median(pillow)
    answers: dict[str, list[float]] = {"text": [], "upload": [], "url": []}
    async with (
        _image_server(data) as base,
        simulator(workdir, step_seconds=0.002, model_load_seconds=0.0) as sim,
        service(workdir, sim, FATEGEN_IMAGE_ALLOW_NETWORKS="127.0.0.1/32") as svc,
        http_client(svc.url, timeout=120) as client,
    ):
        # Paused: the answers measure the accept alone, not jobs running beside it.
        await client.post("/queue/pause")
        for i in range(repeats):
            for kind in ("text", "upload", "url"):
                message = f"a harbour {i} {kind} -m tiny -w 1152 -h 896"
                t0 = time.perf_counter()
                if kind == "upload":
                    r = await client.post(
                        "/request",
                        data={"message": message, "nick": f"u{i}"},
                        files={"image": ("photo.jpg", data, "image/jpeg")},
                    )
                elif kind == "url":
                    r = await client.post(
                        "/request",
                        json={
                            "message": message,
                            "nick": f"r{i}",
                            "image_url": f"{base}/photo.jpg",
                        },
                    )
                else:
                    r = await client.post("/request", json={"message": message, "nick": f"t{i}"})
                answers[kind].append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
    text = median(answers["text"])
    figures = [
        figure(
            "pillow_ms",
            "Pillow on a 4032x3024 JPEG: probe, then prepare to 1152x896 PNG (ms)",
            [1000 * p for p in pillow],
            digits=1,
            note=f"{len(data) / 2**20:.1f} MiB",
        ),
        figure(
            "text_ms", "POST /request, text job (ms)", [1000 * t for t in answers["text"]], digits=1
        ),
        figure(
            "upload_ms",
            "POST /request, the photo uploaded (ms)",
            [1000 * t for t in answers["upload"]],
            digits=1,
        ),
        figure(
            "url_ms",
            "POST /request, the photo fetched from a URL (ms)",
            [1000 * t for t in answers["url"]],
            digits=1,
        ),
        figure(
            "upload_over_pillow",
            "(upload answer - text answer) / Pillow's own time",
            [(u - text) / floor for u in answers["upload"]],
            target=("<=", 1.5),
            noisy=True,
        ),
        figure(
            "url_over_pillow",
            "(URL answer - text answer) / Pillow's own time",
            [(u - text) / floor for u in answers["url"]],
            target=("<=", 1.5),
            noisy=True,
        ),
    ]
    return {"figures": figures, "repeats": repeats, "photo_bytes": len(data)}
