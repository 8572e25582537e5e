"""Where ComfyUI has a prompt, asked over REST: after a reconnect, or after fategen restarted.

ComfyUI moves a prompt from its queue to its history when it ends, so the look-up reads
``/history`` first, then ``/queue``, then ``/history`` once more (the prompt may have ended
between the two calls); only then is it ``unknown``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from fategen.comfy.wire import ComfyRest

Whereabouts = Literal["done", "running", "queued", "unknown"]


@attrs.frozen
class Located:
    """``state``, and for ``done`` the prompt's history entry."""

    state: Whereabouts
    entry: Mapping[str, Any] | None = None


async def locate(rest: ComfyRest, prompt_id: str) -> Located:
    """``done`` (in ``/history``, whatever its end), ``running``, ``queued`` (pending), or
    ``unknown`` (never seen, deleted, or lost).

    Raises:
        ComfyUnavailable: ComfyUI cannot be reached.
    """
    entry = await rest.history(prompt_id)
    if entry is not None:
        return Located("done", entry)
    running, pending = await rest.queue()
    if prompt_id in running:
        return Located("running")
    if prompt_id in pending:
        return Located("queued")
    entry = await rest.history(prompt_id)  # it may have ended between the two calls
    if entry is not None:
        return Located("done", entry)
    return Located("unknown")
