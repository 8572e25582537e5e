"""The narrow interface the HTTP layer uses: submit, look up, wait for and cancel jobs.

It validates what a bot sends, turns it into jobs through the store and the scheduler, and
never hands out anything mutable: readers get `JobView` snapshots.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import logging
import random
import time
import unicodedata
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import attrs
import trio

from fategen.core import inputimage
from fategen.core.availability import ModelAvailability
from fategen.core.loras import lora_refusal
from fategen.core.modelconfig import ModelConfig
from fategen.core.prompt import GenerationRequest, follow_up_of, parse_request
from fategen.core.workflow import WorkflowTemplate, build_workflow, template_for
from fategen.errors import FategenError, ImageError, InputImageError
from fategen.queue.fleet import BackendView
from fategen.queue.postprocess import write_atomic
from fategen.queue.scheduler import Scheduler
from fategen.queue.webhooks import webhook_refusal
from fategen.store.jobs import Job, JobStatus, JobStore, JobView, result_path
from fategen.store.locks import KeyedLocks
from fategen.store.model import user_of
from fategen.store.retention import image_path, input_path

log = logging.getLogger("fategen.jobs")

MAX_NICK = 64
MAX_MESSAGE = 4000
MAX_IDEMPOTENCY_KEY = 200
#: Input images fetched at once; more submissions with a URL are refused (503) meanwhile.
MAX_FETCHES = 8
#: Of those, one user's at once: one user's slow image host cannot take every slot.
MAX_FETCHES_PER_USER = 2
#: Seconds a clean-up (deleting an input image of a job not added) may take when cancelled.
_CLEANUP_SECONDS = 5


def _digest(data: bytes) -> str:
    """The SHA-256 of an uploaded image (blocking: up to the upload limit)."""
    return hashlib.sha256(data).hexdigest()


def _same_image(earlier: Job, message: str, attached: str | None, digest: str | None) -> bool:
    """Whether a submission replaying ``earlier`` (same Idempotency-Key, same message) also
    sends the same image: the same upload (by digest) or ``image_url``, or none beside the
    message."""
    image = earlier.request.image
    if attached == "upload":
        # A job stored before uploads had digests has none: its replay is taken on trust.
        return image is not None and image.source == "upload" and image.digest in ("", digest)
    if attached is not None:
        return image is not None and image.source == attached
    if image is None or image.earlier is not None:
        return True
    return image.source != "upload" and image.source in message  # its --image


class Refused(FategenError):
    """A request the service will not take; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class Canceller(Protocol):
    async def cancel(self, job: Job, by: str) -> bool: ...


#: The meta key of the operator's pause (kept across restarts).
PAUSED_META = "queue_paused"


class FleetControl(Protocol):
    """What the API reads and changes of the backends (`fategen.queue.fleet.Fleet`)."""

    def views(self) -> list[BackendView]: ...
    def available_loras(self) -> frozenset[str] | None: ...
    def kind_refusal(self, model: str, kind: str) -> str | None: ...
    def drain(self, name: str) -> BackendView: ...
    def enable(self, name: str) -> BackendView: ...


class Health(Protocol):
    @property
    def available(self) -> bool: ...
    @property
    def last_error(self) -> str | None: ...


def clean_nick(raw: str) -> str:
    nick = raw.strip()
    if not nick:
        raise Refused("nick must not be empty")
    if len(nick) > MAX_NICK:
        raise Refused(f"nick is too long ({len(nick)} characters, at most {MAX_NICK})")
    if any(unicodedata.category(c)[0] in ("C", "Z") and c != " " for c in nick):
        raise Refused("nick must not contain control characters, line breaks or tabs")
    return nick


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@attrs.define(eq=False)
class Frontdesk:
    store: JobStore
    scheduler: Scheduler
    config: ModelConfig
    templates: Mapping[str, WorkflowTemplate]
    canceller: Canceller
    health: Health
    #: The backends (None: a front desk tested without any).
    fleet: FleetControl | None = None
    max_queue: int = 500
    max_queue_per_user: int = 10
    #: Seconds an Idempotency-Key holds (24 hours, as Comfy's API v2).
    idempotency_ttl: float = 24 * 3600
    #: Which models ComfyUI can run (unknown until it was reached).
    availability: ModelAvailability = attrs.field(factory=ModelAvailability)
    rng: random.Random = attrs.field(factory=random.SystemRandom)
    stopping: bool = False
    #: Event streams open now (`fategen.api.events`).
    open_streams: int = 0
    #: Webhooks: each API key's default URL (None: keys off), whether a key has a secret
    #: to sign with, and whether private addresses may be called.
    webhook_defaults: Mapping[str | None, str] = attrs.field(factory=dict)
    webhook_signer: Callable[[str | None], bool] = lambda key: False
    webhook_allow_private: bool = False
    #: Input images: fetches a URL (`fategen.queue.fetch.fetch_image` with the service's
    #: limits; None refuses URLs), where they are kept (None refuses input images), and the
    #: most pixels one may have.
    image_fetcher: Callable[[str], Awaitable[bytes]] | None = None
    output_dir: Path | None = None
    image_max_pixels: int = 40_000_000
    #: Image fetches under way (`MAX_FETCHES` at most).
    _fetches: trio.Semaphore = attrs.field(factory=lambda: trio.Semaphore(MAX_FETCHES), init=False)
    #: User -> their fetches under way (`MAX_FETCHES_PER_USER` at most).
    _fetching: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    #: Decoding and re-encoding input images (Pillow, in threads): two at a time.
    _image_limiter: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(2), init=False
    )
    #: Submissions with one Idempotency-Key follow each other (the second finds the first);
    #: others do not wait for each other, so their jobs share one commit.
    _key_locks: KeyedLocks[tuple[str, str]] = attrs.field(factory=KeyedLocks, init=False)
    #: Jobs accepted but not yet on disk (not yet counted by the store), in all and by user:
    #: the caps count them too.
    _adding: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    _adding_total: int = attrs.field(default=0, init=False)
    #: (finished, status, seconds waited) of the jobs that ended in the last hour.
    _finished: collections.deque[tuple[float, JobStatus, float | None]] = attrs.field(
        factory=collections.deque, init=False
    )

    def __attrs_post_init__(self) -> None:
        self.store.on_transition.append(self.observe)

    def parse(
        self,
        message: str,
        *,
        base: GenerationRequest | None = None,
        image_size: tuple[int, int] | None = None,
        attached: str | None = None,
    ) -> GenerationRequest:
        """The message as a request this service can run (pure apart from reading what the
        backends have); see `parse_request` for `base`, `image_size` and `attached`."""
        if len(message) > MAX_MESSAGE:
            raise Refused(
                f"the message is too long ({len(message)} characters, at most {MAX_MESSAGE})"
            )
        if not _is_utf8(message):
            # JSON may escape a lone UTF-16 surrogate (\\ud800); it cannot be stored or sent on.
            raise Refused("the message contains an invalid character (a lone surrogate)")
        request = parse_request(
            message,
            self.config,
            rng=self.rng,
            base=base,
            image_size=image_size,
            attached=attached,
        )
        reason = self.availability.reason(request.model)
        if reason is not None:
            others = self.availability.available(list(self.config.models))
            raise Refused(
                f'model "{request.model}" cannot run now: {reason}; '
                + (f"available: {', '.join(others)}" if others else "no model can run now")
            )
        if request.loras:
            loras = self.fleet.available_loras() if self.fleet is not None else None
            refusal = lora_refusal(request, loras, self.config)
            if refusal is not None:
                raise Refused(refusal)
        spec = self.config.models[request.model]
        # Fail now, not in the queue, if the model's template cannot take this request.
        template = template_for(self.config, self.templates, request)
        build_workflow(template, spec, request, filename_prefix="fategen")
        if request.image is not None:
            if self.output_dir is None:
                raise Refused("this service takes no input images")
            refusal = (
                None if self.fleet is None else self.fleet.kind_refusal(request.model, request.kind)
            )
            if refusal is not None:
                what = "upscale" if request.upscale else "start from an image"
                raise Refused(f'model "{request.model}" cannot {what} now: {refusal}')
        return request

    def kinds(self, model_id: str) -> list[str]:
        """The kinds of job the model takes here (``txt2img``, ``img2img``, ``upscale``): it
        has the workflow, and, once the backends were checked, one of them can run it."""
        kinds = ["txt2img"]
        for kind in ("img2img", "upscale"):
            if self.output_dir is None:
                break
            if self.config.workflow_for(model_id, kind) not in self.templates:
                continue
            if self.fleet is not None and self.fleet.kind_refusal(model_id, kind) is not None:
                continue
            kinds.append(kind)
        return kinds

    async def _understand(
        self, message: str, attached: str | None
    ) -> tuple[GenerationRequest, Job | None]:
        """`parse`, with the earlier job a follow-up (``--upscale``/``--vary``) names, which
        must have completed. O(1) (one look-up by id)."""
        if len(message) <= MAX_MESSAGE and _is_utf8(message):
            follow = follow_up_of(message)
        else:
            follow = None  # `parse` refuses it
        if follow is None:
            return self.parse(message, attached=attached), None
        earlier = await self.store.get(follow.job_id)
        if earlier is None:
            raise Refused(f"there is no job {follow.job_id} to follow up on")
        if earlier.status is not JobStatus.COMPLETED:
            raise Refused(
                f"job {earlier.id} is {earlier.status.value}; --{follow.kind} works on a "
                "completed job",
                409,
            )
        return self.parse(message, base=earlier.request, attached=attached), earlier

    async def _take_image(
        self,
        job_id: str,
        message: str,
        request: GenerationRequest,
        upload: bytes | None,
        attached: str | None,
        digest: str | None = None,
        earlier_job: Job | None = None,
        user: str = "",
    ) -> GenerationRequest:
        """Fetch (or read) the image the job starts from, check and re-encode it (Pillow, in a
        thread) and keep it as the job's input (`input_path`), before the job is added. A URL
        is fetched now: chat attachment URLs expire. For an img2img without a size, the
        request is parsed again with the image's size (it keeps the image's ratio).

        At most `MAX_FETCHES` fetches run at once, `MAX_FETCHES_PER_USER` of one `user`; past
        that a submission is refused (503, or 429 for the user, with ``Retry-After``) rather
        than queued, so a flood holds no memory and one user cannot hold every slot.

        Raises:
            Refused: the image cannot be had or used (422), one sentence.
        """
        image = request.image
        assert image is not None and self.output_dir is not None
        try:
            earlier = image.earlier
            if earlier is not None:
                data = await self._earlier_image(earlier_job, *earlier)
            elif image.source == "upload":
                if upload is None:
                    raise Refused("the image was to be attached, but the request has none")
                data = upload
            else:
                if self.image_fetcher is None:
                    raise Refused("this service does not fetch images from URLs")
                if self._fetching[user] >= MAX_FETCHES_PER_USER:
                    raise Refused(
                        f"{MAX_FETCHES_PER_USER} of your images are being fetched already; "
                        "send the next when one of them is in",
                        429,
                        retry_after=5,
                    )
                try:
                    self._fetches.acquire_nowait()
                except trio.WouldBlock:
                    raise Refused(
                        "the service is fetching many images now; try again in a few seconds",
                        503,
                        retry_after=5,
                    ) from None
                self._fetching[user] += 1
                try:
                    data = await self.image_fetcher(image.source)
                finally:
                    self._fetches.release()
                    self._fetching[user] -= 1
                    if not self._fetching[user]:
                        del self._fetching[user]
            size = await trio.to_thread.run_sync(
                functools.partial(inputimage.probe, data, max_pixels=self.image_max_pixels),
                limiter=self._image_limiter,
            )
            if earlier is None:
                request = self.parse(message, image_size=size, attached=attached)
                size = (request.width, request.height)
            elif not request.upscale:
                size = (request.width, request.height)  # --vary at another size
            png = await trio.to_thread.run_sync(
                functools.partial(
                    inputimage.prepare, data, *size, max_pixels=self.image_max_pixels
                ),
                limiter=self._image_limiter,
            )
            await trio.to_thread.run_sync(write_atomic, input_path(self.output_dir, job_id), png)
            if digest is not None and request.image is not None:
                request = attrs.evolve(request, image=attrs.evolve(request.image, digest=digest))
        except InputImageError as exc:
            raise Refused(str(exc), 422) from None
        except ImageError as exc:  # the disk
            log.error("could not keep the input image of job %s: %s", job_id, exc)
            raise Refused("the service cannot keep the image now; try again later", 503) from None
        return request

    async def _earlier_image(self, job: Job | None, job_id: str, n: int) -> bytes:
        """Image ``n`` of a completed job, as its file (read in a thread)."""
        assert self.output_dir is not None
        if job is None or job.id != job_id:
            job = await self.store.get(job_id)
        count = job.request.count if job is not None else 1
        path = (
            result_path(self.output_dir, job_id)
            if count == 1
            else image_path(self.output_dir, job_id, n)
        )
        try:
            return await trio.to_thread.run_sync(path.read_bytes)
        except OSError:
            raise Refused(
                f"the images of job {job_id} are no longer kept (pruned or deleted)", 410
            ) from None

    async def _copy_image(self, from_id: str, to_id: str) -> None:
        """Keep job `from_id`'s input image for job `to_id` too (a retry)."""
        if self.output_dir is None:
            raise Refused("this service takes no input images")
        source = input_path(self.output_dir, from_id)
        try:
            data = await trio.to_thread.run_sync(source.read_bytes)
            await trio.to_thread.run_sync(write_atomic, input_path(self.output_dir, to_id), data)
        except OSError:
            raise Refused(f"the image job {from_id} started from is no longer kept", 410) from None
        except ImageError as exc:
            log.error("could not copy the input image of job %s: %s", from_id, exc)
            raise Refused("the service cannot keep the image now; try again later", 503) from None

    async def _forget_image(self, job_id: str) -> None:
        """Delete an input image kept for a job that was not added after all (a failure is
        logged, never raised: it would hide why the job was not added; start-up deletes it)."""
        if self.output_dir is not None:
            path = input_path(self.output_dir, job_id)
            try:
                await trio.to_thread.run_sync(functools.partial(path.unlink, missing_ok=True))
            except OSError as exc:
                log.warning("could not delete %s: %s", path, exc.strerror)

    async def submit(
        self,
        nick: str,
        message: str,
        *,
        idempotency_key: str | None = None,
        key_name: str | None = None,
        webhook_url: str | None = None,
        webhook_started: bool = False,
        previews: bool = False,
        image_url: str | None = None,
        upload: bytes | None = None,
    ) -> tuple[JobView, bool]:
        """Queue a job; it is on disk before this returns. Returns its view, and whether it
        is an earlier job replayed for the same Idempotency-Key.

        A job that starts from an image (``--image``, `image_url`, an `upload`, or a
        follow-up's earlier image) has it fetched, checked and kept before it is added.

        An Idempotency-Key holds for `idempotency_ttl` seconds from the job's creation; used
        again for another message, it is refused (422).

        Raises:
            Refused: the message, nick or queue caps refuse it (``status`` 400/422/429/503).
            PromptError, WorkflowError: the message cannot become a job.
        """
        if self.stopping:
            raise Refused("the service is shutting down; try again shortly", 503, retry_after=5)
        nick = clean_nick(nick)
        if idempotency_key is not None:
            idempotency_key = idempotency_key.strip()
            if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
                raise Refused(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
        image_url = (image_url or "").strip() or None
        if upload is not None and image_url is not None:
            raise Refused("give one input image: an upload or image_url, not both")
        attached = "upload" if upload is not None else image_url
        digest = None if upload is None else await trio.to_thread.run_sync(_digest, upload)
        accept = functools.partial(
            self._accept,
            nick,
            message,
            key_name=key_name,
            webhook_url=webhook_url,
            webhook_started=webhook_started,
            previews=previews,
            upload=upload,
            attached=attached,
            digest=digest,
        )
        if idempotency_key is None:
            job = await accept(None)
        else:
            # A replay is looked up first: it answers even if the message would no longer be
            # taken (the job it follows up on was pruned, a model went away).
            async with self._key_locks.hold((user_of(key_name, nick), idempotency_key)):
                earlier = await self.store.by_idempotency_key(
                    nick, idempotency_key, key_name=key_name
                )
                if earlier is not None and time.time() - earlier.created > self.idempotency_ttl:
                    await self.store.forget_idempotency_key(earlier)
                elif earlier is not None:
                    if earlier.message != message:
                        other = "another message"
                    elif not _same_image(earlier, message, attached, digest):
                        other = "another image"
                    else:
                        other = None
                    if other is not None:
                        raise Refused(
                            f"the Idempotency-Key {idempotency_key[:64]!r} was used for "
                            f"{other}; send a new key with a new request",
                            422,
                        )
                    return self.store.view_of(earlier), True
                job = await accept(idempotency_key)
        self.scheduler.wake()
        view = self.store.view_of(job)
        request = job.request
        log.info(
            "job %s accepted from %s: %s %s, %dx%d, %d image(s), seed %d, queue position %s",
            job.id,
            nick,
            request.kind,
            request.model,
            request.width,
            request.height,
            request.count,
            request.seed,
            view.queue_position,
            extra=job.log_fields("accepted"),
        )
        return view, False

    async def _accept(
        self,
        nick: str,
        message: str,
        idempotency_key: str | None,
        *,
        key_name: str | None,
        webhook_url: str | None,
        webhook_started: bool,
        previews: bool,
        upload: bytes | None,
        attached: str | None,
        digest: str | None,
    ) -> Job:
        """Understand the message, check its webhook, and add the job. A job that starts from
        an image holds its place under the caps from before the image is taken (so a full
        queue costs no fetch, and many at once cannot all fetch), and its image is deleted
        again if the job is not added."""
        request, earlier = await self._understand(message, attached)
        hook = await self._webhook(webhook_url, key_name)
        if request.image is None:
            return await self._add(
                nick, message, request, idempotency_key, key_name, hook, webhook_started, previews
            )
        job_id = Job.new_id()
        user = user_of(key_name, nick)
        with self._reserved(user, nick):
            try:
                request = await self._take_image(
                    job_id, message, request, upload, attached, digest, earlier, user
                )
                return await self._add(
                    nick,
                    message,
                    request,
                    idempotency_key,
                    key_name,
                    hook,
                    webhook_started,
                    previews,
                    job_id=job_id,
                    reserved=True,
                )
            except BaseException:
                with trio.move_on_after(_CLEANUP_SECONDS, shield=True):
                    await self._forget_image(job_id)
                raise

    @contextlib.contextmanager
    def _reserved(self, user: str, nick: str) -> Iterator[None]:
        """Check the caps and hold a place under them (the job counts as queued) until the
        block ends; the check and the reservation happen at once (no checkpoint between)."""
        self._check_caps(user, nick)
        self._adding_total += 1
        self._adding[user] += 1
        try:
            yield
        finally:
            self._adding_total -= 1
            self._adding[user] -= 1
            if not self._adding[user]:
                del self._adding[user]

    def _check_caps(self, user: str, nick: str) -> None:
        """Refuse (429) when the queue, or the user's share of it, is full."""
        if self.store.count_queued() + self._adding_total >= self.max_queue:
            raise Refused(
                f"the queue is full ({self.max_queue} jobs); try again in a minute",
                429,
                retry_after=60,
            )
        mine = self.store.count_queued(user) + self._adding[user]
        if mine >= self.max_queue_per_user:
            raise Refused(
                f"{nick} already has {mine} jobs queued (the limit is "
                f"{self.max_queue_per_user}); wait for one to finish",
                429,
                retry_after=30,
            )

    async def _add(
        self,
        nick: str,
        message: str,
        request: GenerationRequest,
        idempotency_key: str | None,
        key_name: str | None,
        webhook_url: str | None = None,
        webhook_started: bool = False,
        previews: bool = False,
        *,
        retry_of: str | None = None,
        job_id: str | None = None,
        reserved: bool = False,
    ) -> Job:
        """Check the caps and add the job; on disk when this returns. The check and the
        reservation happen at once (no checkpoint between), and jobs on their way to the
        disk count: concurrent submissions cannot overshoot a cap while they share a commit.
        (Between its commit and this task resuming, a job counts twice: a cap errs on the
        side of refusing, for that moment.)

        Raises:
            Refused: a queue cap (429).
        """
        user = user_of(key_name, nick)
        job = Job(
            id=job_id or Job.new_id(),
            nick=nick,
            message=message,
            request=request,
            idempotency_key=idempotency_key,
            key_name=key_name,
            webhook_url=webhook_url,
            webhook_started=webhook_started and webhook_url is not None,
            previews=previews,
            retry_of=retry_of,
        )
        if reserved:  # the caller holds its place
            await self.store.add(job)
        else:
            with self._reserved(user, nick):
                await self.store.add(job)
        return job

    async def _webhook(self, url: str | None, key_name: str | None) -> str | None:
        """The job's webhook URL (the request's, or its API key's default), checked: a URL
        whose host resolves to a loopback, private or link-local address is refused.

        Raises:
            Refused: a bad URL, or webhooks are off (no secret to sign with).
        """
        url = url.strip() if url else self.webhook_defaults.get(key_name) or None
        if url is None:
            return None
        if not self.webhook_signer(key_name):
            raise Refused(
                "webhooks are off on this service (the operator set no FATEGEN_WEBHOOK_SECRET)"
            )
        refusal = await webhook_refusal(url, allow_private=self.webhook_allow_private)
        if refusal is not None:
            raise Refused(refusal)
        return url

    async def view(self, job_id: str) -> JobView | None:
        """A snapshot of the job (a finished one may be read from disk); None if unknown."""
        return await self.store.view(job_id)

    async def wait_finished(self, job_id: str) -> None:
        """Block until the job has finished (or the service stops); wrap it in a timeout.
        A job not in memory is finished (or unknown): that answers at once."""
        while not self.stopping:
            job = self.store.held(job_id)
            if job is None or job.status.finished:
                return
            await self.store.wait_change(job_id, progress=False)  # its end, not each step

    async def cancel(
        self, job_id: str, *, nick: str | None, admin: bool, key_name: str | None = None
    ) -> JobView:
        """Cancel a job: the nick that submitted it, through the same API key, or an admin."""
        job = await self.store.get(job_id)
        if job is None:
            raise Refused(f"there is no job {job_id}", 404)
        if not admin:
            if nick is None:
                raise Refused("say which nick submitted the job (?nick=...) to cancel it", 403)
            if job.key_name is not None and key_name != job.key_name:
                raise Refused(
                    f"job {job_id} was submitted with another API key; only it may cancel it",
                    403,
                )
            if clean_nick(nick) != job.nick:
                raise Refused(f"job {job_id} belongs to another nick; only it may cancel it", 403)
        who = "admin" if admin and nick is None else (nick or "admin")
        if job.status.finished:
            raise Refused(f"job {job_id} has already {job.status.value}", 409)
        if job.generated is not None:
            raise self._too_late(job)
        if job.status is JobStatus.QUEUED and not self.scheduler.is_dispatched(job.id):
            if await self.store.cancel_queued(job, who):
                log.info(
                    "job %s cancelled by %s while queued",
                    job.id,
                    who,
                    extra=job.log_fields("cancelled"),
                )
            elif job.ended():
                raise Refused(f"job {job_id} has already {job.status.value}", 409)
        if not job.ended():
            # Dispatched to the worker (posted ahead, or running), or dispatched just now.
            if not await self.canceller.cancel(job, who):
                raise self._too_late(job)
            with trio.move_on_after(10):
                while not job.ended():
                    await self.store.wait_change(job.id)
        if job.ended() and job.status is not JobStatus.CANCELLED:
            raise Refused(f"job {job_id} has already {job.status.value}", 409)
        return self.store.view_of(job)

    @staticmethod
    def _too_late(job: Job) -> Refused:
        if job.status.finished:
            return Refused(f"job {job.id} has already {job.status.value}", 409)
        return Refused(
            f"job {job.id} has already been generated; its image is being made, "
            "so it can no longer be cancelled",
            409,
        )

    # -- the operator's queue control ------------------------------------------------------
    async def list_jobs(
        self,
        status: JobStatus,
        *,
        nick: str | None,
        model: str | None,
        limit: int,
        cursor: str | None,
    ) -> tuple[list[JobView], str | None]:
        """A page of jobs and the next page's cursor (None: the last page). Queued jobs in
        queue order (O(n) in the queued jobs: an operator's listing, not a bot's request);
        the others newest first, read page by page from SQLite (O(page))."""
        start: int | None = None
        if cursor:
            if not cursor.isdigit():
                raise Refused(f"the cursor {cursor[:32]!r} is not one this service gave")
            start = int(cursor)
        if status is JobStatus.QUEUED:
            offset = start or 0
            jobs = [
                j
                for j in self.store.queued()
                if (nick is None or j.nick == nick) and (model is None or j.model == model)
            ]
            page = [self.store.view_of(j) for j in jobs[offset : offset + limit]]
            more = offset + limit < len(jobs)
            return page, str(offset + limit) if more else None
        found = await self.store.list_page(
            status, before_seq=start, limit=limit + 1, nick=nick, model=model
        )
        views = [v for v, _ in found[:limit]]
        next_cursor = str(found[limit - 1][1]) if len(found) > limit else None
        return views, next_cursor

    async def set_paused(self, paused: bool, who: str) -> None:
        """Pause or resume dispatching; the state is kept across restarts."""
        await self.store.set_meta(PAUSED_META, "1" if paused else "0")
        self.scheduler.hold(paused)
        log.info("queue %s by %s", "paused" if paused else "resumed", who)

    async def retry(self, job_id: str, who: str) -> JobView:
        """A new job with the failed or cancelled job's request and seed, linked to it."""
        old = await self.store.get(job_id)
        if old is None:
            raise Refused(f"there is no job {job_id}", 404)
        if old.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise Refused(
                f"job {job_id} is {old.status.value}; only a failed or cancelled job is retried",
                409,
            )
        job_id = Job.new_id()
        if old.request.image is not None:
            self._check_caps(old.user, old.nick)  # before the copy
            await self._copy_image(old.id, job_id)
        try:
            job = await self._add(
                old.nick,
                old.message,
                old.request,
                None,
                old.key_name,
                old.webhook_url,
                old.webhook_started,
                old.previews,
                retry_of=old.id,
                job_id=job_id,
            )
        except BaseException:
            if old.request.image is not None:
                with trio.move_on_after(_CLEANUP_SECONDS, shield=True):
                    await self._forget_image(job_id)
            raise
        self.scheduler.wake()
        log.info("job %s retried as %s by %s", old.id, job.id, who, extra=job.log_fields("retry"))
        return self.store.view_of(job)

    async def prioritize(self, job_id: str, *, whole_queue: bool, who: str) -> JobView:
        """Move a queued job to the front of its user's jobs, or of the whole queue."""
        job = await self.store.get(job_id)
        if job is None:
            raise Refused(f"there is no job {job_id}", 404)
        if job.status is not JobStatus.QUEUED or self.scheduler.is_dispatched(job.id):
            raise Refused(f"job {job_id} is no longer waiting in the queue", 409)
        seq = self.scheduler.prioritize(job, whole_queue=whole_queue)
        if seq != job.seq:
            # Out of the order under its old seq, back in under the new one.
            self.scheduler.set_aside(job)
            try:
                await self.store.update(job, expect=(JobStatus.QUEUED,), seq=seq)
            finally:
                if job.status is JobStatus.QUEUED:
                    self.scheduler.add(job)
                self.scheduler.wake()
        log.info(
            "job %s moved to the front of %s by %s",
            job.id,
            "the queue" if whole_queue else f"{job.nick}'s jobs",
            who,
        )
        return self.store.view_of(job)

    async def cancel_all(self, nick: str, key_name: str | None, who: str) -> list[str]:
        """Cancel every queued or running job of a nick (within an API key, if given);
        O(n) in the jobs held: an operator's action."""
        nick = clean_nick(nick)
        mine = [
            j.id
            for j in self.store.active_jobs()
            if j.nick == nick and (key_name is None or j.key_name == key_name)
        ]
        cancelled: list[str] = []
        for job_id in mine:
            try:
                await self.cancel(job_id, nick=None, admin=True)
            except Refused:
                continue  # it ended meanwhile, or it is too late
            cancelled.append(job_id)
        log.info("%d job(s) of %s cancelled by %s", len(cancelled), nick, who)
        return cancelled

    def stats(self) -> dict[str, object]:
        """The live figures of the last hour (O(jobs finished in the hour))."""
        now = time.time()
        recent = self._finished
        while recent and recent[0][0] < now - 3600:
            recent.popleft()
        waits = sorted(w for _, status, w in recent if w is not None)
        median = None
        if waits:
            middle = len(waits) // 2
            median = waits[middle] if len(waits) % 2 else (waits[middle - 1] + waits[middle]) / 2
        return {
            "queued": self.store.count_queued(),
            "processing": self.store.count_processing(),
            "completed_last_hour": sum(1 for _, s, _ in recent if s is JobStatus.COMPLETED),
            "failed_last_hour": sum(1 for _, s, _ in recent if s is JobStatus.FAILED),
            "median_wait_seconds": median,
        }

    def observe(self, job: Job, before: JobStatus | None) -> None:
        """`JobStore.on_transition`: a finished job counts in the last hour's figures."""
        if job.status.finished:
            start = job.first_started or job.started
            wait = None if start is None else max(0.0, start - job.created)
            self._finished.append((job.finished or time.time(), job.status, wait))

    def stop(self) -> None:
        """Refuse new jobs and wake every waiter with the current state."""
        self.stopping = True
        self.store.wake_all()
