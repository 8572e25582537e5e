"""The executor: runs queued prompts one at a time and tells the websockets, like ComfyUI.

Per prompt the messages are: ``execution_start``, ``execution_cached``, then per node
``progress_state`` (running), ``executing``, ``progress`` per sampler step, ``executed`` for nodes
with output, ``progress_state`` (finished); then ``execution_success`` (or ``execution_error`` /
``execution_interrupted``), the history entry is stored and ``status`` broadcast, and last
``executing`` with ``node: null``. Like ComfyUI, ``status``, ``progress_state``, ``progress`` and
binary frames go to everyone when the prompt has no ``client_id``; the rest only to the client.
"""

from __future__ import annotations

import logging
import math
import posixpath
import random
import string
import time
import traceback
from typing import Any, NoReturn

import attrs
import trio

from fategen.simulator import catalogue, graph, imagespec, render
from fategen.simulator.hub import Hub
from fategen.simulator.knobs import ExecutionRecord, ExecutionStatus, JobFaults, SimulatorKnobs
from fategen.simulator.prompt_queue import PromptQueue, QueueItem
from fategen.simulator.store import ImageStore, OutsideOutputFolder, annotated_path

logger = logging.getLogger(__name__)

_PNG_FRAME = (1).to_bytes(4, "big") + (2).to_bytes(4, "big")
#: The recorded server's ComfyUI folder (paths in its error messages).
_COMFYUI_DIR = "/srv/ComfyUI"
#: ImageUpscaleWithModel's tiles: 512 pixels, overlapping by 32 (one progress step each).
_TILE, _OVERLAP = 512, 32


class NodeFailure(Exception):
    """A node failed while running (becomes ``execution_error``)."""

    def __init__(self, message: str, exception_type: str = "Exception") -> None:
        super().__init__(message)
        self.message = message
        self.exception_type = exception_type


def _format_value(value: object) -> object:
    """How ComfyUI shows an input value in ``execution_error.current_inputs``."""
    if value is None or isinstance(value, int | float | bool | str):
        return value
    return str(value)


def _now_ms() -> int:
    return int(time.time() * 1000)


@attrs.define
class _Run:
    """The state of the prompt being executed."""

    item: QueueItem
    faults: JobFaults
    signatures: dict[str, str]
    cached: set[str]
    order: list[str] = attrs.Factory(list)
    fault_node: str | None = None
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    progress: dict[str, dict[str, Any]] = attrs.Factory(dict)
    executed: list[str] = attrs.Factory(list)
    current: str | None = None
    outputs: dict[str, Any] = attrs.Factory(dict)
    meta: dict[str, Any] = attrs.Factory(dict)
    messages: list[list[Any]] = attrs.Factory(list)

    @property
    def prompt(self) -> dict[str, Any]:
        return self.item.converted

    @property
    def client(self) -> str | None:
        return self.item.client_id


@attrs.define
class Engine:
    """Executes prompts from ``queue``; keeps the model, cache and execution log."""

    knobs: SimulatorKnobs
    queue: PromptQueue
    hub: Hub
    store: ImageStore
    executions: list[ExecutionRecord] = attrs.Factory(list)
    free_requests: list[Any] = attrs.Factory(list)
    loaded_checkpoint: str | None = None
    model_loads: int = 0
    model_swaps: int = 0
    _cache: dict[str, dict[str, Any] | None] = attrs.Factory(dict)
    _run: _Run | None = None
    _limiter: trio.CapacityLimiter = attrs.Factory(lambda: trio.CapacityLimiter(2))

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Execute queued prompts forever. A prompt running when this is cancelled is lost
        (no history entry; recorded as ``interrupted``), like a ComfyUI that was stopped."""
        task_status.started()
        while True:
            item = await self.queue.get()
            await self._execute(item)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: stop the running prompt if it is ``prompt_id`` (any, if None)."""
        run = self._run
        if run is not None and prompt_id in (None, run.item.prompt_id):
            run.scope.cancel()

    def free(self, body: Any) -> None:
        """POST /free: remember the body; unloading models or freeing memory drops the cache."""
        self.free_requests.append(body)
        if isinstance(body, dict) and (body.get("unload_models") or body.get("free_memory")):
            self.loaded_checkpoint = None
            self._cache.clear()

    def executing_node(self, sid: str) -> str | None:
        """The node running for client ``sid`` (ComfyUI tells a reconnecting socket)."""
        run = self._run
        if run is not None and run.client == sid:
            return run.current
        return None

    # -- one prompt ---------------------------------------------------------------------

    def _send_client(self, run: _Run, event: str, data: dict[str, Any]) -> None:
        if run.client is not None:
            self.hub.send(event, data, run.client)

    def _add_message(self, run: _Run, event: str, data: dict[str, Any]) -> None:
        run.messages.append([event, data])
        self._send_client(run, event, data)

    def _send_progress_state(self, run: _Run) -> None:
        nodes = {node_id: dict(state) for node_id, state in run.progress.items()}
        self.hub.send(
            "progress_state", {"prompt_id": run.item.prompt_id, "nodes": nodes}, run.client
        )

    def _set_progress(
        self, run: _Run, node_id: str, value: float, maximum: float, state: str
    ) -> None:
        run.progress[node_id] = {
            "value": value,
            "max": maximum,
            "state": state,
            "node_id": node_id,
            "prompt_id": run.item.prompt_id,
            "display_node_id": node_id,
            "parent_node_id": None,
            "real_node_id": node_id,
        }
        self._send_progress_state(run)

    def _prepare(self, item: QueueItem) -> _Run:
        prompt = item.converted
        signatures = graph.signatures(prompt, self._is_changed(prompt))
        if not self.knobs.caching:
            self._cache.clear()
        # ComfyUI's classic cache keeps only what the current prompt can use.
        wanted = set(signatures.values())
        self._cache = {sig: ui for sig, ui in self._cache.items() if sig in wanted}
        cached = {
            node_id
            for node_id, sig in signatures.items()
            if sig in self._cache and self._loader_ready(prompt[node_id])
        }
        run = _Run(item, self.knobs.take_job_faults(), signatures, cached)
        run.order = graph.execution_order(prompt, item.outputs, cached.__contains__)
        samplers = [
            n for n in run.order if prompt[n]["class_type"] == "KSampler" and n not in cached
        ]
        run.fault_node = samplers[0] if samplers else run.order[-1]
        return run

    def _is_changed(self, prompt: dict[str, Any]) -> dict[str, str]:
        """``LoadImage``'s ``IS_CHANGED``: a digest of the file it loads, by node id."""
        changed = {}
        for node_id, node in prompt.items():
            if node["class_type"] == "LoadImage":
                stored = self.store.find(str(node["inputs"]["image"]))
                changed[node_id] = stored.etag if stored is not None else ""
        return changed

    def _loader_ready(self, node: dict[str, Any]) -> bool:
        if node["class_type"] != "CheckpointLoaderSimple":
            return True
        return bool(node["inputs"]["ckpt_name"] == self.loaded_checkpoint)

    async def _execute(self, item: QueueItem) -> None:
        started = (trio.current_time(), time.monotonic(), time.time())
        run = self._prepare(item)
        self._run = run
        done = False
        try:
            await self._execute_run(run, started)
            done = True
        finally:
            self._run = None
            if not done:
                self._record(run, "interrupted", started)
                self.queue.task_done(item, None)

    async def _execute_run(self, run: _Run, started: tuple[float, float, float]) -> None:
        prompt_id = run.item.prompt_id
        self._add_message(run, "execution_start", {"prompt_id": prompt_id, "timestamp": _now_ms()})
        cached_list = [n for n in run.prompt if n in run.cached]
        self._add_message(
            run,
            "execution_cached",
            {"nodes": cached_list, "prompt_id": prompt_id, "timestamp": _now_ms()},
        )
        status: ExecutionStatus = "success"
        with run.scope:
            try:
                for node_id in run.order:
                    run.current = node_id
                    await self._run_node(run, node_id)
                    run.executed.append(node_id)
                    run.current = None
            except NodeFailure as failure:
                status = "error"
                self._add_message(run, "execution_error", self._error_data(run, failure))
        if run.scope.cancelled_caught:
            status = "interrupted"
            node_id = next(n for n in run.order if n not in run.executed)
            self._add_message(
                run,
                "execution_interrupted",
                {
                    "prompt_id": prompt_id,
                    "node_id": node_id,
                    "node_type": run.prompt[node_id]["class_type"],
                    "executed": list(run.executed),
                    "timestamp": _now_ms(),
                },
            )
        elif status == "success":
            self._add_message(
                run, "execution_success", {"prompt_id": prompt_id, "timestamp": _now_ms()}
            )
        self._record(run, status, started)
        entry = {
            "prompt": run.item.as_json(),
            "outputs": run.outputs,
            "status": {
                "status_str": "success" if status == "success" else "error",
                "completed": status == "success",
                "messages": run.messages,
            },
            "meta": run.meta,
        }
        self.queue.task_done(run.item, entry)
        self._send_client(run, "executing", {"node": None, "prompt_id": prompt_id})

    def _record(
        self, run: _Run, status: ExecutionStatus, started: tuple[float, float, float]
    ) -> None:
        record = ExecutionRecord(
            prompt_id=run.item.prompt_id,
            checkpoint=graph.first_checkpoint(run.prompt),
            loras=graph.lora_names(run.prompt),
            input_images=graph.input_image_names(run.prompt),
            status=status,
            started=started[0],
            finished=trio.current_time(),
            started_monotonic=started[1],
            finished_monotonic=time.monotonic(),
            started_wall=started[2],
            finished_wall=time.time(),
        )
        self.executions.append(record)
        logger.info(
            "executed prompt %s (%s): %s in %.3f s",
            record.prompt_id,
            record.checkpoint or "no checkpoint",
            record.status,
            record.duration,
        )

    def _error_data(self, run: _Run, failure: NodeFailure) -> dict[str, Any]:
        node_id = run.current or run.order[-1]
        inputs = run.prompt[node_id]["inputs"]
        hidden = {"prompt": run.item.prompt, **run.item.extra_data}
        return {
            "prompt_id": run.item.prompt_id,
            "node_id": node_id,
            "node_type": run.prompt[node_id]["class_type"],
            "executed": list(run.executed),
            "exception_message": failure.message,
            "exception_type": failure.exception_type,
            "traceback": traceback.format_tb(failure.__traceback__),
            "current_inputs": {
                **{name: [_format_value(value)] for name, value in inputs.items()},
                **{
                    name: [_format_value(hidden.get(name))]
                    for name in catalogue.hidden_inputs(run.prompt[node_id]["class_type"])
                },
            },
            "current_outputs": [*run.executed, node_id],
            "timestamp": _now_ms(),
        }

    # -- nodes --------------------------------------------------------------------------

    async def _fault_point(self, run: _Run, node_id: str) -> None:
        if node_id != run.fault_node:
            return
        if run.faults.drop_ws:
            self.hub.close_all(1011)
        if run.faults.error:
            raise NodeFailure("Simulated failure (execution_error fault)", "RuntimeError")
        if run.faults.hang:
            await trio.sleep_forever()

    def _executed(self, run: _Run, node_id: str, output: dict[str, Any]) -> None:
        run.outputs[node_id] = output
        run.meta[node_id] = {
            "node_id": node_id,
            "display_node": node_id,
            "parent_node": None,
            "real_node_id": node_id,
        }
        self._send_client(
            run,
            "executed",
            {
                "node": node_id,
                "display_node": node_id,
                "output": output,
                "prompt_id": run.item.prompt_id,
            },
        )

    async def _run_node(self, run: _Run, node_id: str) -> None:
        if node_id in run.cached:
            await self._fault_point(run, node_id)
            output = self._cache.get(run.signatures[node_id])
            if output is not None:
                self._executed(run, node_id, output)
            self._set_progress(run, node_id, 1, 1, "finished")
            return
        self._set_progress(run, node_id, 0.0, 1.0, "running")
        self._send_client(
            run,
            "executing",
            {"node": node_id, "display_node": node_id, "prompt_id": run.item.prompt_id},
        )
        await trio.lowlevel.checkpoint()
        try:
            maximum, output = await self._work(run, node_id)
        except NodeFailure:
            raise
        except Exception as exc:
            raise NodeFailure(str(exc), type(exc).__name__) from exc
        if output is not None:
            self._executed(run, node_id, output)
        self._set_progress(run, node_id, maximum, maximum, "finished")
        self._cache[run.signatures[node_id]] = output

    async def _work(self, run: _Run, node_id: str) -> tuple[int | float, dict[str, Any] | None]:
        """Simulate one node: the progress maximum it finishes at, and its UI output."""
        node = run.prompt[node_id]
        class_type, inputs = node["class_type"], node["inputs"]
        if class_type == "KSampler":
            return await self._sample(run, node_id), None
        await self._fault_point(run, node_id)
        if class_type == "CheckpointLoaderSimple":
            await self._load_checkpoint(str(inputs["ckpt_name"]))
        elif class_type in graph.LORA_LOADERS and str(inputs["lora_name"]) not in self.knobs.loras:
            # Passes validation, then the file went away (the knob changed): ComfyUI's error.
            raise NodeFailure(
                f"Model in folder 'loras' with filename '{inputs['lora_name']}' not found.",
                "FileNotFoundError",
            )
        elif class_type == "UpscaleModelLoader" and (
            str(inputs["model_name"]) not in self.knobs.upscale_models
        ):
            raise NodeFailure(
                f"Model in folder 'upscale_models' with filename '{inputs['model_name']}' "
                "not found.",
                "FileNotFoundError",
            )
        elif class_type == "LoadImage":
            await self._load_image(str(inputs["image"]))
        elif class_type == "ImageUpscaleWithModel":
            return await self._upscale(run, node_id), None
        elif class_type in ("SaveImage", "PreviewImage"):
            return 1.0, await self._save(run, node_id)
        elif class_type == "SaveImageWebsocket":
            return await self._save_websocket(run, node_id), None
        return 1.0, None

    async def _load_checkpoint(self, name: str) -> None:
        if name not in self.knobs.checkpoints:
            raise NodeFailure(
                f"Model in folder 'checkpoints' with filename '{name}' not found.",
                "FileNotFoundError",
            )
        if self.loaded_checkpoint == name:
            return
        await trio.sleep(self.knobs.model_load_seconds)
        if self.loaded_checkpoint is not None:
            self.model_swaps += 1
        self.model_loads += 1
        self.loaded_checkpoint = name

    async def _load_image(self, name: str) -> None:
        """Fail like ComfyUI's ``LoadImage`` when the file went away or cannot be decoded (its
        PyAV reader raises ``InvalidDataError``)."""
        stored = self.store.find(name)
        if stored is None:
            raise NodeFailure(f"Invalid image file: {name}", "FileNotFoundError")
        try:
            await trio.to_thread.run_sync(render.decode, stored.data, limiter=self._limiter)
        except (OSError, ValueError) as exc:
            folder, subfolder, filename = annotated_path(name)
            path = posixpath.join(_COMFYUI_DIR, folder, subfolder, filename)
            raise NodeFailure(
                f"[Errno 1094995529] Invalid data found when processing input: '{path}'",
                "av.error.InvalidDataError",
            ) from exc

    async def _upscale(self, run: _Run, node_id: str) -> int:
        """ImageUpscaleWithModel: one progress step per tile of its input, ``step_seconds``
        each (``comfy.utils.get_tiled_scale_steps``)."""
        link = run.prompt[node_id]["inputs"]["image"]
        spec = imagespec.image_spec(run.prompt, link, self.store.size_of)
        stride = _TILE - _OVERLAP
        tiles = spec.batch_size * math.ceil(spec.height / stride) * math.ceil(spec.width / stride)
        for tile in range(1, tiles + 1):
            await trio.sleep(self.knobs.step_seconds)
            self._set_progress(run, node_id, tile, tiles, "running")
            self.hub.send(
                "progress",
                {"value": tile, "max": tiles, "prompt_id": run.item.prompt_id, "node": node_id},
                run.client,
            )
        return tiles

    async def _sample(self, run: _Run, node_id: str) -> int:
        steps = int(run.prompt[node_id]["inputs"]["steps"])
        method = run.item.extra_data.get("preview_method")
        spec = imagespec.image_spec(run.prompt, [node_id, 0], self.store.size_of)
        for step in range(1, steps + 1):
            await trio.sleep(self.knobs.step_seconds)
            self._set_progress(run, node_id, step, steps, "running")
            preview = None
            if method not in (None, "none"):
                preview = await trio.to_thread.run_sync(
                    render.render_preview_jpeg, spec, step, limiter=self._limiter
                )
                metadata = {
                    "node_id": node_id,
                    "prompt_id": run.item.prompt_id,
                    "display_node_id": node_id,
                    "parent_node_id": None,
                    "real_node_id": node_id,
                    "image_type": "image/jpeg",
                }
                self.hub.send_preview(preview, metadata, run.client, with_metadata=True)
            self.hub.send(
                "progress",
                {"value": step, "max": steps, "prompt_id": run.item.prompt_id, "node": node_id},
                run.client,
            )
            if preview is not None:
                self.hub.send_preview(preview, {}, run.client, with_metadata=False)
            if step == 1:
                await self._fault_point(run, node_id)
        return steps

    async def _render(self, spec: imagespec.ImageSpec, index: int) -> bytes:
        """Image ``index`` of the batch as PNG, from the input image when it has one."""
        stored = self.store.find(spec.input_image) if spec.input_image is not None else None
        source = stored.data if stored is not None else None
        return await trio.to_thread.run_sync(
            render.render_png, spec, index, source, limiter=self._limiter
        )

    async def _save(self, run: _Run, node_id: str) -> dict[str, Any]:
        node = run.prompt[node_id]
        spec = imagespec.image_spec(run.prompt, node["inputs"]["images"], self.store.size_of)
        if node["class_type"] == "SaveImage":
            folder, prefix = "output", str(node["inputs"].get("filename_prefix", "ComfyUI"))
        else:
            suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(5))
            folder, prefix = "temp", f"ComfyUI_temp_{suffix}"
        try:
            subfolder, names = self.store.reserve(folder, prefix, spec.batch_size)
        except OutsideOutputFolder as exc:
            raise NodeFailure(str(exc)) from exc
        for index, name in enumerate(names):
            self.store.put(folder, subfolder, name, await self._render(spec, index))
        return {
            "images": [{"filename": name, "subfolder": subfolder, "type": folder} for name in names]
        }

    async def _save_websocket(self, run: _Run, node_id: str) -> int:
        link = run.prompt[node_id]["inputs"]["images"]
        spec = imagespec.image_spec(run.prompt, link, self.store.size_of)
        batch = spec.batch_size
        for index in range(batch):
            self._set_progress(run, node_id, index, batch, "running")
            self.hub.send(
                "progress",
                {"value": index, "max": batch, "prompt_id": run.item.prompt_id, "node": node_id},
                run.client,
            )
            self.hub.send_binary(_PNG_FRAME + await self._render(spec, index), run.client)
        return batch
