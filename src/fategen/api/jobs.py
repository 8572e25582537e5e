"""Routes of jobs: submit (``POST /request``), look up, long-poll, fetch the images, cancel."""

from __future__ import annotations

import uuid
from pathlib import Path

import attrs
import trio
from quart import Blueprint, Response, current_app, request, send_file
from quart_schema import (
    RequestSchemaValidationError,
    document_headers,
    document_request,
    document_response,
    validate_querystring,
    validate_request,
    validate_response,
)
from quart_schema.conversion import model_load

from fategen.api.answers import answers, job_answer
from fategen.api.auth import caller
from fategen.api.common import base_url, find_job, job_response, state
from fategen.api.frontdesk import Refused
from fategen.api.schemas import (
    CancelQuery,
    ErrorResponse,
    JobResponse,
    SubmitRequest,
    SubmitResponse,
    UpscaleRequest,
    WaitQuery,
)
from fategen.store.jobs import JobView
from fategen.store.retention import image_path, input_path

blueprint = Blueprint("jobs", __name__)

#: Seconds a client may keep a job's image without asking again.
IMAGE_MAX_AGE = 86400


@attrs.frozen
class IdempotencyHeaders:
    idempotency_key: str | None = None


#: Fields of a multipart submission read as booleans.
_FLAGS = ("webhook_started", "previews")


def _flag(name: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise Refused(f"the field {name} must be true or false, got {raw[:20]!r}")


async def _submission() -> tuple[SubmitRequest, bytes | None]:
    """The submission: a JSON body, or multipart/form-data with the same fields and the
    image as the file field ``image`` (read in a thread: Quart spools large files to disk)."""
    convert = current_app.config["QUART_SCHEMA_CONVERT_CASING"]
    preference = current_app.config["QUART_SCHEMA_CONVERSION_PREFERENCE"]
    if request.mimetype != "multipart/form-data":
        body = await request.get_json()
        if body is None:
            raise Refused(
                'send JSON ({"message": "...", "nick": "..."}) or multipart/form-data with '
                "the same fields and the image as the file field image"
            )
        return model_load(
            body,
            SubmitRequest,
            RequestSchemaValidationError,
            decamelize=convert,
            preference=preference,
        ), None
    form = await request.form
    files = await request.files
    fields: dict[str, object] = {key: form[key] for key in form}
    for name in _FLAGS:
        if isinstance(fields.get(name), str):
            fields[name] = _flag(name, str(fields[name]))
    data = model_load(
        fields,
        SubmitRequest,
        RequestSchemaValidationError,
        decamelize=convert,
        preference=preference,
    )
    file = files.get("image")
    if file is None:
        if files:
            raise Refused("send the image as the file field named image")
        return data, None
    upload = await trio.to_thread.run_sync(file.read)
    if not upload:
        raise Refused("the attached image is empty", 422)
    return data, upload


@blueprint.post("/request")
@document_request(SubmitRequest)
@document_headers(IdempotencyHeaders)
@validate_response(SubmitResponse, 200)
@validate_response(ErrorResponse, 400)
@validate_response(ErrorResponse, 409)
@validate_response(ErrorResponse, 410)
@validate_response(ErrorResponse, 422)
@validate_response(ErrorResponse, 429)
@validate_response(ErrorResponse, 503)
async def submit() -> tuple[SubmitResponse, int, dict[str, str]]:
    """Queue a chat line as an image job.

    A JSON body, or multipart/form-data with the same fields and an image to start from as
    the file field ``image``. Retries with the same Idempotency-Key get the same job back,
    marked Idempotent-Replayed: true."""
    data, upload = await _submission()
    return await _queue(
        data.nick,
        data.message,
        webhook_url=data.webhook_url,
        webhook_started=data.webhook_started,
        previews=data.previews,
        image_url=data.image_url,
        upload=upload,
    )


async def _queue(
    nick: str, message: str, **options: object
) -> tuple[SubmitResponse, int, dict[str, str]]:
    who = caller()
    view, replayed = await state().desk.submit(
        nick,
        message,
        idempotency_key=request.headers.get("Idempotency-Key"),
        key_name=None if who is None else who.key,
        **options,  # type: ignore[arg-type]
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
        {"Idempotent-Replayed": "true"} if replayed else {},
    )


async def _follow_up(
    job_id: str, kind: str, data: UpscaleRequest
) -> tuple[SubmitResponse, int, dict[str, str]]:
    """A follow-up as the chat line ``--upscale ID:N``. The job is not looked up here: a
    retry with its Idempotency-Key is answered even once the earlier job was pruned."""
    try:
        canonical = str(uuid.UUID(job_id))
    except ValueError:
        raise Refused(f"there is no job {job_id[:64]}", 404) from None
    return await _queue(data.nick, f"{data.message} --{kind} {canonical}:{data.n}".strip())


@blueprint.post("/job/<job_id>/upscale")
@validate_request(UpscaleRequest)
@document_headers(IdempotencyHeaders)
@validate_response(SubmitResponse, 200)
@validate_response(ErrorResponse, 400)
@validate_response(ErrorResponse, 404)
@validate_response(ErrorResponse, 409)
@validate_response(ErrorResponse, 410)
@validate_response(ErrorResponse, 429)
async def upscale_job(
    job_id: str, data: UpscaleRequest
) -> tuple[SubmitResponse, int, dict[str, str]]:
    """A new job upscaling image ``n`` of a completed job (like ``--upscale JOB:N``):
    queued, capped and idempotent like any other."""
    return await _follow_up(job_id, "upscale", data)


@blueprint.post("/job/<job_id>/vary")
@validate_request(UpscaleRequest)
@document_headers(IdempotencyHeaders)
@validate_response(SubmitResponse, 200)
@validate_response(ErrorResponse, 400)
@validate_response(ErrorResponse, 404)
@validate_response(ErrorResponse, 409)
@validate_response(ErrorResponse, 410)
@validate_response(ErrorResponse, 429)
async def vary_job(job_id: str, data: UpscaleRequest) -> tuple[SubmitResponse, int, dict[str, str]]:
    """A new job like image ``n`` of a completed job (like ``--vary JOB:N``): img2img from it
    at a low strength, with a new seed."""
    return await _follow_up(job_id, "vary", data)


@blueprint.get("/job/<job_id>/input")
@validate_response(ErrorResponse, 404)
async def get_input(job_id: str) -> Response:
    """The image a job starts from, as fategen keeps it (image/png)."""
    view = await find_job(job_id)
    if view.request.image is None:
        raise Refused(f"job {view.id} starts from no image (it draws from text)", 404)
    path = input_path(state().output_dir, view.id)
    if not await trio.Path(path).is_file():
        raise Refused(f"the input image of job {view.id} is gone (pruned or deleted)", 404)
    response = await send_file(
        path, mimetype="image/png", conditional=True, cache_timeout=IMAGE_MAX_AGE
    )
    response.cache_control.immutable = True
    return response


@blueprint.get("/job/<job_id>")
@validate_response(JobResponse, 200)
@validate_response(ErrorResponse, 404)
async def get_job(job_id: str) -> tuple[JobResponse, int]:
    """A job's state, queue position, progress and, once completed, its image."""
    return job_response(await find_job(job_id)), 200


@blueprint.delete("/job/<job_id>")
@validate_querystring(CancelQuery)
@validate_response(JobResponse, 200)
@validate_response(ErrorResponse, 400)
@validate_response(ErrorResponse, 403)
@validate_response(ErrorResponse, 404)
@validate_response(ErrorResponse, 409)
async def cancel_job(job_id: str, query_args: CancelQuery) -> tuple[JobResponse, int]:
    """Cancel a job: the nick that submitted it, or an admin key, may."""
    view = await find_job(job_id)
    who = caller()
    cancelled = await state().desk.cancel(
        view.id,
        nick=query_args.nick,
        admin=who is not None and who.admin,
        key_name=None if who is None else who.key,
    )
    return job_response(cancelled), 200


@blueprint.get("/job/<job_id>/image")
@validate_response(ErrorResponse, 404)
async def get_image(job_id: str) -> Response:
    """The finished WebP (image/webp): the grid of all the job's images."""
    view = await find_job(job_id)
    if view.result is None:
        raise Refused(f"job {view.id} has no image (it is {view.status.value})", 404)
    return await _send_image(view, state().output_dir / Path(view.result).name)


@blueprint.get("/job/<job_id>/image/<n>")
@validate_response(ErrorResponse, 404)
async def get_each_image(job_id: str, n: str) -> Response:
    """Image ``n`` (1 for the first) of a finished job, alone (image/webp)."""
    view = await find_job(job_id)
    if view.result is None:
        raise Refused(f"job {view.id} has no images yet (it is {view.status.value})", 404)
    count = view.request.count
    if not (n.isascii() and n.isdigit() and 1 <= int(n) <= count):
        which = "1" if count == 1 else f"1 to {count}"
        plural = "image" if count == 1 else "images"
        raise Refused(f"job {view.id} has {count} {plural}; ask for {which}", 404)
    if count == 1:  # the grid of one image is that image
        path = state().output_dir / Path(view.result).name
    else:
        path = image_path(state().output_dir, view.id, int(n))
    return await _send_image(view, path)


async def _send_image(view: JobView, path: Path) -> Response:
    if not await trio.Path(path).is_file():
        raise Refused(f"the image of job {view.id} is gone (pruned or deleted)", 404)
    # A job's image never changes: conditional requests (If-None-Match, If-Modified-Since)
    # answer 304, ranges 206, with one ETag, Last-Modified and Cache-Control throughout.
    response = await send_file(
        path, mimetype="image/webp", conditional=True, cache_timeout=IMAGE_MAX_AGE
    )
    response.cache_control.immutable = True
    return response


@blueprint.get("/job/<job_id>/preview")
@validate_response(ErrorResponse, 404)
async def get_preview(job_id: str) -> Response:
    """The latest sampler preview of a running job submitted with ``previews`` (a small
    JPEG; 404 while there is none)."""
    view = await find_job(job_id)
    found = state().desk.store.preview(view.id)
    if found is None:
        raise Refused(f"job {view.id} has no preview now (it is {view.status.value})", 404)
    image, mime = found
    response = Response(image, status=200, content_type=mime)
    response.cache_control.no_store = True
    return response


@blueprint.get("/wait/<job_id>")
@validate_querystring(WaitQuery)
@document_response(JobResponse, 200)
@document_response(JobResponse, 202)
@validate_response(ErrorResponse, 400)
@validate_response(ErrorResponse, 404)
async def wait_job(job_id: str, query_args: WaitQuery) -> Response:
    """Wait for a job to finish (long-poll).

    Answers 200 once the job has finished, or 202 with its current state when the timeout
    runs out (poll again)."""
    view = await find_job(job_id)
    settings, desk = state().settings, state().desk
    timeout = query_args.timeout
    if timeout is None:
        timeout = settings.wait_timeout_default
    if not timeout >= 0:
        raise Refused("timeout must be zero or more seconds")
    timeout = min(timeout, settings.wait_timeout_max)
    with trio.move_on_after(timeout):
        await desk.wait_finished(view.id)
    # Thousands of waiters may get here at once (their job ended, or their timeouts did):
    # they answer a batch at a time, and share one body per state of the job.
    async with answers().turn:
        final = await desk.view(view.id)
        if final is None:  # removed by retention while it was waited on
            raise Refused(f"job {view.id} is no longer kept (it finished too long ago)", 404)
        return await job_answer(final, 200 if final.status.finished else 202)
