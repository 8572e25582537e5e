"""What the operator configured of one ComfyUI backend (pure data; `COMFYUI_BACKENDS`)."""

from __future__ import annotations

from pathlib import Path

import attrs

#: The name of the one backend configured by ``COMFYUI_ADDRESS``/``COMFYUI_PORT``.
DEFAULT_BACKEND = "comfyui"


@attrs.frozen
class BackendSpec:
    """One ComfyUI server of the fleet.

    ``url`` is ``http(s)://host[:port][/prefix]`` without a trailing slash; ``token`` is sent
    as ``Authorization: Bearer``; ``headers`` are sent with every request and the WebSocket
    handshake; ``slots`` is how many prompts fategen runs on it at once (ComfyUI runs one; a
    server that runs several, e.g. behind its own balancer, may take more); ``folder_path``
    is its output folder when this machine can read it.
    """

    name: str
    url: str
    token: str | None = attrs.field(default=None, repr=False)
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), repr=False)
    slots: int = 1
    folder_path: Path | None = None

    def request_headers(self) -> dict[str, str]:
        """Headers for every REST call and the WebSocket handshake."""
        headers = dict(self.headers)
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers
