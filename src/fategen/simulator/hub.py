"""Open websockets and what is sent to them.

ComfyUI addresses a message to one ``sid`` (the socket's ``clientId``) or, with no sid, to every
socket. Each socket has a bounded outbox; a socket whose outbox is full is closed (code 1011)
rather than slowing the executor down.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio

OUTBOX_SIZE = 1024


@attrs.frozen
class Close:
    """Ask a socket's handler to close the websocket with ``code``."""

    code: int


Outgoing = str | bytes | Close


@attrs.define(eq=False)
class Connection:
    """One open websocket as the hub sees it."""

    sid: str
    outbox: trio.MemorySendChannel[Outgoing]
    supports_preview_metadata: bool = False
    cancel_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)

    def push(self, message: Outgoing) -> None:
        """Queue a message; close the socket if its outbox is full."""
        try:
            self.outbox.send_nowait(message)
        except trio.WouldBlock:
            self.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def text_message(event: str, data: dict[str, Any]) -> str:
    """A ComfyUI text frame."""
    return json.dumps({"type": event, "data": data})


@attrs.define
class Hub:
    """The registry of open websockets."""

    _connections: list[Connection] = attrs.Factory(list)
    _changed: trio.Event = attrs.Factory(trio.Event)

    @contextmanager
    def connect(self, sid: str) -> Iterator[tuple[Connection, trio.MemoryReceiveChannel[Outgoing]]]:
        """Register a socket for as long as the ``with`` block lasts."""
        send, receive = trio.open_memory_channel[Outgoing](OUTBOX_SIZE)
        connection = Connection(sid, send)
        self._connections.append(connection)
        try:
            with send, receive:
                yield connection, receive
        finally:
            self._connections.remove(connection)
            self._changed.set()
            self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self._connections)

    def _targets(self, sid: str | None) -> list[Connection]:
        if sid is None:
            return list(self._connections)
        # Like ComfyUI's dict of sockets by sid: the newest socket with that sid gets it.
        newest = [c for c in self._connections if c.sid == sid][-1:]
        return newest

    def send(self, event: str, data: dict[str, Any], sid: str | None = None) -> None:
        """Send to the socket ``sid``, or to every socket when ``sid`` is None."""
        message = text_message(event, data)
        for connection in self._targets(sid):
            connection.push(message)

    def send_binary(self, payload: bytes, sid: str | None = None) -> None:
        """Send a binary frame to ``sid`` or to everyone."""
        for connection in self._targets(sid):
            connection.push(payload)

    def send_preview(
        self, preview: bytes, metadata: dict[str, Any], sid: str | None, *, with_metadata: bool
    ) -> None:
        """A sampler JPEG preview, only to the sockets that did (or did not) ask for metadata.

        ComfyUI sends event 4 (JSON metadata, then the image) *before* the step's ``progress``
        to sockets that sent ``supports_preview_metadata``, and event 1 *after* it to others.
        """
        meta = json.dumps(metadata).encode()
        for connection in self._targets(sid):
            if connection.supports_preview_metadata != with_metadata:
                continue
            if with_metadata:
                frame = (4).to_bytes(4, "big") + len(meta).to_bytes(4, "big") + meta + preview
            else:
                frame = (1).to_bytes(4, "big") + (1).to_bytes(4, "big") + preview
            connection.push(frame)

    def close_all(self, code: int) -> None:
        """Ask every open socket to close (after the messages already queued)."""
        for connection in list(self._connections):
            connection.push(Close(code))

    async def wait_all_closed(self) -> None:
        """Return once no socket is open."""
        while self._connections:
            await self._changed.wait()
