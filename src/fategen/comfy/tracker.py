"""What the session learnt about one prompt from ComfyUI's WebSocket: a `Tracker` per prompt.

The session's reader applies each message to the tracker of its ``prompt_id``. Most messages
only mark activity (``last_activity``, which holds the stall clock) or report progress (handed
to the follower's ``on_progress`` at once, or buffered until someone follows the prompt); the
follower is woken through ``changed()``, a new `trio.Event` each time, only when the prompt
ends, fails, is cancelled, or the connection changes, so a sampler step costs no task switch.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import trio

from fategen.comfy.wire import (
    INTERRUPTED,
    ComfyMessage,
    Executed,
    Executing,
    ExecutionCached,
    ExecutionError,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    ImageRef,
    Progress,
    execution_error_sentence,
)

log = logging.getLogger("fategen.comfy")

#: Progress updates kept per prompt while nobody follows it.
PROGRESS_BUFFER = 64

OnProgress = Callable[[int, int], None]


class Stalled(Exception):
    """No event for the prompt within the stall limit (internal to the session)."""


class Tracker:
    """What the reader learnt about one prompt; ``changed()`` fires when the follower must look.

    ``complete`` is True while the tracker has seen every message of the prompt (it was tracked
    from before the post, and no reconnect left a gap): only then are the ``executed`` messages
    a full account of its outputs.
    """

    def __init__(self, prompt_id: str, workflow: Mapping[str, Any], connection: int) -> None:
        self.prompt_id = prompt_id
        self.workflow = workflow
        #: The connection whose messages this tracker has seen; differs after a reconnect.
        self.connection = connection
        self.last_activity = trio.current_time()
        self.started = False
        self.finished = False
        self.succeeded = False
        self.failure: str | None = None
        self.cancelled = False
        self.complete = True
        self.progress: deque[tuple[int, int]] = deque(maxlen=PROGRESS_BUFFER)
        self.executed_images: list[ImageRef] = []
        #: Nodes whose ``executed`` message listed images.
        self.executed_nodes: set[str | None] = set()
        self._on_progress: OnProgress | None = None
        self._changed = trio.Event()

    def changed(self) -> trio.Event:
        return self._changed

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def touch(self) -> None:
        """A sign of life: the stall clock starts again (the follower is not woken)."""
        self.last_activity = trio.current_time()

    def follow_progress(self, on_progress: OnProgress | None) -> None:
        """Hand the buffered progress to ``on_progress``, then each new step as it comes."""
        while self.progress:
            value, maximum = self.progress.popleft()
            if on_progress is not None:
                on_progress(value, maximum)
        self._on_progress = on_progress

    #: Called with each sampler preview (image bytes, MIME type), if set.
    on_preview: Callable[[bytes, str], None] | None = None

    def preview(self, image: bytes, mime: str) -> None:
        report = self.on_preview
        if report is None:
            return
        try:
            report(image, mime)
        except Exception:  # the reader must outlive a broken callback
            log.exception("prompt %s: the preview callback failed", self.prompt_id)
            self.on_preview = None

    def _report(self, value: int, maximum: int) -> None:
        report = self._on_progress
        if report is None:
            self.progress.append((value, maximum))
            return
        try:
            report(value, maximum)
        except Exception:  # the reader must outlive a broken callback; the follow goes on
            log.exception("prompt %s: the progress callback failed", self.prompt_id)
            self._on_progress = None

    def apply(self, message: ComfyMessage) -> None:
        self.last_activity = trio.current_time()
        if isinstance(message, Progress):
            self._report(message.value, message.max)
        elif isinstance(message, Executing):
            self.started = True
            if message.node is None:
                self.finished = True
                self.notify()
        elif isinstance(message, ExecutionStart | ExecutionCached):
            self.started = True
        elif isinstance(message, Executed):
            if message.images:
                self.executed_images.extend(message.images)
                self.executed_nodes.add(message.node)
        elif isinstance(message, ExecutionSuccess):
            self.succeeded = True
        elif isinstance(message, ExecutionError):
            self.failure = self.failure or execution_error_sentence(message, self.workflow)
            self.notify()
        elif isinstance(message, ExecutionInterrupted):
            self.failure = self.failure or INTERRUPTED
            self.notify()

    def outputs_known(self) -> list[ImageRef] | None:
        """The images, when the WebSocket told everything about them, else ``None``.

        That is: the prompt succeeded, the tracker saw all of its messages, and one node
        listed images in its ``executed`` message (with several output nodes, ``/history``
        gives the order).
        """
        if not (self.complete and self.succeeded and self.failure is None):
            return None
        if len(self.executed_nodes) != 1 or not self.executed_images:
            return None
        return list(self.executed_images)
