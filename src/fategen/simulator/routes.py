"""The HTTP and websocket routes of the simulated ComfyUI (each also under ``/api``)."""

from __future__ import annotations

import json
import mimetypes
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

import trio
from quart import Response, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from fategen.simulator import catalogue, render
from fategen.simulator.auth import authorized
from fategen.simulator.hub import Close, Connection, text_message
from fategen.simulator.knobs import ExecutionRecord
from fategen.simulator.static_info import FEATURES, MODEL_FOLDERS, system_stats
from fategen.simulator.upload import UploadRefused, upload_image

if TYPE_CHECKING:
    from fategen.simulator.server import Simulator

CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval' blob:; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self'; "
    "connect-src 'self' data:; frame-src 'self'; object-src 'self';"
)
_SERVER_ERROR = "500 Internal Server Error\n\nServer got itself in trouble"


def json_response(data: Any, status: int = 200) -> Response:
    """JSON the way aiohttp sends it."""
    return Response(json.dumps(data), status, content_type="application/json; charset=utf-8")


def empty_response(status: int = 200, content_type: str | None = None) -> Response:
    """An empty body; without a Content-Type unless given (aiohttp's ``web.Response()``)."""
    response = Response(b"", status)
    del response.headers["Content-Type"]
    if content_type is not None:
        response.headers["Content-Type"] = content_type
    return response


def server_error() -> Response:
    """aiohttp's answer to an unhandled exception."""
    return Response(_SERVER_ERROR, 500, content_type="text/plain; charset=utf-8")


def unauthorized() -> Response:
    """What a reverse proxy checking a bearer token answers without the right one."""
    response = json_response({"error": "unauthorized"}, 401)
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def execution_json(record: ExecutionRecord) -> dict[str, Any]:
    """One execution for ``GET /sim/executions``; times are wall-clock (``time.time()``)."""
    return {
        "prompt_id": record.prompt_id,
        "started": record.started_wall,
        "ended": record.finished_wall,
        "status": record.status,
        "checkpoint": record.checkpoint,
        "input_images": list(record.input_images),
    }


async def _json_body() -> Any:
    """The request's JSON body (raises ValueError when it is not JSON)."""
    return json.loads(await request.get_data(as_text=True))


async def _discard_body() -> None:
    """Read the request's body and drop it: an answer sent before the body was read leaves
    the keep-alive connection stuck for the client's next request."""
    try:
        await request.get_data()
    except HTTPException:  # too large: answer anyway
        pass


async def _upload_field() -> tuple[str, bytes] | str | None:
    """The multipart field ``image``: (file name, bytes) for a file, text for a plain field."""
    upload = (await request.files).get("image")
    if upload is None:
        text: str | None = (await request.form).get("image")
        return text
    data: bytes = await trio.to_thread.run_sync(upload.read)  # may be spooled to disk
    return upload.filename or "", data


def _files(sim: Simulator) -> dict[str, list[str]]:
    """The file choice lists of GET /object_info, from the simulator's state."""
    return {
        "checkpoints": sim.knobs.checkpoints,
        "input_images": sim.store.input_images(),
        "loras": sim.knobs.loras,
        "upscale_models": sim.knobs.upscale_models,
    }


def create_app(sim: Simulator) -> QuartTrio:
    """A QuartTrio app answering like ComfyUI, backed by ``sim``."""
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 100 * 1024 * 1024

    def route(rule: str, methods: list[str]) -> Callable[[Callable[..., Awaitable[Response]]], Any]:
        def register(view: Callable[..., Awaitable[Response]]) -> Any:
            for prefix in ("", "/api"):
                app.add_url_rule(prefix + rule, f"{prefix}{view.__name__}", view, methods=methods)
            return view

        return register

    @app.before_request
    async def check_token() -> Response | None:
        if authorized(request.headers.get("Authorization"), sim.knobs.required_token):
            return None
        await _discard_body()
        return unauthorized()

    @app.before_websocket
    async def check_websocket_token() -> Response | None:
        if authorized(websocket.headers.get("Authorization"), sim.knobs.required_token):
            return None
        return unauthorized()  # sent instead of the handshake's 101

    @app.after_request
    async def add_csp(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CSP
        return response

    @app.errorhandler(404)
    async def not_found(_: Exception) -> Response:
        return empty_response(404, "application/octet-stream")

    @app.errorhandler(405)
    async def not_allowed(_: Exception) -> Response:
        return Response("405: Method Not Allowed", 405, content_type="text/plain; charset=utf-8")

    @app.errorhandler(500)
    async def failed(_: Exception) -> Response:
        return server_error()

    @route("/prompt", ["POST"])
    async def post_prompt() -> Response:
        if sim.knobs.http_500:
            return server_error()
        try:
            body = await _json_body()
            status, answer = sim.submit(body)
        except (ValueError, TypeError):
            return server_error()
        return json_response(answer, status)

    @route("/prompt", ["GET"])
    async def get_prompt() -> Response:
        return json_response({"exec_info": {"queue_remaining": sim.queue.remaining()}})

    @route("/queue", ["GET"])
    async def get_queue() -> Response:
        return json_response(sim.queue.status())

    @route("/queue", ["POST"])
    async def post_queue() -> Response:
        body = await _json_body()
        if body.get("clear"):
            sim.queue.clear()
        if "delete" in body:
            sim.queue.delete(body["delete"])
        return empty_response()

    @route("/interrupt", ["POST"])
    async def post_interrupt() -> Response:
        try:
            body = await _json_body()
        except ValueError:
            body = {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        sim.engine.interrupt(prompt_id)
        return empty_response()

    @route("/free", ["POST"])
    async def post_free() -> Response:
        sim.engine.free(await _json_body())
        return empty_response()

    @route("/history", ["GET"])
    async def get_history() -> Response:
        max_items = request.args.get("max_items")
        offset = request.args.get("offset")
        return json_response(
            sim.queue.history_slice(
                int(max_items) if max_items is not None else None,
                int(offset) if offset is not None else -1,
            )
        )

    @route("/history/<prompt_id>", ["GET"])
    async def get_history_entry(prompt_id: str) -> Response:
        entry = sim.queue.history.get(prompt_id)
        return json_response({prompt_id: entry} if entry is not None else {})

    @route("/history", ["POST"])
    async def post_history() -> Response:
        body = await _json_body()
        if body.get("clear"):
            sim.queue.history.clear()
        for prompt_id in body.get("delete", []):
            sim.queue.history.pop(prompt_id, None)
        return empty_response()

    @route("/view", ["GET"])
    async def view() -> Response:
        filename = request.args.get("filename", "")
        folder = request.args.get("type") or "output"
        subfolder = request.args.get("subfolder", "")
        stored = sim.store.get(folder, subfolder, filename) if filename else None
        if stored is None:
            return empty_response(404)
        data = render.corrupt(stored.data) if sim.knobs.corrupt_image else stored.data
        trickle, extra = sim.knobs.view_trickle_seconds, sim.knobs.view_extra_bytes
        response = Response(
            _faulty_body(data, trickle, extra) if trickle or extra else data,
            200,
            content_type=mimetypes.guess_type(filename)[0] or "application/octet-stream",
        )
        if trickle or extra:
            response.timeout = None  # a streamed body: no response timeout
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Disposition"] = f'filename="{filename}"'
        response.headers["Etag"] = stored.etag
        response.headers["Last-Modified"] = formatdate(stored.written, usegmt=True)
        response.headers["Accept-Ranges"] = "bytes"
        return response

    @route("/upload/image", ["POST"])
    async def post_upload_image() -> Response:
        try:
            fields = dict((await request.form).items())
            return json_response(upload_image(sim.store, await _upload_field(), fields))
        except UploadRefused as refused:
            return empty_response(400) if refused.status == 400 else server_error()

    @route("/object_info", ["GET"])
    async def object_info() -> Response:
        return json_response(catalogue.object_info(**_files(sim)))

    @route("/object_info/<node_class>", ["GET"])
    async def object_info_node(node_class: str) -> Response:
        if not catalogue.is_known(node_class):
            return json_response({})
        return json_response({node_class: catalogue.node_info(node_class, **_files(sim))})

    @route("/models", ["GET"])
    async def models() -> Response:
        return json_response(MODEL_FOLDERS)

    @route("/models/<folder>", ["GET"])
    async def models_in(folder: str) -> Response:
        if folder not in MODEL_FOLDERS:
            return empty_response(404)
        files = {
            "checkpoints": sim.knobs.checkpoints,
            "loras": sim.knobs.loras,
            "upscale_models": sim.knobs.upscale_models,
        }
        return json_response(list(files.get(folder, [])))

    @route("/embeddings", ["GET"])
    async def embeddings() -> Response:
        return json_response([])

    @route("/system_stats", ["GET"])
    async def get_system_stats() -> Response:
        return json_response(system_stats(sim.host, sim.port))

    @route("/features", ["GET"])
    async def features() -> Response:
        return json_response(FEATURES)

    @route("/sim/executions", ["GET"])
    async def sim_executions() -> Response:
        """Not ComfyUI's: the finished executions, in order (the running one is not listed)."""
        return json_response({"executions": [execution_json(r) for r in sim.executions]})

    async def ws() -> None:
        sid = websocket.args.get("clientId") or uuid.uuid4().hex
        await websocket.accept()
        code = 1000
        with sim.hub.connect(sid) as (connection, outbox):
            with connection.cancel_scope:
                status = {"exec_info": {"queue_remaining": sim.queue.remaining()}}
                await websocket.send(text_message("status", {"status": status, "sid": sid}))
                node = sim.engine.executing_node(sid)
                if node is not None:
                    await websocket.send(text_message("executing", {"node": node}))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_read_client, connection)
                    async for message in outbox:
                        if isinstance(message, Close):
                            code = message.code
                            break
                        await websocket.send(message)
                    nursery.cancel_scope.cancel()
            if connection.cancel_scope.cancelled_caught:
                code = 1011
        await websocket.close(code)

    for prefix in ("", "/api"):
        app.add_websocket(prefix + "/ws", f"{prefix}ws", ws)
    return app


async def _read_client(connection: Connection) -> None:
    """Answer the client's ``feature_flags``; ignore anything else it sends."""
    while True:
        raw = await websocket.receive()
        try:
            message = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(message, dict) or message.get("type") != "feature_flags":
            continue
        flags = message.get("data")
        if isinstance(flags, dict):
            connection.supports_preview_metadata = bool(flags.get("supports_preview_metadata"))
        connection.push(text_message("feature_flags", FEATURES))


async def _faulty_body(data: bytes, trickle: float, extra: int) -> AsyncIterator[bytes]:
    """The image's bytes one at a time ``trickle`` seconds apart, then ``extra`` bytes more."""
    if trickle:
        for i in range(len(data)):
            yield data[i : i + 1]
            await trio.sleep(trickle)
    else:
        yield data
    chunk = b"\0" * 2**20
    while extra > 0:
        yield chunk[: min(extra, len(chunk))]
        extra -= len(chunk)
