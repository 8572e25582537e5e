"""Images kept in memory, keyed like ComfyUI's folders: (type, subfolder, filename)."""

from __future__ import annotations

import hashlib
import posixpath
import time

import attrs

from fategen.simulator.render import png_size


class OutsideOutputFolder(Exception):
    """A filename prefix that would save outside the output folder (ComfyUI refuses it)."""


@attrs.frozen
class StoredImage:
    """One file: bytes, when it was written, its ETag."""

    data: bytes
    written: float
    etag: str


@attrs.define
class ImageStore:
    """The output, temp and input folders of the simulated ComfyUI."""

    _images: dict[tuple[str, str, str], StoredImage] = attrs.Factory(dict)
    _counters: dict[tuple[str, str, str], int] = attrs.Factory(dict)
    _input_sizes: dict[str, tuple[int, int]] = attrs.Factory(dict)

    def put(self, folder_type: str, subfolder: str, filename: str, data: bytes) -> None:
        """Write a file."""
        written = time.time()
        digest = hashlib.blake2b(data, digest_size=8).hexdigest()
        self._images[(folder_type, subfolder, filename)] = StoredImage(
            data, written, f'"{digest}-{len(data):x}"'
        )
        if folder_type == "input" and subfolder == "":
            self._input_sizes[filename] = png_size(data)

    def get(self, folder_type: str, subfolder: str, filename: str) -> StoredImage | None:
        """A file, or None."""
        return self._images.get((folder_type, subfolder, filename))

    def __contains__(self, key: tuple[str, str, str]) -> bool:
        return key in self._images

    def __len__(self) -> int:
        return len(self._images)

    def input_images(self) -> list[str]:
        """Names in the input folder (``LoadImage`` choices)."""
        return sorted(self._input_sizes)

    def input_sizes(self) -> dict[str, tuple[int, int]]:
        """Width and height of each input image."""
        return dict(self._input_sizes)

    def reserve(self, folder_type: str, filename_prefix: str, count: int) -> tuple[str, list[str]]:
        """Subfolder and file names for ``count`` images, named ``{prefix}_{counter:05}_.png``.

        Raises:
            OutsideOutputFolder: the prefix climbs out of the folder (``../``) or is absolute.
        """
        subfolder, prefix = posixpath.split(posixpath.normpath(filename_prefix))
        if filename_prefix.startswith("/") or subfolder.split("/")[0] == "..":
            raise OutsideOutputFolder(
                "**** ERROR: Saving image outside the output folder is not allowed.\n"
                f" full_output_folder: {subfolder}\n         output_dir: {folder_type}\n"
            )
        key = (folder_type, subfolder, prefix)
        first = self._counters.get(key, 1)
        self._counters[key] = first + count
        return subfolder, [f"{prefix}_{first + i:05}_.png" for i in range(count)]
