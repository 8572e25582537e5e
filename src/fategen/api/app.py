"""The HTTP front end: a quart-trio app over the `Frontdesk`, served by hypercorn's trio worker."""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Response, request, send_file
from quart_schema import (
    QuartSchema,
    RequestSchemaValidationError,
    document_headers,
    validate_querystring,
    validate_request,
    validate_response,
)
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from fategen import __version__
from fategen.errors import PromptError, WorkflowError
from fategen.frontdesk import Frontdesk, Refused
from fategen.jobs import JobView
from fategen.schemas import (
    CancelQuery,
    ComfyHealth,
    CompleteOpenAPIProvider,
    DefaultsInfo,
    ErrorResponse,
    HealthResponse,
    JobResponse,
    ModelInfo,
    ModelsResponse,
    Progress,
    SubmitRequest,
    SubmitResponse,
    WaitQuery,
)
from fategen.settings import Settings

log = logging.getLogger("fategen.http")

MAX_BODY = 64 * 1024
OPEN_PATHS = ("/health", "/docs", "/redoc", "/openapi.json")
#: How long the last write of a response (and hypercorn's close after it) may take.
_FINAL_SEND_SECONDS = 10.0


class ClosingHTTPConnection(TrioASGIHTTPConnection):
    """quart-trio's HTTP connection, with the last send of each response shielded.

    Works around hypercorn issue #106 (pgjones/hypercorn): with ``Connection: close`` or
    HTTP/1.0, hypercorn closes the socket from inside the app's final ``send``, after passing
    ``http.disconnect`` to the app; quart-trio then cancels its request nursery, and that
    cancellation interrupts hypercorn's ``send_eof`` before ``aclose``, so the socket stays
    open until the read timeout. Shielding the final send lets the close finish. It lives in
    the app (`create_app` installs it), so it holds under ``fategen serve`` and under plain
    ``hypercorn --worker-class trio`` alike.
    """

    async def __call__(self, receive: Any, send: Any) -> None:
        async def send_last_shielded(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.move_on_after(_FINAL_SEND_SECONDS, shield=True):
                    await send(message)
            else:
                await send(message)

        await super().__call__(receive, send_last_shielded)


@attrs.frozen
class IdempotencyHeaders:
    idempotency_key: str | None = None


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def _error(message: str, status: int, **headers: str) -> Response:
    response = Response(
        json.dumps({"error": message}, ensure_ascii=False),
        status=status,
        content_type="application/json",
    )
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


def _provider(keys_required: bool) -> type[CompleteOpenAPIProvider]:
    """The OpenAPI provider, completed with what quart-schema cannot say from the routes: the
    WebP body of ``/job/{id}/image`` and, when API keys are configured, the bearer scheme."""

    class Provider(CompleteOpenAPIProvider):
        def schema(self) -> dict[str, Any]:
            document: dict[str, Any] = super().schema()
            paths = document.get("paths", {})
            image = paths.get("/job/{job_id}/image", {}).get("get")
            if image is not None:
                image.setdefault("responses", {})[200] = {
                    "description": "The finished image",
                    "content": {"image/webp": {"schema": {"type": "string", "format": "binary"}}},
                }
            if keys_required:
                schemes = document.setdefault("components", {}).setdefault("securitySchemes", {})
                schemes["bearer"] = {"type": "http", "scheme": "bearer"}
                document["security"] = [{"bearer": []}]
                for path in OPEN_PATHS:
                    for operation in paths.get(path, {}).values():
                        operation["security"] = []
            return document

    return Provider


def create_app(desk: Frontdesk, settings: Settings, comfyui_url: str) -> QuartTrio:
    """The quart-trio app; ``desk`` is all it knows of the service."""
    app = QuartTrio("fategen")
    app.asgi_http_class = ClosingHTTPConnection
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["JSON_SORT_KEYS"] = False
    QuartSchema(
        app,
        swagger_ui_path="/docs",
        redoc_ui_path="/redoc",
        openapi_provider_class=_provider(bool(settings.api_keys | settings.admin_keys)),
        info={
            "title": "fategen",
            "version": __version__,
            "description": "Image-generation jobs for chat bots, run on ComfyUI.",
        },
    )
    output_dir = settings.output_dir.resolve()
    all_keys = settings.api_keys | settings.admin_keys

    def key_of_request() -> str | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def matches(token: str | None, keys: frozenset[str]) -> bool:
        if token is None:
            return False
        found = False
        for key in keys:  # compare with every key, in constant time each
            found |= hmac.compare_digest(token.encode(), key.encode())
        return found

    @app.before_request
    async def authenticate() -> Response | None:
        if not all_keys or request.path in OPEN_PATHS:
            return None
        if not matches(key_of_request(), all_keys):
            return _error(
                "a valid API key is required (Authorization: Bearer <key>)",
                401,
                WWW_Authenticate="Bearer",
            )
        return None

    def base_url() -> str:
        return settings.public_url or request.host_url.rstrip("/")

    def job_response(view: JobView) -> JobResponse:
        r = view.request
        image_url = None
        result = None
        if view.result is not None:
            result = str(output_dir / view.result)
            image_url = f"{base_url()}/job/{view.id}/image"
        return JobResponse(
            job_id=view.id,
            status=view.status.value,
            queue_position=view.queue_position,
            progress=Progress(step=view.progress_value, of=view.progress_max),
            result=result,
            image_url=image_url,
            error=view.error,
            nick=view.nick,
            prompt=r.prompt,
            negative=r.negative,
            model=r.model,
            width=r.width,
            height=r.height,
            count=r.count,
            seed=r.seed,
            created=_iso(view.created) or "",
            started=_iso(view.started),
            finished=_iso(view.finished),
            cancelled_by=view.cancelled_by,
        )

    def find(job_id: str) -> JobView:
        try:
            canonical = str(uuid.UUID(job_id))
        except ValueError:
            raise Refused(f"there is no job {job_id[:64]!r}", 404) from None
        view = desk.view(canonical)
        if view is None:
            raise Refused(f"there is no job {canonical}", 404)
        return view

    @app.post("/request")
    @validate_request(SubmitRequest)
    @document_headers(IdempotencyHeaders)
    @validate_response(SubmitResponse, 200)
    @validate_response(ErrorResponse, 400)
    @validate_response(ErrorResponse, 429)
    async def submit(data: SubmitRequest) -> tuple[SubmitResponse, int]:
        """Queue a chat line as an image job. Retries with the same Idempotency-Key get the
        same job back."""
        view = await desk.submit(
            data.nick, data.message, idempotency_key=request.headers.get("Idempotency-Key")
        )
        return (
            SubmitResponse(
                job_id=view.id,
                status=view.status.value,
                queue_position=view.queue_position,
                job_url=f"{base_url()}/job/{view.id}",
                wait_url=f"{base_url()}/wait/{view.id}",
            ),
            200,
        )

    @app.get("/job/<job_id>")
    @validate_response(JobResponse, 200)
    @validate_response(ErrorResponse, 404)
    async def get_job(job_id: str) -> tuple[JobResponse, int]:
        """A job's state, queue position, progress and, once completed, its image."""
        return job_response(find(job_id)), 200

    @app.delete("/job/<job_id>")
    @validate_querystring(CancelQuery)
    @validate_response(JobResponse, 200)
    @validate_response(ErrorResponse, 400)
    @validate_response(ErrorResponse, 403)
    @validate_response(ErrorResponse, 404)
    @validate_response(ErrorResponse, 409)
    async def cancel_job(job_id: str, query_args: CancelQuery) -> tuple[JobResponse, int]:
        """Cancel a job: the nick that submitted it, or an admin key, may."""
        view = find(job_id)
        admin = matches(key_of_request(), settings.admin_keys)
        return job_response(await desk.cancel(view.id, nick=query_args.nick, admin=admin)), 200

    @app.get("/job/<job_id>/image")
    @validate_response(ErrorResponse, 404)
    async def get_image(job_id: str) -> Response:
        """The finished WebP (image/webp)."""
        view = find(job_id)
        if view.result is None:
            raise Refused(f"job {view.id} has no image (it is {view.status.value})", 404)
        path = output_dir / Path(view.result).name
        if not await trio.Path(path).is_file():
            raise Refused(f"the image of job {view.id} is gone (pruned or deleted)", 404)
        response = await send_file(path, mimetype="image/webp")
        response.headers["Cache-Control"] = "public, max-age=86400, immutable"
        return response

    @app.get("/wait/<job_id>")
    @validate_querystring(WaitQuery)
    @validate_response(JobResponse, 200)
    @validate_response(JobResponse, 202)
    @validate_response(ErrorResponse, 400)
    @validate_response(ErrorResponse, 404)
    async def wait_job(job_id: str, query_args: WaitQuery) -> Response | tuple[JobResponse, int]:
        """Long-poll: answers 200 once the job has finished, or 202 with its current state when
        the timeout runs out (poll again)."""
        view = find(job_id)
        timeout = query_args.timeout
        if timeout is None:
            timeout = settings.wait_timeout_default
        if not timeout >= 0:
            raise Refused("timeout must be zero or more seconds")
        timeout = min(timeout, settings.wait_timeout_max)
        with trio.move_on_after(timeout):
            await desk.wait_finished(view.id)
        final = desk.view(view.id)
        assert final is not None
        if final.status.finished:
            return job_response(final), 200
        return job_response(final), 202

    @app.get("/models")
    @validate_response(ModelsResponse, 200)
    async def models() -> tuple[ModelsResponse, int]:
        """Every configured model and the defaults."""
        cfg = desk.config
        d = cfg.defaults
        return (
            ModelsResponse(
                models=[
                    ModelInfo(
                        id=model_id,
                        workflow=spec.workflow,
                        checkpoint=spec.checkpoint_name,
                        width=spec.image_width,
                        height=spec.image_height,
                        steps=spec.steps,
                        description=spec.description,
                    )
                    for model_id, spec in cfg.models.items()
                ],
                defaults=DefaultsInfo(
                    model=d.model,
                    width=d.width,
                    height=d.height,
                    count=d.count,
                    max_count=d.max_count,
                    min_size=d.min_size,
                    max_size=d.max_size,
                    max_pixels=d.max_pixels,
                ),
            ),
            200,
        )

    @app.get("/health")
    @validate_response(HealthResponse, 200)
    async def health() -> tuple[HealthResponse, int]:
        """The service is up; whether ComfyUI is reachable; how much work is waiting."""
        store = desk.store
        return (
            HealthResponse(
                status="stopping" if desk.stopping else "ok",
                comfyui=ComfyHealth(
                    url=comfyui_url,
                    reachable=desk.health.available,
                    error=desk.health.last_error,
                ),
                queued=store.count_queued(),
                processing=len(store.processing()),
            ),
            200,
        )

    @app.errorhandler(Refused)
    async def refused(exc: Refused) -> Response:
        extra = {} if exc.retry_after is None else {"Retry_After": str(exc.retry_after)}
        return _error(str(exc), exc.status, **extra)

    @app.errorhandler(PromptError)
    @app.errorhandler(WorkflowError)
    async def bad_prompt(exc: Exception) -> Response:
        return _error(str(exc), 400)

    @app.errorhandler(RequestSchemaValidationError)
    async def bad_body(exc: RequestSchemaValidationError) -> Response:
        detail = str(exc.validation_error)
        if isinstance(exc.validation_error, TypeError | ValueError) and not detail:
            detail = "expected a JSON object"
        return _error(f"the request is malformed: {detail}", 400)

    @app.errorhandler(UnicodeDecodeError)
    async def not_utf8(exc: UnicodeDecodeError) -> Response:
        return _error("the request body is not valid UTF-8", 400)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        messages = {
            404: "there is no such endpoint (see /docs)",
            405: "this endpoint does not take that method (see /docs)",
            413: f"the request body is too large (at most {MAX_BODY} bytes)",
        }
        if exc.code == 400 and request.method in ("POST", "PUT", "PATCH"):
            # Quart's sentence is meant for browsers; a bot author needs to know what to send.
            messages[400] = (
                'the request body is not valid JSON; send {"message": "...", "nick": "..."}'
            )
        status = exc.code or 500
        extra = {}
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            extra["Allow"] = ", ".join(exc.valid_methods)  # RFC 9110 wants it on a 405
        return _error(messages.get(status, exc.description or exc.name), status, **extra)

    @app.errorhandler(Exception)
    async def crashed(exc: Exception) -> Response:
        # %r: a path with an encoded line break must not forge a log line.
        log.exception("unexpected error answering %s %r", request.method, request.path)
        return _error("the service failed to answer this request; it has been logged", 500)

    return app


async def serve_http(
    app: QuartTrio,
    host: str,
    port: int,
    shutdown_trigger: Callable[[], Awaitable[None]],
    *,
    graceful_timeout: float = 5.0,
    read_timeout: float = 30.0,
    keep_alive_timeout: float = 75.0,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with hypercorn's trio worker until ``shutdown_trigger`` returns.

    Reports the bound URLs (so port 0 works) through ``task_status``.

    Args:
        read_timeout: a connection that sends nothing for this long (say, a client sending
            its headers very slowly) is closed. hypercorn applies it to each read, not to the
            whole request head, so it bounds idle silence, not total header time.
        keep_alive_timeout: an idle keep-alive connection is closed after this long.
    """
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.graceful_timeout = graceful_timeout
    config.keep_alive_timeout = keep_alive_timeout
    config.read_timeout = read_timeout  # type: ignore[assignment]  # typed int, any float works
    config.h11_max_incomplete_size = 16 * 1024
    await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)
