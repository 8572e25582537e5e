"""POST /upload/image the way ComfyUI's server.py (``image_upload``) takes a file."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping

from fategen.simulator.store import FOLDER_TYPES, ImageStore


class UploadRefused(Exception):
    """ComfyUI would not take the upload: ``status`` 400 (a bad request, empty body) or 500
    (its handler crashes: a ``type`` it does not know, an ``image`` field that is not a file)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def upload_image(
    store: ImageStore, image: tuple[str, bytes] | str | None, fields: Mapping[str, str]
) -> dict[str, str]:
    """Store an uploaded file and return ComfyUI's answer, ``{"name", "subfolder", "type"}``.

    Args:
        store: where the file goes.
        image: the multipart field ``image``: ``(filename, bytes)`` for a file, a string for a
            plain field, None when there is none.
        fields: the other form fields: ``type`` (``input``, the default, ``temp`` or
            ``output``), ``subfolder``, ``overwrite`` (``true`` or ``1`` to replace a file).

    Without overwrite, a file of that name with other bytes makes ComfyUI try
    ``name (1).ext``, ``name (2).ext``...; a file with the same bytes is reused, not written.

    Raises:
        UploadRefused: ComfyUI's 400 (no file, no file name, a path out of the folder) or 500.
    """
    folder_type = fields.get("type", "input")
    if folder_type not in FOLDER_TYPES:
        raise UploadRefused(500)
    if isinstance(image, str):
        raise UploadRefused(500 if image else 400)
    if image is None or not image[0]:
        raise UploadRefused(400)
    filename, data = image
    subfolder = fields.get("subfolder", "")
    path = _inside(posixpath.join(posixpath.normpath(subfolder or "."), filename))
    if fields.get("overwrite") not in ("true", "1"):
        stem, extension = posixpath.splitext(filename)
        number = 1
        while (existing := store.get(folder_type, *posixpath.split(path))) is not None:
            if existing.data == data:
                return {"name": filename, "subfolder": subfolder, "type": folder_type}
            filename = f"{stem} ({number}){extension}"
            path = _inside(posixpath.join(posixpath.normpath(subfolder or "."), filename))
            number += 1
    store.put(folder_type, *posixpath.split(path), data)
    return {"name": filename, "subfolder": subfolder, "type": folder_type}


def _inside(path: str) -> str:
    """``path`` normalized, relative to the folder; UploadRefused(400) if it leaves it."""
    normalized = posixpath.normpath(path)
    if normalized.startswith("/") or normalized == ".." or normalized.startswith("../"):
        raise UploadRefused(400)
    if normalized == ".":
        raise UploadRefused(500)  # the folder itself: writing to it fails
    return normalized
