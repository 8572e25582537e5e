"""Writing the result file: atomic, never overwriting, nothing half-written left behind."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import trio
from PIL import Image

from conftest import files, png, solid
from fategen.errors import ImageError
from fategen.queue import postprocess
from fategen.queue.postprocess import render_result, render_result_async, write_atomic

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# --- writing -----------------------------------------------------------------------------------


def test_write_atomic(tmp_path: Path) -> None:
    target = tmp_path / "job.webp"
    write_atomic(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert files(tmp_path) == ["job.webp"]


def test_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "job.webp"
    target.write_bytes(b"another job")
    with pytest.raises(ImageError, match="already exists"):
        write_atomic(target, b"mine")
    assert target.read_bytes() == b"another job"
    assert files(tmp_path) == ["job.webp"]


def test_failure_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", no_space)
    target = tmp_path / "job.webp"
    with pytest.raises(ImageError) as err:
        write_atomic(target, b"data")
    assert str(err.value) == f"cannot write the result to {target}: No space left on device"
    assert files(tmp_path) == []


def test_failure_while_writing_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(ImageError, match="Input/output error"):
        write_atomic(tmp_path / "job.webp", b"data")
    assert files(tmp_path) == []


def test_without_hard_links_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(*args: object, **kwargs: object) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", unsupported)
    target = tmp_path / "job.webp"
    write_atomic(target, b"data")
    assert target.read_bytes() == b"data"
    assert files(tmp_path) == ["job.webp"]
    with pytest.raises(ImageError, match="already exists"):
        write_atomic(target, b"other")
    assert target.read_bytes() == b"data"
    assert files(tmp_path) == ["job.webp"]


def test_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    target = tmp_path / "file" / "job.webp"
    with pytest.raises(ImageError, match=f"cannot write the result to {target}: Not a directory"):
        write_atomic(target, b"data")
    assert files(tmp_path) == ["file"]


# --- the whole render --------------------------------------------------------------------------


def test_render_result(tmp_path: Path) -> None:
    blobs = [png(solid(c, (64, 64))) for c in (RED, GREEN, BLUE)]
    path = render_result(blobs, tmp_path, "job-1")
    assert path == tmp_path / "job-1.webp"
    # The grid, and each image of it (1-based).
    assert files(tmp_path) == ["job-1-1.webp", "job-1-2.webp", "job-1-3.webp", "job-1.webp"]
    with Image.open(path) as image:
        assert image.format == "WEBP"
        assert image.size == (192, 64)


def test_a_complete_result_already_there_is_the_jobs_result(tmp_path: Path) -> None:
    """fategen died between writing the file and recording the job: rendering the job again
    keeps that file (it was written atomically), instead of failing with "already exists"."""
    blobs = [png(solid(c, (64, 64))) for c in (RED, GREEN)]
    first = render_result(blobs, tmp_path, "job-1")
    before = first.read_bytes()
    again = render_result([png(solid(BLUE, (32, 32)))], tmp_path, "job-1")
    assert again == first and again.read_bytes() == before
    assert files(tmp_path) == ["job-1-1.webp", "job-1-2.webp", "job-1.webp"]


def test_an_unreadable_file_of_that_name_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "job-9.webp").write_bytes(b"RIFF not really")
    path = render_result([png(solid(GREEN, (16, 16)))], tmp_path, "job-9")
    with Image.open(path) as image:
        assert image.size == (16, 16)
    assert files(tmp_path) == ["job-9.webp"]


def test_render_result_corrupt_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot be decoded"):
        render_result([png(solid(RED)), b"junk"], tmp_path, "job-2")
    assert files(tmp_path) == []


@pytest.mark.parametrize("job_id", ["", "../x", "a/b", ".hidden"])
def test_render_result_rejects_path_like_job_ids(tmp_path: Path, job_id: str) -> None:
    with pytest.raises(ValueError):
        render_result([png(solid(RED))], tmp_path, job_id)


async def test_render_result_async(tmp_path: Path) -> None:
    blobs = [png(solid(RED, (32, 32))), png(solid(GREEN, (32, 32)))]
    with trio.fail_after(10):
        path = await render_result_async(blobs, tmp_path, "job-3", quality=70)
        with Image.open(path) as image:
            assert (image.format, image.size) == ("WEBP", (64, 32))
        limiter = trio.CapacityLimiter(1)
        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(
                    functools.partial(
                        render_result_async, blobs, tmp_path, f"par-{n}", limiter=limiter
                    )
                )
    grids = ["job-3", "par-0", "par-1", "par-2"]
    assert files(tmp_path) == sorted(f"{g}{n}.webp" for g in grids for n in ("", "-1", "-2"))
    assert 2 <= postprocess.RENDER_LIMITER.total_tokens <= postprocess.CONCURRENT_JOBS
