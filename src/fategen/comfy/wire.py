"""ComfyUI's wire protocol: WebSocket messages, error sentences, and a thin REST client.

Everything here agrees with the recordings in ``comfyui-protocol/`` (ComfyUI 0.33). The
session that ties the WebSocket to the REST calls lives in :mod:`fategen.comfy.session`.

WebSocket text frames are ``{"type": ..., "data": {...}}``; :func:`parse_message` maps
``type`` to a small frozen attrs class through :data:`MESSAGE_TYPES` and returns ``None`` for
types we do not use (``progress_state``, ``feature_flags``, ...) and for malformed frames.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import httpx
import trio

from fategen.errors import ComfyError, ComfyUnavailable, ImageError

log = logging.getLogger("fategen.comfy")

#: Longest exception text from ComfyUI we put in a sentence.
_MAX_DETAIL = 300


@attrs.frozen
class ImageRef:
    """One image ComfyUI wrote, as named in ``executed`` messages and ``/history`` outputs."""

    filename: str
    subfolder: str = ""
    type: str = "output"

    @classmethod
    def from_json(cls, item: Any) -> ImageRef | None:
        """``{"filename", "subfolder", "type"}`` -> ImageRef; ``None`` if it is not one."""
        if not isinstance(item, Mapping):
            return None
        filename = item.get("filename")
        if not isinstance(filename, str) or not filename:
            return None
        subfolder = item.get("subfolder") or ""
        kind = item.get("type") or "output"
        return cls(filename, str(subfolder), str(kind))


# --- WebSocket messages ---------------------------------------------------------------------


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return None if value is None else str(value)


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if value is None:
        raise KeyError(key)
    return str(value)


@attrs.frozen
class Status:
    """``status``: the queue length (``queue_remaining`` counts the running prompt)."""

    queue_remaining: int | None
    sid: str | None = None

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Status:
        status = data.get("status") or {}
        remaining = (status.get("exec_info") or {}).get("queue_remaining")
        return cls(int(remaining) if remaining is not None else None, _opt_str(data, "sid"))


@attrs.frozen
class ExecutionStart:
    prompt_id: str

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> ExecutionStart:
        return cls(_str(data, "prompt_id"))


@attrs.frozen
class ExecutionCached:
    prompt_id: str
    nodes: tuple[str, ...]

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> ExecutionCached:
        return cls(_str(data, "prompt_id"), tuple(str(n) for n in data.get("nodes") or ()))


@attrs.frozen
class Executing:
    """``executing``; ``node is None`` is the last message of a prompt, whatever its end."""

    prompt_id: str
    node: str | None

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Executing:
        return cls(_str(data, "prompt_id"), _opt_str(data, "node"))


@attrs.frozen
class Progress:
    """``progress``: step ``value`` of ``max`` in ``node`` (sampler steps, batch images)."""

    prompt_id: str
    node: str | None
    value: int
    max: int

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Progress:
        return cls(
            _str(data, "prompt_id"), _opt_str(data, "node"), int(data["value"]), int(data["max"])
        )


@attrs.frozen
class ProgressState:
    """``progress_state``: kept only as a sign of life for the prompt."""

    prompt_id: str

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> ProgressState:
        return cls(_str(data, "prompt_id"))


@attrs.frozen
class Executed:
    """``executed``: a node with UI output finished; ``images`` from ``output.images``."""

    prompt_id: str
    node: str | None
    images: tuple[ImageRef, ...]

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Executed:
        output = data.get("output") or {}
        refs = (ImageRef.from_json(item) for item in output.get("images") or ())
        return cls(_str(data, "prompt_id"), _opt_str(data, "node"), tuple(r for r in refs if r))


@attrs.frozen
class ExecutionSuccess:
    """Sent BEFORE the history entry is stored; ``executing`` with ``node: null`` follows."""

    prompt_id: str

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> ExecutionSuccess:
        return cls(_str(data, "prompt_id"))


@attrs.frozen
class ExecutionError:
    prompt_id: str
    node_id: str | None
    node_type: str | None
    exception_type: str | None
    exception_message: str

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> ExecutionError:
        return cls(
            _str(data, "prompt_id"),
            _opt_str(data, "node_id"),
            _opt_str(data, "node_type"),
            _opt_str(data, "exception_type"),
            str(data.get("exception_message") or ""),
        )


@attrs.frozen
class ExecutionInterrupted:
    prompt_id: str
    node_id: str | None
    node_type: str | None

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> ExecutionInterrupted:
        return cls(_str(data, "prompt_id"), _opt_str(data, "node_id"), _opt_str(data, "node_type"))


ComfyMessage = (
    Status
    | ExecutionStart
    | ExecutionCached
    | Executing
    | Progress
    | ProgressState
    | Executed
    | ExecutionSuccess
    | ExecutionError
    | ExecutionInterrupted
)

#: WebSocket ``type`` -> constructor from ``data``. Types not listed here are ignored.
MESSAGE_TYPES: Mapping[str, Callable[[Mapping[str, Any]], ComfyMessage]] = {
    "status": Status.from_data,
    "execution_start": ExecutionStart.from_data,
    "execution_cached": ExecutionCached.from_data,
    "executing": Executing.from_data,
    "progress": Progress.from_data,
    "progress_state": ProgressState.from_data,
    "executed": Executed.from_data,
    "execution_success": ExecutionSuccess.from_data,
    "execution_error": ExecutionError.from_data,
    "execution_interrupted": ExecutionInterrupted.from_data,
}


#: How ComfyUI (aiohttp's ``send_json``, i.e. ``json.dumps``) begins a ``progress_state`` frame.
_PROGRESS_STATE_HEAD = '{"type": "progress_state", "data": {"prompt_id": "'


def parse_message(text: str) -> ComfyMessage | None:
    """A WebSocket text frame -> message object; ``None`` if unknown or malformed.

    ``progress_state`` frames (one per node state change and per sampler step, listing every
    node run so far: the largest and most frequent frames) are only a sign of life: their
    ``prompt_id`` is read from the head of the frame as ComfyUI writes it, without decoding
    the rest. A frame in any other form is decoded in full.
    """
    if text.startswith(_PROGRESS_STATE_HEAD):
        start = len(_PROGRESS_STATE_HEAD)
        end = text.find('"', start)
        if end > start and "\\" not in text[start:end]:
            return ProgressState(text[start:end])
    try:
        frame = json.loads(text)
        build = MESSAGE_TYPES.get(frame["type"])
        if build is None:
            return None
        data = frame.get("data") or {}
        if not isinstance(data, Mapping):
            return None
        return build(data)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError):
        # JSON that is no message (a number, 1e999, nesting past the parser's depth): one
        # line, and the connection goes on.
        log.warning("ignoring a malformed ComfyUI message: %.200s", text)
        return None


# --- sentences ----------------------------------------------------------------------------------

#: Inputs whose value_not_in_list means "this model file is not installed".
_MODEL_INPUTS = {
    "ckpt_name": "checkpoint",
    "lora_name": "LoRA",
    "vae_name": "VAE",
    "unet_name": "diffusion model",
    "clip_name": "text encoder",
    "clip_name1": "text encoder",
    "clip_name2": "text encoder",
    "clip_name3": "text encoder",
    "control_net_name": "ControlNet",
    "model_name": "model",
    "style_model_name": "style model",
    "upscale_model": "upscale model",
    "embedding": "embedding",
}


def _clean(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"^\*+\s*", "", text)
    if len(text) > _MAX_DETAIL:
        text = text[: _MAX_DETAIL - 3].rstrip() + "..."
    return text


def node_name(workflow: Mapping[str, Any], node_id: str | None, class_type: str | None) -> str:
    """``node "title" (Class)`` from the workflow's ``_meta.title``, else ``node 3 (Class)``."""
    node = workflow.get(node_id) if node_id is not None else None
    if class_type is None and isinstance(node, Mapping):
        class_type = node.get("class_type")
    title = None
    if isinstance(node, Mapping):
        meta = node.get("_meta")
        if isinstance(meta, Mapping) and isinstance(meta.get("title"), str):
            title = meta["title"].strip() or None
    kind = f" ({class_type})" if class_type else ""
    if title is not None:
        return f'node "{title}"{kind}'
    return f"node {node_id if node_id is not None else '?'}{kind}"


def _one_node_error(
    workflow: Mapping[str, Any], node_id: str, class_type: str | None, error: Mapping[str, Any]
) -> str:
    kind = str(error.get("type") or "")
    message = _clean(str(error.get("message") or "invalid"))
    details = _clean(str(error.get("details") or ""))
    extra = error.get("extra_info")
    extra = extra if isinstance(extra, Mapping) else {}
    input_name = extra.get("input_name")
    where = node_name(workflow, node_id, class_type)
    if kind == "value_not_in_list" and input_name in _MODEL_INPUTS:
        what = _MODEL_INPUTS[str(input_name)]
        return f'{what} "{extra.get("received_value")}" is not installed on ComfyUI'
    if kind == "value_not_in_list":
        return f'{where}: input "{input_name}" value "{extra.get("received_value")}" is not allowed'
    if kind == "required_input_missing":
        return f'{where}: required input "{input_name or details}" is missing'
    if kind == "invalid_input_type":
        return (
            f'{where}: input "{input_name}" cannot use {extra.get("received_value")!r} ({message})'
        )
    if kind == "return_type_mismatch":
        received = extra.get("received_type")
        return f'{where}: input "{input_name}" is linked to a {received} output ({message})'
    if input_name:
        return f'{where}: input "{input_name}" {message}'
    suffix = f" ({details})" if details else ""
    return f"{where}: {message}{suffix}"


def prompt_error_sentence(status: int, body: Any, workflow: Mapping[str, Any]) -> str:
    """The one sentence for a refused ``POST /prompt`` (400 with ``error`` / ``node_errors``)."""
    if not isinstance(body, Mapping):
        text = _clean(str(body or ""))
        return f"ComfyUI refused the prompt ({status}){': ' + text if text else ''}"
    error = body.get("error")
    error = error if isinstance(error, Mapping) else {"message": str(error or "")}
    node_errors = body.get("node_errors")
    kind = error.get("type")
    extra = error.get("extra_info")
    extra = extra if isinstance(extra, Mapping) else {}
    if kind == "missing_node_type":
        class_type = extra.get("class_type")
        if class_type:
            return f'ComfyUI has no node type "{class_type}" (a custom node may be missing)'
        node_id = extra.get("node_id")
        return f"node {node_id} of the workflow has no class_type (the workflow is corrupted)"
    if isinstance(node_errors, Mapping) and node_errors:
        sentences: list[str] = []
        for node_id, entry in node_errors.items():
            if not isinstance(entry, Mapping):
                continue
            class_type = entry.get("class_type")
            for item in entry.get("errors") or ():
                if isinstance(item, Mapping):
                    sentences.append(_one_node_error(workflow, str(node_id), class_type, item))
        if sentences:
            more = len(sentences) - 1
            tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
            return sentences[0] + tail
    if kind == "prompt_no_outputs":
        return "the workflow has no output node (such as SaveImage), so ComfyUI refused it"
    message = _clean(str(error.get("message") or "no reason given"))
    details = _clean(str(error.get("details") or ""))
    if details and details != message:
        message = f"{message} ({details})"
    return f"ComfyUI refused the prompt: {message}"


def execution_error_sentence(error: ExecutionError, workflow: Mapping[str, Any]) -> str:
    """``ComfyUI failed in node "save" (SaveImage): <exception_message>``."""
    where = node_name(workflow, error.node_id, error.node_type)
    detail = _clean(error.exception_message) or error.exception_type or "unknown error"
    return f"ComfyUI failed in {where}: {detail}"


INTERRUPTED = "the job was interrupted on ComfyUI"


def select_images(refs: Iterable[ImageRef]) -> list[ImageRef]:
    """The result images: those of type ``output``; only if there are none, all (``temp``)."""
    found = list(refs)
    saved = [ref for ref in found if ref.type == "output"]
    return saved or found


def images_from_outputs(outputs: Mapping[str, Any]) -> list[ImageRef]:
    """Every image of every output node, in the order ComfyUI lists them.

    Images of type ``output`` (SaveImage) are the result. Only when there are none are
    ``temp`` images (PreviewImage) used, so a workflow with both does not return each twice.
    """
    found: list[ImageRef] = []
    for output in outputs.values():
        if not isinstance(output, Mapping):
            continue
        for item in output.get("images") or ():
            ref = ImageRef.from_json(item)
            if ref is not None:
                found.append(ref)
    return select_images(found)


def history_failure(entry: Mapping[str, Any], workflow: Mapping[str, Any]) -> str | None:
    """The sentence for a history entry that ended in error, else ``None``."""
    status = entry.get("status")
    if not isinstance(status, Mapping) or status.get("status_str") != "error":
        return None
    for item in reversed(status.get("messages") or ()):
        if not (isinstance(item, Sequence) and len(item) == 2 and isinstance(item[1], Mapping)):
            continue
        kind, data = item
        if kind == "execution_interrupted":
            return INTERRUPTED
        if kind == "execution_error":
            try:
                return execution_error_sentence(ExecutionError.from_data(data), workflow)
            except KeyError:
                break
    return "ComfyUI reported an error for the job"


# --- REST ---------------------------------------------------------------------------------------


#: Defaults for `ComfyRest`: a whole call's time limit, and the largest answer taken.
CALL_TIMEOUT = 60.0
MAX_RESPONSE_BYTES = 128 * 2**20


class _TooLarge(Exception):
    """Internal: an answer passed the size limit."""


@attrs.frozen
class Answer:
    """One REST answer from ComfyUI, its body read whole (within the size limit)."""

    status_code: int
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class ComfyRest:
    """The REST calls fategen makes. Transport failures become :class:`ComfyUnavailable`.

    Every call is bounded: it must be over, body and all, within ``call_timeout`` seconds
    (httpx's own timeouts apply to each read, so a body trickling a byte at a time would
    otherwise hold a job forever), and its body may be at most ``max_response_bytes`` (it is
    read as a stream and given up past the limit, so a huge answer costs no memory).
    """

    def __init__(
        self,
        base_url: str,
        http: httpx.AsyncClient,
        *,
        call_timeout: float = CALL_TIMEOUT,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = http
        self.call_timeout = call_timeout
        self.max_response_bytes = max_response_bytes

    async def _request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        ok: Iterable[int] = (200,),
        upload: Mapping[str, Any] | None = None,
    ) -> Answer:
        try:
            with trio.fail_after(self.call_timeout):
                answer = await self._read(method, path, json_body, params, upload)
        except trio.TooSlowError:
            raise ComfyUnavailable(
                f"ComfyUI at {self.base_url} did not answer {what} within {self.call_timeout:g} s"
            ) from None
        except _TooLarge:
            raise ComfyError(
                f"ComfyUI's answer to {what} is larger than "
                f"{self.max_response_bytes / 2**20:g} MiB, the most fategen takes "
                f"(FATEGEN_COMFYUI_MAX_RESPONSE_MIB)"
            ) from None
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            raise ComfyUnavailable(
                f"cannot reach ComfyUI at {self.base_url} ({what}): {reason}"
            ) from exc
        if answer.status_code not in ok and answer.status_code >= 500:
            raise ComfyError(f"ComfyUI answered {answer.status_code} to {what}")
        return answer

    async def _read(
        self,
        method: str,
        path: str,
        json_body: Any,
        params: Mapping[str, str] | None,
        upload: Mapping[str, Any] | None = None,
    ) -> Answer:
        limit = self.max_response_bytes
        extra: dict[str, Any] = {}
        if upload is not None:  # multipart/form-data: {"files": ..., "data": ...}
            extra = dict(upload)
        async with self.http.stream(
            method, self.base_url + path, json=json_body, params=params, **extra
        ) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _TooLarge
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise _TooLarge
            return Answer(response.status_code, bytes(body))

    @staticmethod
    def _json(response: Answer, what: str) -> Any:
        try:
            return response.json()
        except (ValueError, RecursionError):
            raise ComfyError(f"ComfyUI sent an unreadable answer to {what}") from None

    async def post_prompt(
        self,
        workflow: Mapping[str, Any],
        *,
        client_id: str,
        prompt_id: str,
        extra_data: Mapping[str, Any] | None = None,
    ) -> None:
        """``POST /prompt`` (``extra_data``: e.g. ``{"preview_method": "latent2rgb"}`` for
        sampler previews). Raises ComfyError (one sentence) when ComfyUI refuses it."""
        what = "the prompt"
        body: dict[str, Any] = {"prompt": workflow, "client_id": client_id, "prompt_id": prompt_id}
        if extra_data:
            body["extra_data"] = dict(extra_data)
        response = await self._request("POST", "/prompt", what, json_body=body)
        if response.status_code == 200:
            answer = self._json(response, what)
            echoed = answer.get("prompt_id") if isinstance(answer, Mapping) else None
            if echoed != prompt_id:
                raise ComfyError(f"ComfyUI queued the prompt as {echoed!r}, not as {prompt_id!r}")
            return
        try:
            payload: Any = response.json()
        except (ValueError, RecursionError):
            payload = response.text
        raise ComfyError(prompt_error_sentence(response.status_code, payload, workflow))

    async def history(self, prompt_id: str) -> Mapping[str, Any] | None:
        """``GET /history/{id}``: the entry, or ``None`` while there is none (``{}``)."""
        what = "the history look-up"
        response = await self._request("GET", f"/history/{prompt_id}", what)
        if response.status_code != 200:
            raise ComfyError(f"ComfyUI answered {response.status_code} to {what}")
        answer = self._json(response, what)
        entry = answer.get(prompt_id) if isinstance(answer, Mapping) else None
        return entry if isinstance(entry, Mapping) else None

    async def queue(self) -> tuple[set[str], set[str]]:
        """``GET /queue``: (running prompt ids, pending prompt ids)."""
        what = "the queue look-up"
        response = await self._request("GET", "/queue", what)
        answer = self._json(response, what)
        if not isinstance(answer, Mapping):
            raise ComfyError(f"ComfyUI sent an unreadable answer to {what}")

        def ids(key: str) -> set[str]:
            items = answer.get(key) or ()
            return {str(i[1]) for i in items if isinstance(i, Sequence) and len(i) > 1}

        return ids("queue_running"), ids("queue_pending")

    async def delete_from_queue(self, prompt_ids: Sequence[str]) -> None:
        """``POST /queue {"delete": [...]}``: drops pending prompts (running ones stay)."""
        await self._request(
            "POST", "/queue", "the queue delete", json_body={"delete": [*prompt_ids]}
        )

    async def interrupt(self, prompt_id: str) -> None:
        """``POST /interrupt {"prompt_id": id}``: stops that prompt only if it is running."""
        await self._request(
            "POST", "/interrupt", "the interrupt", json_body={"prompt_id": prompt_id}
        )

    async def free(self, *, unload_models: bool, free_memory: bool) -> None:
        """``POST /free``."""
        body = {"unload_models": unload_models, "free_memory": free_memory}
        response = await self._request("POST", "/free", "the free request", json_body=body)
        if response.status_code != 200:
            raise ComfyError(f"ComfyUI answered {response.status_code} to the free request")

    async def view(self, ref: ImageRef) -> bytes:
        """``GET /view?filename=&subfolder=&type=``: the image file's bytes."""
        params = {"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type}
        response = await self._request("GET", "/view", f'the image "{ref.filename}"', params=params)
        if response.status_code == 404:
            raise ImageError(f'ComfyUI has no image "{ref.filename}" (type {ref.type})')
        if response.status_code != 200:
            raise ImageError(
                f'ComfyUI answered {response.status_code} for the image "{ref.filename}"'
            )
        return response.content

    async def upload_image(self, name: str, data: bytes) -> str:
        """``POST /upload/image`` (multipart: ``image``, ``type=input``, ``overwrite=true``):
        the image a job starts from, into ComfyUI's input folder. Returns the name ComfyUI
        stored it as (what ``LoadImage`` names).

        Raises:
            ComfyError: ComfyUI refused it (one sentence).
            ComfyUnavailable: ComfyUI cannot be reached.
        """
        what = f'the upload of "{name}"'
        upload = {
            "files": {"image": (name, data, "image/png")},
            "data": {"type": "input", "overwrite": "true"},
        }
        response = await self._request("POST", "/upload/image", what, upload=upload)
        if response.status_code != 200:
            raise ComfyError(f"ComfyUI answered {response.status_code} to {what}")
        answer = self._json(response, what)
        stored = answer.get("name") if isinstance(answer, Mapping) else None
        if not isinstance(stored, str) or not stored:
            raise ComfyError(f"ComfyUI sent an unreadable answer to {what}")
        subfolder = answer.get("subfolder") or ""
        return f"{subfolder}/{stored}" if subfolder else stored

    async def object_info(self) -> Mapping[str, Any]:
        """``GET /object_info``: every node class (about 750 KB on a stock install)."""
        what = "the node list request"
        response = await self._request("GET", "/object_info", what)
        answer = self._json(response, what)
        if response.status_code != 200 or not isinstance(answer, Mapping):
            raise ComfyError(f"ComfyUI answered {response.status_code} to {what}")
        return answer

    async def checkpoints(self) -> list[str] | None:
        """``GET /models/checkpoints``; ``None`` if this ComfyUI lacks the route (404)."""
        what = "the checkpoint list request"
        response = await self._request("GET", "/models/checkpoints", what)
        if response.status_code == 404:
            return None
        answer = self._json(response, what)
        if response.status_code != 200 or not isinstance(answer, list):
            raise ComfyError(f"ComfyUI answered {response.status_code} to {what}")
        return [str(name) for name in answer]


#: WebSocket binary event types (ComfyUI's ``BinaryEventTypes``).
PREVIEW_IMAGE = 1
PREVIEW_IMAGE_WITH_METADATA = 4
_IMAGE_TYPES = {1: "image/jpeg", 2: "image/png"}


@attrs.frozen
class Preview:
    """A sampler preview from a binary frame: the image, its type, and the prompt it is of
    (known only from event 4, whose metadata names it)."""

    image: bytes
    mime: str
    prompt_id: str | None


def parse_preview(frame: bytes) -> Preview | None:
    """The preview in a binary WebSocket frame, or None (another event, or malformed)."""
    if len(frame) < 8:
        return None
    event = int.from_bytes(frame[:4], "big")
    if event == PREVIEW_IMAGE:
        mime = _IMAGE_TYPES.get(int.from_bytes(frame[4:8], "big"))
        return None if mime is None else Preview(frame[8:], mime, None)
    if event == PREVIEW_IMAGE_WITH_METADATA:
        length = int.from_bytes(frame[4:8], "big")
        if len(frame) < 8 + length:
            return None
        try:
            metadata = json.loads(frame[8 : 8 + length])
        except (ValueError, RecursionError):
            return None
        if not isinstance(metadata, dict):
            return None
        prompt_id = metadata.get("prompt_id")
        image_type = str(metadata.get("image_type", "image/jpeg"))
        return Preview(
            frame[8 + length :],
            image_type if image_type in _IMAGE_TYPES.values() else "image/jpeg",
            str(prompt_id) if prompt_id is not None else None,
        )
    return None
