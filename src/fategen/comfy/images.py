"""A finished prompt's images: read from its history entry, fetched through ``GET /view`` or,
when this machine can read ComfyUI's output folder, straight from disk (in a worker thread).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from fategen.comfy.wire import ComfyRest, ImageRef, history_failure, images_from_outputs
from fategen.errors import ComfyError

log = logging.getLogger("fategen.comfy")


def images_from_entry(entry: Mapping[str, Any], workflow: Mapping[str, Any]) -> list[ImageRef]:
    """The images of a finished prompt's ``/history`` entry.

    Raises:
        ComfyError: the prompt failed (naming the node), or it saved no image.
    """
    failure = history_failure(entry, workflow)
    if failure is not None:
        raise ComfyError(failure)
    outputs = entry.get("outputs")
    images = images_from_outputs(outputs if isinstance(outputs, Mapping) else {})
    if not images:
        raise ComfyError("ComfyUI finished the job without any image (does the workflow save one?)")
    return images


class ImageFetcher:
    """Fetches image bytes from one ComfyUI (``folder_path``: its output folder, if readable)."""

    def __init__(self, rest: ComfyRest, folder_path: Path | None) -> None:
        self.rest = rest
        self.folder_path = folder_path
        self._file_limiter = trio.CapacityLimiter(4)
        self._warned_folder = False

    async def fetch(self, refs: Sequence[ImageRef]) -> list[bytes]:
        """The bytes of each image, in order.

        With ``folder_path`` set, ``output`` images are read from that folder (in a worker
        thread); a name that resolves outside the folder is refused (ComfyError); a file that
        is not there is fetched through ``GET /view`` instead (logged once), so a wrong or
        remote folder only costs speed. ``temp`` images always come through ``/view``.

        Raises:
            ImageError: ComfyUI has no such image (404) or would not send it.
            ComfyError: a name points outside the output folder.
            ComfyUnavailable: ComfyUI cannot be reached.
        """
        results: list[bytes] = []
        for ref in refs:
            data = await self._read_local(ref)
            results.append(data if data is not None else await self.rest.view(ref))
        return results

    async def _read_local(self, ref: ImageRef) -> bytes | None:
        folder = self.folder_path
        if folder is None or ref.type != "output":
            return None

        def read() -> bytes | None:
            root = folder.resolve()
            path = (root / ref.subfolder / ref.filename).resolve()
            if not path.is_relative_to(root):
                name = f"{ref.subfolder}/{ref.filename}" if ref.subfolder else ref.filename
                raise ComfyError(f'ComfyUI named an image outside its output folder: "{name}"')
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return None

        data = await trio.to_thread.run_sync(read, limiter=self._file_limiter)
        if data is None and not self._warned_folder:
            self._warned_folder = True
            log.warning(
                "image %s is not in %s; reading images through ComfyUI's /view instead",
                ref.filename,
                folder,
            )
        return data
