"""``Simulator``: a fake ComfyUI served over real HTTP and websockets on 127.0.0.1.

Queue, history, images, loaded model and execution log live on the ``Simulator`` object, so
they survive stopping and restarting ``serve`` (a real ComfyUI would forget them); a prompt that
was running when the server stopped is lost (recorded as ``interrupted``, no history entry).
Pending prompts run once it serves again.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any, NoReturn

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from quart_trio import QuartTrio

from fategen.simulator.engine import Engine
from fategen.simulator.graph import ImageSpec
from fategen.simulator.hub import Hub
from fategen.simulator.knobs import ExecutionRecord, SimulatorKnobs
from fategen.simulator.prompt_queue import PromptQueue, QueueItem
from fategen.simulator.render import render_png
from fategen.simulator.routes import create_app
from fategen.simulator.store import ImageStore
from fategen.simulator.validation import Rejected, check_submission

logger = logging.getLogger(__name__)

_STOP_GRACE_SECONDS = 1.0
# Idle keep-alive HTTP connections hold hypercorn's shutdown for its whole graceful timeout;
# the simulator has no long requests, so a short one stops it quickly.
_HTTP_GRACE_SECONDS = 0.1


class Simulator:
    """A protocol-faithful ComfyUI stand-in. Change ``knobs`` at any time."""

    def __init__(self, knobs: SimulatorKnobs | None = None) -> None:
        self.knobs = knobs if knobs is not None else SimulatorKnobs()
        self.hub = Hub()
        self.queue = PromptQueue(on_change=self._broadcast_status)
        self.store = ImageStore()
        self.engine = Engine(self.knobs, self.queue, self.hub, self.store)
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._next_number = 0

    # -- what tests look at -------------------------------------------------------------

    @property
    def executions(self) -> list[ExecutionRecord]:
        """Every prompt executed so far, in order."""
        return self.engine.executions

    @property
    def free_requests(self) -> list[Any]:
        """The JSON bodies POST /free received."""
        return self.engine.free_requests

    @property
    def loaded_checkpoint(self) -> str | None:
        """The checkpoint in (simulated) memory, if any."""
        return self.engine.loaded_checkpoint

    @property
    def model_loads(self) -> int:
        """How many times a checkpoint was loaded."""
        return self.engine.model_loads

    @property
    def model_swaps(self) -> int:
        """Loads that replaced another loaded checkpoint."""
        return self.engine.model_swaps

    @property
    def history(self) -> dict[str, dict[str, Any]]:
        """History entries by prompt id, oldest first."""
        return self.queue.history

    async def wait_idle(self) -> None:
        """Return once no prompt is pending or running."""
        await self.queue.wait_idle()

    async def wait_running(self, prompt_id: str | None = None) -> QueueItem:
        """Return the running prompt once one (``prompt_id``, if given) has started."""
        return await self.queue.wait_running(prompt_id)

    # -- requests -----------------------------------------------------------------------

    def _broadcast_status(self, remaining: int) -> None:
        self.hub.send("status", {"status": {"exec_info": {"queue_remaining": remaining}}})

    def submit(self, body: Any) -> tuple[int, dict[str, Any]]:
        """POST /prompt: status and JSON answer. Raises ValueError for a non-numeric ``number``."""
        if isinstance(body, dict) and "number" in body:
            number: int | float = float(body["number"])
        else:
            number = self._next_number
            if isinstance(body, dict) and body.get("front"):
                number = -number
            self._next_number += 1
        result = check_submission(
            body,
            checkpoints=self.knobs.checkpoints,
            input_images=self.store.input_images(),
            loras=self.knobs.loras,
            upscale_models=self.knobs.upscale_models,
            image_exists=self.store.exists,
        )
        if isinstance(result, Rejected):
            return result.status, result.body
        assert isinstance(body, dict)
        extra_data = dict(body.get("extra_data") or {})
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        extra_data["create_time"] = int(time.time() * 1000)
        self.queue.put(
            QueueItem(
                number=number,
                prompt_id=result.prompt_id,
                prompt=result.prompt,
                extra_data=extra_data,
                outputs=result.outputs,
                converted=result.converted,
            )
        )
        return 200, {
            "prompt_id": result.prompt_id,
            "number": number,
            "node_errors": result.node_errors,
        }

    # -- serving ------------------------------------------------------------------------

    async def serve(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Serve HTTP and websockets on ``host:port`` and execute prompts, until cancelled.

        Args:
            host: address to listen on.
            port: port to listen on; 0 picks a free one.
            task_status: receives the bound port once the server accepts connections.

        On cancellation, open websockets are closed (code 1001) and the listening socket is
        released, so ``serve`` can be started again on the same port.
        """
        if ("input", "", "example.png") not in self.store:
            example = await trio.to_thread.run_sync(render_png, ImageSpec(512, 512, 1, seed=7), 0)
            self.store.put("input", "", "example.png", example)
        config = Config()
        config.bind = [f"{host}:{port}"]
        config.graceful_timeout = _HTTP_GRACE_SECONDS
        config.errorlog = logger
        shutdown = trio.Event()
        http_done = trio.Event()
        #: Shielded once the server runs, so a cancel stops it gracefully (websockets first);
        #: not while it starts, or a Ctrl+C then would leave `nursery.start` waiting on it.
        http_scope = trio.CancelScope()
        app = create_app(self)
        async with trio.open_nursery() as nursery:
            # Whatever stops this task (Ctrl+C may come at any point) stops the HTTP task too.
            try:
                binds: list[str] = await nursery.start(
                    partial(self._serve_http, app, config, shutdown, http_scope, http_done)
                )
                http_scope.shield = True
                await nursery.start(self.engine.run)
                self.host = host
                self.port = int(binds[0].rsplit(":", 1)[1])
                task_status.started(self.port)
                await trio.sleep_forever()
            finally:
                with trio.move_on_after(2 * _STOP_GRACE_SECONDS, shield=True):
                    self.hub.close_all(1001)
                    with trio.move_on_after(_STOP_GRACE_SECONDS):
                        await self.hub.wait_all_closed()
                    shutdown.set()
                    await http_done.wait()
                http_scope.cancel()

    async def _serve_http(
        self,
        app: QuartTrio,
        config: Config,
        shutdown: trio.Event,
        scope: trio.CancelScope,
        done: trio.Event,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run hypercorn in ``scope`` (shielded once it runs: ``serve`` stops it gracefully,
        then cancels)."""
        try:
            with scope:
                await hypercorn_serve(
                    app, config, shutdown_trigger=shutdown.wait, task_status=task_status
                )
            if not shutdown.is_set() and not scope.cancelled_caught:
                # hypercorn stops by itself on a KeyboardInterrupt raised inside its tasks
                # (trio raises Ctrl+C in whichever task runs) and swallows it: pass it on,
                # or the simulator would go on without its HTTP server.
                raise KeyboardInterrupt
        finally:
            done.set()
