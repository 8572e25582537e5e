"""The post-processor actor: fetches a finished job's images, makes the WebP grid, writes it.

It runs beside the worker, so fetching and encoding one job overlaps the next generation, and
it runs several jobs at once (`CONCURRENT_JOBS`), each to its end on its own: a job completes
as soon as its own file is written, never behind another job's grid. While it has room it is
always waiting for the next job, so the worker never waits to hand one over.

Pillow work and file writes happen in worker threads (`render_result_async`, at most
`RENDER_LIMITER` at once: WebP encoding releases the GIL, so renders run in parallel). A job
is recorded completed only once its file and the directory entry are on disk (fsynced); that
happens here, off the worker's path to the next prompt. The grid itself is pure
(`fategen.core.grid`); writing the file, atomically, is done here.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import NoReturn

import attrs
import trio
from PIL import Image

from fategen.comfy.wire import ImageRef
from fategen.core.grid import decode_images, encode_webp, make_grid
from fategen.errors import FategenError, ImageError
from fategen.store.jobs import Job, JobStatus, JobStore, result_path
from fategen.store.retention import image_path

log = logging.getLogger("fategen.postprocess")

#: Jobs post-processed at once (fetching their images, rendering, writing, recording). More
#: finished jobs wait in the worker's channel to the post-processor.
CONCURRENT_JOBS = 4
#: Renders running at once in `render_result_async` (each one is CPU-heavy: one per core, at
#: least two so a small grid is made beside a big one, at most `CONCURRENT_JOBS`).
RENDER_LIMITER = trio.CapacityLimiter(max(2, min(CONCURRENT_JOBS, os.cpu_count() or 1)))


Fetch = Callable[[Sequence[ImageRef]], Awaitable[list[bytes]]]


@attrs.define(eq=False)
class PostProcessor:
    store: JobStore
    #: Fetches a job's images (from the backend that ran it: ``fetch_for`` when set).
    fetch: Fetch
    output_dir: Path
    results: trio.MemoryReceiveChannel[tuple[Job, list[ImageRef]]]
    quality: int = 90
    #: Seconds a job may take from its start to its images fetched (None: no limit).
    job_timeout: float | None = None
    #: Jobs post-processed at once.
    concurrency: int = CONCURRENT_JOBS
    #: The fetch for a job's images, by the backend that ran it (a fleet); else ``fetch``.
    fetch_for: Callable[[Job], Fetch] | None = None
    #: The jobs being post-processed now (taken from the channel, not yet recorded).
    in_flight: set[str] = attrs.field(factory=set, init=False)

    @property
    def busy(self) -> bool:
        """Whether a job is being post-processed, or handed over and waiting for room."""
        return bool(self.in_flight) or self.results.statistics().current_buffer_used > 0

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Take finished jobs from the channel and post-process up to `concurrency` of them
        at once, each in a task of its own; a slot frees when its job is recorded."""
        slots = trio.Semaphore(self.concurrency)
        async with self.results, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await slots.acquire()
                try:
                    job, refs = await self.results.receive()
                except trio.EndOfChannel:
                    break
                self.in_flight.add(job.id)
                nursery.start_soon(self._process_in_slot, job, refs, slots)
        raise RuntimeError("the post-processor's channel closed")

    async def _process_in_slot(
        self, job: Job, refs: Sequence[ImageRef], slots: trio.Semaphore
    ) -> None:
        try:
            await self.process(job, refs)
        except Exception:
            # A bug, not a bad image (those are FategenErrors): it fails this job alone; the
            # others being post-processed go on.
            log.exception("job %s: post-processing failed unexpectedly", job.id)
            await self._fail(job, "making the image failed unexpectedly; it has been logged")
        finally:
            self.in_flight.discard(job.id)
            slots.release()

    async def process(self, job: Job, refs: Sequence[ImageRef]) -> None:
        """Fetch the images, make and write the result, and complete the job (or fail it
        with the one-line reason). Fetching counts against the job's time limit."""
        try:
            if not refs:
                raise FategenError("ComfyUI finished the job but produced no image")
            blobs = await self._fetch_in_time(job, refs)
            path = await render_result_async(blobs, self.output_dir, job.id, quality=self.quality)
        except FategenError as exc:
            await self._fail(job, str(exc))
            return
        # Cancelled during the render (the service stops), the job stays processing: its
        # file is whole, and after a restart it is found and used (`render_result`).
        await trio.lowlevel.checkpoint_if_cancelled()
        finished = time.time()
        if not await self.store.update(
            job,
            expect=(JobStatus.PROCESSING,),
            status=JobStatus.COMPLETED,
            result=path.name,
            finished=finished,
        ):
            return  # it ended otherwise meanwhile
        took = finished - (job.first_started or job.started or finished)  # from the first start
        log.info(
            "job %s finished in %.1f s: %s",
            job.id,
            took,
            path.name,
            extra=job.log_fields("completed"),
        )

    async def _fail(self, job: Job, error: str) -> None:
        if await self.store.update(
            job,
            expect=(JobStatus.PROCESSING,),
            status=JobStatus.FAILED,
            error=error,
            finished=time.time(),
        ):
            log.info("job %s failed: %s", job.id, error, extra=job.log_fields("failed"))

    async def _fetch_in_time(self, job: Job, refs: Sequence[ImageRef]) -> list[bytes]:
        fetch = self.fetch if self.fetch_for is None else self.fetch_for(job)
        if self.job_timeout is None:
            return await fetch(refs)
        spent = time.time() - (job.started or time.time())
        with trio.move_on_after(max(self.job_timeout - spent, 0.0)):
            return await fetch(refs)
        raise FategenError(
            f"the job ran longer than {self.job_timeout:g} s (its images could not be "
            "fetched from ComfyUI in time), so it was stopped"
        )


def existing_result(out_dir: Path, job_id: str) -> Path | None:
    """The job's result file if a complete one is there already (blocking).

    fategen may have died between writing the file and recording the job's completion; the
    file is whole (it is written atomically) and is the job's result. One that does not
    decode is removed, to be written again.
    """
    path = result_path(out_dir, job_id)
    if not _whole_file(path):
        return None
    log.info("job %s: its result %s was already written; using it", job_id, path.name)
    return path


def _whole_file(path: Path) -> bool:
    """Whether ``path`` is an image that decodes (blocking); one that does not is removed."""
    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        return False
    except Exception:  # Pillow raises many kinds for a broken file
        log.warning("removing the unreadable result file %s; it is made again", path)
        with contextlib.suppress(OSError):
            path.unlink()
        return False
    return True


def remove_partial_results(out_dir: Path) -> int:
    """Delete temporary files a crash left mid-write (``.<id>.webp.<hex>.tmp``, and
    ``.<id>-<n>.webp.<hex>.tmp`` of each image, ``.<id>-input.png.<hex>.tmp`` of an input
    image); how many (blocking: run at start-up)."""
    removed = 0
    temps = [*out_dir.glob(".*.webp.*.tmp"), *out_dir.glob(".*-input.png.*.tmp")]
    for temp in temps:
        try:
            temp.unlink()
            removed += 1
        except OSError as exc:
            log.warning("could not remove %s: %s", temp, exc.strerror)
    if removed:
        log.info("removed %d partial result file(s) left by a crash", removed)
    return removed


class ResultExists(ImageError):
    """The result file is there already (`write_atomic` never replaces a file)."""


#: errno values meaning "this filesystem cannot make hard links".
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


def _write_error(path: Path, exc: OSError) -> ImageError:
    return ImageError(f"cannot write the result to {path}: {exc.strerror or exc}")


def write_atomic(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data``, all at once or not at all; never replace a file.

    The data goes to a hidden temporary file in the same directory (``.{name}.{random}.tmp``),
    is flushed and fsynced, then hard-linked to ``path``: the link fails if ``path`` exists, so
    another job's file is never overwritten, and readers never see a half-written file. On
    filesystems without hard links it falls back to check-then-``os.replace`` (a tiny race).
    The temporary file is removed whatever happens.

    Raises:
        ImageError: ``path`` exists, or the file cannot be written (permissions, disk full, ...).
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            # No hard links here (some network or FUSE filesystems): check, then rename.
            if os.path.lexists(path):
                raise FileExistsError(path) from None
            os.replace(temp, path)
    except FileExistsError as exc:
        raise ResultExists(
            f"cannot write the result to {path}: a file with that name already exists"
        ) from exc
    except OSError as exc:
        raise _write_error(path, exc) from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the new directory entry durable (best effort: not every platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def render_result(
    blobs: Sequence[bytes], out_dir: Path, job_id: str, *, quality: int = 90, method: int = 4
) -> Path:
    """Decode, grid, encode and write ``out_dir / f"{job_id}.webp"`` (blocking).

    With more than one image, each is written first, as ``{job_id}-{n}.webp`` (n from 1,
    `image_path`), then the grid: a grid on disk means the job's images are all there.
    A complete file of one of these names already there (an earlier run wrote it and died
    before recording the job) is kept.

    Raises:
        ImageError: corrupt input, no images, or a file cannot be written.
        ValueError: ``job_id`` is not a plain file name.
    """
    if not job_id or job_id.startswith(".") or any(c in job_id for c in "/\\\0"):
        raise ValueError(f"job id {job_id!r} cannot be a file name")
    images = decode_images(blobs)
    grid = make_grid(images)
    if len(images) > 1:
        for n, image in enumerate(images, 1):
            if image.mode not in ("RGB", "RGBA"):
                image = image.convert("RGB")
            data = encode_webp(image, quality=quality, method=method)
            _write_or_keep(image_path(out_dir, job_id, n), data)
    path = result_path(out_dir, job_id)
    _write_or_keep(path, encode_webp(grid, quality=quality, method=method))
    return path


def _write_or_keep(path: Path, data: bytes) -> None:
    """`write_atomic`, keeping a whole file of that name already there (blocking)."""
    try:
        write_atomic(path, data)
    except ResultExists:
        # fategen died between writing this job's files and recording it: the file is
        # whole (written atomically) and is kept. One that does not decode is removed by
        # `_whole_file` and written again.
        if not _whole_file(path):
            write_atomic(path, data)
        else:
            log.info("%s was already written; using it", path.name)


async def render_result_async(
    blobs: Sequence[bytes],
    out_dir: Path,
    job_id: str,
    *,
    quality: int = 90,
    method: int = 4,
    limiter: trio.CapacityLimiter | None = None,
) -> Path:
    """`render_result` in a worker thread, at most ``limiter`` (default `RENDER_LIMITER`) at once.

    Cancellation waits for the thread to finish, so a file is never left half-done.
    """
    render = functools.partial(
        render_result, blobs, out_dir, job_id, quality=quality, method=method
    )
    return await trio.to_thread.run_sync(render, limiter=limiter or RENDER_LIMITER)
