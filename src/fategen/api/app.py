"""The HTTP front end: a quart-trio app over the `Frontdesk`, its routes in blueprints by
resource (`jobs`, `models`, `health`), served by hypercorn's trio worker (`server`)."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask.json.provider import JSONProvider
from hypercorn.middleware import ProxyFixMiddleware
from quart import Response, g, request
from quart_schema import QuartSchema, RequestSchemaValidationError
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioRequest
from quart_trio.wrappers.request import TrioBody
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from fategen import __version__
from fategen.api import answers, auth, backends, control, docs, events, health, jobs, models, ui
from fategen.api.common import EXTENSION, ApiState, error, state
from fategen.api.frontdesk import Frontdesk, Refused
from fategen.api.metrics import install as install_metrics
from fategen.api.schemas import CompleteOpenAPIProvider
from fategen.api.server import ClosingHTTPConnection
from fategen.core.prompt import MAX_SEED
from fategen.errors import InputImageError, PromptError, WorkflowError
from fategen.settings import Settings, split_key

__all__ = ["MAX_BODY", "create_app"]

log = logging.getLogger("fategen.http")
#: One line per request (method, path, status, duration, key; the sentence of a refusal).
access_log = logging.getLogger("fategen.access")

MAX_BODY = 64 * 1024


class BoundedJSONProvider(JSONProvider):
    """The app's JSON provider (quart-schema's), with nesting too deep for the parser refused
    as a bad request: a body of ``[[[[...`` 1,000 deep is 2 KB and would otherwise raise
    RecursionError, a 500."""

    def __init__(self, app: QuartTrio, inner: JSONProvider) -> None:
        super().__init__(app)
        self.inner = inner

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return self.inner.dumps(obj, **kwargs)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return self.inner.loads(s, **kwargs)
        except RecursionError:
            raise Refused("the request body is nested too deeply to be read as JSON") from None

    def response(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.response(*args, **kwargs)


class CountingBody(TrioBody):
    """A request body that counts every byte it was given, not only those it holds: Quart's
    own check sees only what is buffered, and the form parser drains the buffer as it goes,
    so a chunked upload (no Content-Length) would never be stopped."""

    def __init__(self, expected_content_length: int | None, max_content_length: int | None) -> None:
        super().__init__(expected_content_length, max_content_length)
        self._total = 0

    def append(self, data: bytes) -> None:
        self._total += len(data)
        limit = self._max_content_length
        if limit is not None and self._total > limit and self._must_raise is None:
            self._must_raise = RequestEntityTooLarge()
            self.set_complete()
            return
        super().append(data)

    async def __anext__(self) -> bytes:
        # Past the limit the body is complete and empty: a reader must not take the cut-off
        # data for the whole body.
        try:
            return await super().__anext__()
        except StopAsyncIteration:
            if self._must_raise is not None:
                raise self._must_raise from None
            raise


class LenientRequest(TrioRequest):
    """A request whose body is read as JSON also without ``Content-Type: application/json``
    (curl's ``-d`` sends ``application/x-www-form-urlencoded``): if it parses, it is taken;
    if not, the error says what to send."""

    @property
    def is_json(self) -> bool:
        if self.mimetype in ("", "application/x-www-form-urlencoded", "text/plain"):
            return True
        return bool(super().is_json)

    #: The largest multipart submission (``POST /request`` with an image): set per app.
    upload_limit: int = MAX_BODY
    body_class = CountingBody

    def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(method, scheme, path, *args, **kwargs)
        if self.is_upload:
            # Only here: every other body stays within MAX_BODY.
            self.max_content_length = self.upload_limit
            self.body = self.body_class(self.content_length, self.upload_limit)

    @property
    def is_upload(self) -> bool:
        """A submission with an image attached (multipart/form-data to ``POST /request``)."""
        return (
            self.method == "POST"
            and self.path == "/request"
            and self.mimetype == "multipart/form-data"
        )


def _provider(keys_required: bool) -> type[CompleteOpenAPIProvider]:
    """The OpenAPI provider, completed with what quart-schema cannot say from the routes: the
    WebP body of ``/job/{id}/image``, the event streams and, when API keys are configured,
    the bearer scheme."""

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
            stream = {
                "description": "Server-Sent Events (text/event-stream): each event has an id, "
                "a type (snapshot, queued, started, progress, completed, failed, cancelled) "
                "and the job as GET /job/{job_id} shows it as data",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            }
            for path in ("/job/{job_id}/events", "/events"):
                operation = paths.get(path, {}).get("get")
                if operation is not None:
                    operation.setdefault("responses", {})[200] = stream
                    operation["responses"][429] = {
                        "description": "Too many event streams are open",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ErrorResponse"}
                            }
                        },
                    }
            job = document.get("components", {}).get("schemas", {}).get("JobResponse")
            if job is not None:
                job["properties"]["seed"]["maximum"] = MAX_SEED
            if keys_required:
                schemes = document.setdefault("components", {}).setdefault("securitySchemes", {})
                schemes["bearer"] = {"type": "http", "scheme": "bearer"}
                document["security"] = [{"bearer": []}]
                for path, item in paths.items():
                    for operation in item.values():
                        if path in auth.OPEN_PATHS:
                            operation["security"] = []
                        else:
                            operation.setdefault("responses", {})[401] = {
                                "description": "No valid API key (Authorization: Bearer <key>)",
                                "content": {
                                    "application/json": {
                                        "schema": {"$ref": "#/components/schemas/ErrorResponse"}
                                    }
                                },
                            }
            return document

    return Provider


def create_app(desk: Frontdesk, settings: Settings, comfyui_url: str) -> QuartTrio:
    """The quart-trio app; ``desk`` is all it knows of the service."""
    app = QuartTrio("fategen")
    app.asgi_http_class = ClosingHTTPConnection

    # Its own subclass: the upload limit is this app's setting.
    class Request(LenientRequest):
        upload_limit = settings.image_max_mib * 2**20 + MAX_BODY

    app.request_class = Request
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["JSON_SORT_KEYS"] = False
    app.config.update(docs.CONFIG)  # the documentation's assets from fategen, not a CDN
    keys = tuple(
        (token, name, admin)
        for admin, entries in ((True, settings.admin_keys), (False, settings.api_keys))
        for name, token in map(split_key, sorted(entries))
    )
    QuartSchema(
        app,
        swagger_ui_path="/docs",
        redoc_ui_path="/redoc",
        openapi_provider_class=_provider(bool(keys)),
        info={
            "title": "fategen",
            "version": __version__,
            "description": "Image-generation jobs for chat bots, run on ComfyUI.",
        },
    )
    app.json = BoundedJSONProvider(app, app.json)
    app.extensions[EXTENSION] = ApiState(
        desk=desk,
        settings=settings,
        comfyui_url=comfyui_url,
        output_dir=settings.output_dir.resolve(),
        keys=keys,
    )
    answers.install(app)
    if settings.trusted_proxy_hops:
        # Behind a TLS proxy: the client's address, scheme and host from X-Forwarded-*, so
        # the URLs in answers (image_url, job_url, wait_url) are the ones bots can reach.
        app.asgi_app = ProxyFixMiddleware(  # type: ignore[method-assign]
            app.asgi_app, mode="legacy", trusted_hops=settings.trusted_proxy_hops
        )
    app.before_request(_start_clock)
    app.before_request(auth.authenticate)
    app.after_request(_access_log)
    for module in (jobs, events, control, models, health, backends, docs, ui):
        app.register_blueprint(module.blueprint)
    install_metrics(app)  # GET /metrics, and every answer counted for it
    _register_error_handlers(app)
    return app


async def _start_clock() -> None:
    g.started = time.perf_counter()


async def _access_log(response: Response) -> Response:
    """One line per request: method, path, status, duration and key; a refusal (4xx) also
    with its sentence. Through the process's logging, so LOG_FORMAT=json applies too."""
    took = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
    refusal = g.get("refusal")
    fields = {
        "method": request.method,
        "path": request.path,
        "status": response.status_code,
        "ms": round(took, 1),
        "key": auth.key_label(),
    }
    if refusal is not None and 400 <= response.status_code < 500:
        access_log.info(
            "%s %r %d %.1f ms key=%s: %s",
            request.method,
            request.path,
            response.status_code,
            took,
            fields["key"],
            refusal,
            extra={"http": fields, "reason": refusal},
        )
    else:
        access_log.info(
            "%s %r %d %.1f ms key=%s",
            request.method,
            request.path,
            response.status_code,
            took,
            fields["key"],
            extra={"http": fields},
        )
    return response


def _register_error_handlers(app: QuartTrio) -> None:
    """Every error is ``{"error": "one sentence"}`` with its status."""

    @app.errorhandler(Refused)
    async def refused(exc: Refused) -> Response:
        extra = {} if exc.retry_after is None else {"Retry_After": str(exc.retry_after)}
        return error(str(exc), exc.status, **extra)

    @app.errorhandler(PromptError)
    @app.errorhandler(WorkflowError)
    async def bad_prompt(exc: Exception) -> Response:
        return error(str(exc), 400)

    @app.errorhandler(InputImageError)
    async def bad_image(exc: InputImageError) -> Response:
        return error(str(exc), 422)

    @app.errorhandler(RequestSchemaValidationError)
    async def bad_body(exc: RequestSchemaValidationError) -> Response:
        detail = str(exc.validation_error)
        if isinstance(exc.validation_error, TypeError | ValueError) and not detail:
            detail = "expected a JSON object"
        return error(f"the request is malformed: {detail}", 400)

    @app.errorhandler(UnicodeDecodeError)
    async def not_utf8(exc: UnicodeDecodeError) -> Response:
        return error("the request body is not valid UTF-8", 400)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        messages = {
            404: "there is no such endpoint (see /docs)",
            405: "this endpoint does not take that method (see /docs)",
            413: f"the request body is too large (at most {MAX_BODY} bytes)",
        }
        if getattr(request, "is_upload", False):
            messages[413] = (
                f"the attached image is too large (at most {state().settings.image_max_mib} MiB)"
            )
        if exc.code == 400 and request.method in ("POST", "PUT", "PATCH"):
            # Quart's sentence is meant for browsers; a bot author needs to know what to send.
            messages[400] = (
                'the request body is not valid JSON; send {"message": "...", "nick": "..."}'
            )
        status = exc.code or 500
        extra = {}
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            extra["Allow"] = ", ".join(exc.valid_methods)  # RFC 9110 wants it on a 405
        return error(messages.get(status, exc.description or exc.name), status, **extra)

    @app.errorhandler(Exception)
    async def crashed(exc: Exception) -> Response:
        # %r: a path with an encoded line break must not forge a log line.
        log.exception("unexpected error answering %s %r", request.method, request.path)
        return error("the service failed to answer this request; it has been logged", 500)
