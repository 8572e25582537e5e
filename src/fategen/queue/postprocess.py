"""The post-processor actor: fetches a finished job's images, makes the WebP grid, completes it.

It runs beside the worker, so fetching and encoding one job overlaps the next generation.
Pillow work happens in worker threads (`fategen.grid.render_result_async`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import NoReturn

import attrs
import trio

from fategen.comfy import ImageRef
from fategen.errors import FategenError
from fategen.grid import render_result_async
from fategen.jobs import Job, JobStatus, JobStore

log = logging.getLogger("fategen.postprocess")


@attrs.define(eq=False)
class PostProcessor:
    store: JobStore
    fetch: Callable[[Sequence[ImageRef]], Awaitable[list[bytes]]]
    output_dir: Path
    results: trio.MemoryReceiveChannel[tuple[Job, list[ImageRef]]]
    quality: int = 90
    #: True while a job is being post-processed.
    busy: bool = False

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        async with self.results:
            task_status.started()
            async for job, refs in self.results:
                self.busy = True
                try:
                    await self.process(job, refs)
                finally:
                    self.busy = False
        raise RuntimeError("the post-processor's channel closed")

    async def process(self, job: Job, refs: Sequence[ImageRef]) -> None:
        try:
            if not refs:
                raise FategenError("ComfyUI finished the job but produced no image")
            blobs = await self.fetch(refs)
            path = await render_result_async(blobs, self.output_dir, job.id, quality=self.quality)
        except FategenError as exc:
            await self.store.update(
                job, status=JobStatus.FAILED, error=str(exc), finished=time.time()
            )
            log.info("job %s failed: %s", job.id, exc)
            return
        finished = time.time()
        await self.store.update(
            job, status=JobStatus.COMPLETED, result=path.name, finished=finished
        )
        took = finished - (job.started or finished)
        log.info("job %s finished in %.1f s: %s", job.id, took, path.name)
