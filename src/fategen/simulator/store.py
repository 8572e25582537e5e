"""Files kept in memory, keyed like ComfyUI's folders: (type, subfolder, filename)."""

from __future__ import annotations

import hashlib
import mimetypes
import posixpath
import time

import attrs

from fategen.simulator.render import image_size

#: ComfyUI's folder types (``folder_paths.get_directory_by_type``).
FOLDER_TYPES = ("input", "temp", "output")


class OutsideOutputFolder(Exception):
    """A filename prefix that would save outside the output folder (ComfyUI refuses it)."""


@attrs.frozen
class StoredImage:
    """One file (an image, or whatever bytes were uploaded): bytes, when written, its ETag."""

    data: bytes
    written: float
    etag: str


def _folder(subfolder: str) -> str:
    """A subfolder as a key: normalized, ``""`` for the folder itself."""
    normalized = posixpath.normpath(subfolder) if subfolder else ""
    return "" if normalized == "." else normalized


def annotated_path(name: str) -> tuple[str, str, str]:
    """Folder type, subfolder and file name of a ``LoadImage`` value like ComfyUI's
    ``folder_paths.annotated_filepath``: ``x.png`` and ``sub/x.png`` are in the input folder,
    ``x.png [output]`` (also ``[temp]``, ``[input]``) in the one named.

    Raises AttributeError for a value that is not a string, as ComfyUI does.
    """
    folder_type = "input"
    for candidate in FOLDER_TYPES:
        if name.endswith(f"[{candidate}]"):
            folder_type, name = candidate, name[: -len(candidate) - 3]
            break
    subfolder, filename = posixpath.split(posixpath.normpath(name))
    return folder_type, _folder(subfolder), filename


def is_image_name(filename: str) -> bool:
    """Whether the file's extension is an image type, as ComfyUI's
    ``folder_paths.filter_files_content_types`` judges it."""
    mime_type, _ = mimetypes.guess_type(filename, strict=False)
    return mime_type is not None and mime_type.split("/")[0] == "image"


@attrs.define
class ImageStore:
    """The output, temp and input folders of the simulated ComfyUI."""

    _images: dict[tuple[str, str, str], StoredImage] = attrs.Factory(dict)
    _counters: dict[tuple[str, str, str], int] = attrs.Factory(dict)
    _sizes: dict[tuple[str, str, str], tuple[int, int]] = attrs.Factory(dict)

    def put(self, folder_type: str, subfolder: str, filename: str, data: bytes) -> None:
        """Write a file. Any bytes may be stored; Pillow reads the size of those it can open."""
        key = (folder_type, _folder(subfolder), filename)
        digest = hashlib.blake2b(data, digest_size=8).hexdigest()
        self._images[key] = StoredImage(data, time.time(), f'"{digest}-{len(data):x}"')
        size = image_size(data)
        if size is None:
            self._sizes.pop(key, None)
        else:
            self._sizes[key] = size

    def get(self, folder_type: str, subfolder: str, filename: str) -> StoredImage | None:
        """A file, or None."""
        return self._images.get((folder_type, _folder(subfolder), filename))

    def find(self, name: str) -> StoredImage | None:
        """The file a ``LoadImage`` value names (see ``annotated_path``), or None."""
        return self._images.get(annotated_path(name))

    def exists(self, name: str) -> bool:
        """Whether the file a ``LoadImage`` value names exists (its ``VALIDATE_INPUTS``)."""
        return self.find(name) is not None

    def size_of(self, name: str) -> tuple[int, int] | None:
        """Width and height of the image a ``LoadImage`` value names; None if there is no such
        file or Pillow cannot read it."""
        return self._sizes.get(annotated_path(name))

    def __contains__(self, key: tuple[str, str, str]) -> bool:
        folder_type, subfolder, filename = key
        return (folder_type, _folder(subfolder), filename) in self._images

    def __len__(self) -> int:
        return len(self._images)

    def input_images(self) -> list[str]:
        """``LoadImage`` choices: the input folder's own files with an image extension, sorted."""
        return sorted(
            name
            for folder_type, subfolder, name in self._images
            if folder_type == "input" and subfolder == "" and is_image_name(name)
        )

    def input_sizes(self) -> dict[str, tuple[int, int]]:
        """Width and height of each readable image of the input folder, by ``LoadImage`` name
        (``sub/x.png`` for one in a subfolder)."""
        return {
            posixpath.join(subfolder, name): size
            for (folder_type, subfolder, name), size in self._sizes.items()
            if folder_type == "input"
        }

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
