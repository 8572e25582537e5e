"""The comfy worker actor: takes jobs from the scheduler and runs them on one backend.

Two tasks joined by an unbuffered channel keep ComfyUI's own queue one prompt ahead:

    scheduler --job--> submitter --(submitted)--> follower --(job, image refs)--> post-processor

The submitter builds the workflow and posts it (prompt id = job id) while the follower still
follows the previous prompt, so ComfyUI starts the next prompt the moment the last one ends.
A job shows as ``processing`` once the follower takes it, i.e. when it is the one executing.

A backend that goes away (its session turns ``down``) loses its jobs: the running one and the
one posted ahead go back to the front of the queue (`Scheduler.lost`), shown as queued, and
run on another backend that can run them (or on this one when it is back: the worker looks a
job up on ComfyUI before it posts it again). A job fails for its own fault only (an execution
error, a refused workflow), or once ``max_losses`` backends in a row lost it while it ran.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn, Protocol

import attrs
import trio

from fategen.comfy.wire import ImageRef
from fategen.core.modelconfig import ModelConfig
from fategen.core.workflow import WorkflowTemplate, build_workflow, template_for
from fategen.errors import ComfyUnavailable, FategenError, InputImageError
from fategen.queue.fleet import Backend, Fleet
from fategen.queue.scheduler import Scheduler, WorkRequest
from fategen.store.jobs import Job, JobStatus, JobStore
from fategen.store.retention import input_path

log = logging.getLogger("fategen.worker")


class UploadLost(ComfyUnavailable):
    """The job's input image could not be uploaded: ComfyUI went away, or was too slow."""


def _read_input(path: Path) -> tuple[str, bytes]:
    """A job's input image and its upload name, ``fategen-<hash>.png`` (blocking)."""
    data = path.read_bytes()
    return f"fategen-{hashlib.sha256(data).hexdigest()[:24]}.png", data


#: A job lost by this many backends in a row while it ran fails (``FATEGEN_MAX_LOSSES``).
MAX_LOSSES = 3
#: A job ComfyUI is still executing when fategen comes back for the second time fails.
MAX_INTERRUPTIONS = 2
INTERRUPTED_TWICE = "the job was interrupted twice (fategen restarted while it ran); giving up"
#: Starts of one job beyond its losses (restarts of fategen during it) before it is given up.
MAX_STARTS = 5


class Session(Protocol):
    """What the worker needs of `fategen.comfy.session.ComfySession`."""

    async def submit(
        self,
        workflow: dict[str, object],
        *,
        prompt_id: str,
        fail_when_down: bool = False,
        previews: bool = False,
    ) -> None: ...
    async def follow(
        self,
        prompt_id: str,
        on_progress: Callable[[int, int], None] | None = None,
        on_preview: Callable[[bytes, str], None] | None = None,
    ) -> list[ImageRef]: ...
    async def cancel(self, prompt_id: str) -> None: ...
    async def upload_image(self, name: str, data: bytes) -> str: ...
    async def lookup(self, prompt_id: str) -> str: ...
    async def withdraw(self, prompt_id: str) -> bool: ...
    def forget(self, prompt_id: str) -> None: ...


@attrs.define(eq=False)
class ComfyWorker:
    store: JobStore
    scheduler: Scheduler
    session: Session
    config: ModelConfig
    templates: Mapping[str, WorkflowTemplate]
    requests: trio.MemorySendChannel[WorkRequest]
    results: trio.MemorySendChannel[tuple[Job, list[ImageRef]]]
    backend: Backend
    fleet: Fleet
    max_losses: int = MAX_LOSSES
    #: Where the images jobs start from are kept (`fategen.store.retention.input_path`).
    output_dir: Path | None = None
    _scopes: dict[str, trio.CancelScope] = attrs.field(factory=dict, init=False)
    #: Jobs this worker holds (from dispatch to the hand-over to the post-processor, or
    #: their end); the backend's ``held`` has those of all its workers.
    _held: set[str] = attrs.field(factory=set, init=False)
    #: The job posted to ComfyUI ahead of the running one, not yet followed.
    _ahead: Job | None = attrs.field(default=None, init=False)
    #: The hand-over of `_ahead` to the follower (cancelled when the job is taken back).
    _handover: trio.CancelScope | None = attrs.field(default=None, init=False)
    #: A take-back in progress: the job id and the event set when it is decided.
    _taking: tuple[str, trio.Event] | None = attrs.field(default=None, init=False)
    _taken: set[str] = attrs.field(factory=set, init=False)

    @property
    def _cancels(self) -> dict[str, str]:
        """Job id -> who cancels it (shared by the fleet's workers)."""
        return self.fleet.cancels

    @property
    def running(self) -> set[str]:
        """Jobs executing on this worker's backend now."""
        return self.backend.running

    def holds(self, job_id: str) -> bool:
        return job_id in self._held

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        async with self.requests, self.results:
            submitted_tx, submitted_rx = trio.open_memory_channel[Job](0)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._submitter, submitted_tx)
                nursery.start_soon(self._follower, submitted_rx)
                task_status.started()
        raise RuntimeError("the comfy worker stopped")

    def _hold(self, job: Job) -> None:
        self._held.add(job.id)
        self.backend.held.add(job.id)
        self.backend.note_activity()

    # -- cancel ---------------------------------------------------------------------------
    async def cancel(self, job: Job, by: str) -> bool:
        """Cancel a job dispatched to this worker, at whatever stage it is.

        Returns False when it is too late: ComfyUI has finished the job and its image is
        being made. Otherwise the job ends ``cancelled`` and never starts: dispatched but not
        started, it is cancelled here and now (whoever holds it drops it, and it is deleted
        from ComfyUI's queue); running, its follow is cancelled and the prompt interrupted,
        and the follower records the cancel at once.
        """
        if job.generated is not None or job.status.finished:
            return False
        self._cancels[job.id] = by
        posted = job.submitted is not None
        async with trio.open_nursery() as nursery:
            if posted:
                # Stopped on ComfyUI at once, not after the cancel's durable commit: the
                # prompt posted ahead may start (and end) on ComfyUI meanwhile.
                nursery.start_soon(self.stop_on_comfy, job.id)
            if await self.store.cancel_queued(job, by):
                log.info("job %s cancelled by %s before it started", job.id, by)
        scope = self._scopes.get(job.id)
        if scope is not None:
            scope.cancel()
        if not posted:
            await self.stop_on_comfy(job.id)  # it may have been posted meanwhile
        if job.id not in self._held:  # nobody holds it any more to read the cancel
            self._cancels.pop(job.id, None)
        return True

    async def stop_on_comfy(self, job_id: str, what: str = "cancel") -> None:
        """Take a prompt out of ComfyUI: deleted from its queue, or interrupted if it runs
        (only that prompt). A ComfyUI that cannot be reached is logged, not raised."""
        try:
            await self.session.cancel(job_id)
        except FategenError as exc:
            log.warning("could not %s job %s on ComfyUI: %s", what, job_id, exc)

    async def _finish_cancelled(self, job: Job) -> None:
        """Record the cancel of a job this worker holds (it may be cancelled already)."""
        by = self._cancels.get(job.id, "unknown")
        self.session.forget(job.id)  # a prompt cancelled before it was followed
        if await self.store.update(
            job, status=JobStatus.CANCELLED, cancelled_by=by, finished=time.time()
        ):
            log.info(
                "job %s cancelled by %s",
                job.id,
                by,
                extra=job.log_fields("cancelled"),
            )

    def _release(self, job: Job, *, lost: bool = False) -> None:
        """The worker is done with a job (any outcome, or handed to the post-processor);
        ``lost``: its backend lost it, and it goes to the front of the queue."""
        self._held.discard(job.id)
        self.backend.held.discard(job.id)
        self.backend.ahead.pop(job.id, None)
        cancelling = self._cancels.pop(job.id, None) is not None
        self.running.discard(job.id)
        if lost and not cancelling:
            self.scheduler.lost(job)
        else:
            # A job whose cancel is being recorded is not handed out again meanwhile.
            self.scheduler.done(job, requeue=not cancelling)
        self.backend.note_activity()

    async def _lose(self, job: Job, reason: str, *, ran: bool) -> bool:
        """The backend lost the job (it went away, or could not take the post): queued again
        at the front, or failed if ``max_losses`` backends in a row lost it while it ran
        (``ran``). True if it is queued again."""
        losses = job.losses + (1 if ran else 0)
        if ran:
            self.backend.jobs_lost += 1
        if losses >= self.max_losses:
            await self._fail(
                job,
                f"{reason}; it was lost {losses} times in a row, so it failed (submit it again)",
            )
            return False
        log.warning(
            "job %s: %s; it goes back to the front of the queue%s",
            job.id,
            reason,
            f" (lost {losses} of {self.max_losses} times)" if ran else "",
        )
        return await self.store.update(
            job,
            expect=(JobStatus.PROCESSING, JobStatus.QUEUED),
            status=JobStatus.QUEUED,
            started=None,
            progress_value=0,
            progress_max=0,
            losses=losses,
        )

    async def _fail(self, job: Job, error: str) -> None:
        if await self.store.update(job, status=JobStatus.FAILED, error=error, finished=time.time()):
            log.info(
                "job %s failed: %s",
                job.id,
                error,
                extra=job.log_fields("failed"),
            )

    async def take_back(self, job: Job) -> bool:
        """Take the job posted ahead here out of ComfyUI, if it has not started, so another
        backend that went idle runs it now; it goes to the front of the queue with no
        backend of its own. False when it is too late (it started here) or not ahead here."""
        if self._ahead is not job or self._taking is not None or job.id in self._cancels:
            return False
        decided = trio.Event()
        self._taking = (job.id, decided)
        taken = False
        try:
            taken = await self.session.withdraw(job.id)
            if taken:
                self.session.forget(job.id)
                taken = await self.store.update(
                    job, expect=(JobStatus.QUEUED,), submitted=None, backend=None
                )
        except FategenError as exc:
            log.warning("could not take job %s back from %s: %s", job.id, self.backend.name, exc)
        finally:
            if taken:
                self._taken.add(job.id)
                if self._handover is not None and self._ahead is job:
                    self._handover.cancel()
            self._taking = None
            decided.set()
        if taken:
            log.info("job %s taken back from %s for an idle backend", job.id, self.backend.name)
        return taken

    async def withdraw_submitted(self) -> None:
        """Shutdown: take the prompt posted ahead back out of ComfyUI's queue (it stays queued
        here and runs after the restart)."""
        job = self._ahead
        if job is not None:
            with trio.move_on_after(5):
                await self.stop_on_comfy(job.id, "withdraw")

    # -- submitter ------------------------------------------------------------------------
    async def _next_job(self) -> Job:
        reply_tx, reply_rx = trio.open_memory_channel[Job](1)
        async with reply_rx:
            await self.requests.send(WorkRequest(self.backend, reply_tx))
            return await reply_rx.receive()

    async def _submitter(self, submitted: trio.MemorySendChannel[Job]) -> None:
        async with submitted:
            while True:
                job = await self._next_job()
                self._hold(job)
                try:
                    posted = await self._submit(job)
                except ComfyUnavailable as exc:
                    # An upload that failed while the backend stayed up counts: a backend
                    # that cannot take the image (a slow link) must not get the job back
                    # for ever. One that went away meanwhile is an outage, as for a post.
                    counts = (
                        isinstance(exc, UploadLost)
                        and self.backend.session.available
                        and job.id not in self._cancels
                    )
                    requeued = await self._lose(job, str(exc), ran=counts)
                    self._release(job, lost=requeued)
                    continue
                if not posted:
                    self._release(job)
                    continue
                self._ahead = job
                self.backend.ahead[job.id] = job
                handover = self._handover = trio.CancelScope()
                try:
                    with handover:
                        await submitted.send(job)
                finally:
                    self._handover = None
                    self._ahead = None
                    self.backend.ahead.pop(job.id, None)
                if handover.cancelled_caught:  # taken back before the follower had it
                    self._taken.discard(job.id)
                    self._release(job, lost=True)

    async def _submit(self, job: Job) -> bool:
        """Post the job's prompt; False when the job has ended (failed, or cancelled: after
        every wait the job's status is read again, and a cancelled job is not posted, or is
        taken back out of ComfyUI)."""
        if job.status.finished or job.id in self._cancels:  # cancelled after its dispatch
            return False
        spec = self.config.models[job.model]
        try:
            template = template_for(self.config, self.templates, job.request)
            workflow = build_workflow(
                template,
                spec,
                job.request,
                filename_prefix="fategen",
                upscale_model=self.config.defaults.upscale_model,
            )
        except FategenError as exc:
            await self._fail(job, str(exc))
            return False
        maybe_known = job.submitted is not None and job.backend in (None, self.backend.name)
        if job.submitted is not None and not maybe_known:
            await self.fleet.stop_elsewhere(job, self.backend)  # so it does not run twice
        self.store.recovered.discard(job.id)
        if maybe_known:
            state = await self._comfy_state(job)
            if job.ended():  # cancelled during the look-up
                await self.stop_on_comfy(job.id)
                return False
            if job.interruptions >= MAX_INTERRUPTIONS and state == "running":
                # Executing on ComfyUI at two restarts of fategen: it may be what kills it.
                await self.stop_on_comfy(job.id, "stop")
                await self._fail(job, INTERRUPTED_TWICE)
                return False
            if job.attempts >= MAX_STARTS + job.losses:
                await self.stop_on_comfy(job.id, "stop")
                await self._fail(
                    job, f"fategen restarted {job.attempts} times during the job; giving up"
                )
                return False
            if state in ("queued", "running", "done"):
                log.info("job %s is %s on ComfyUI; following it", job.id, state)
                return True
        if job.request.image is not None:
            # Into ComfyUI's input folder, under a name of its content (uploading it again,
            # after a loss or on another backend, is harmless); read only now, when it is
            # needed (a job ComfyUI already has was followed above).
            try:
                name, data = await self._input_image(job)
                stored = await self.session.upload_image(name, data)
            except ComfyUnavailable as exc:
                raise UploadLost(str(exc)) from exc  # queued again, and counted as a loss
            except FategenError as exc:
                await self._fail(job, str(exc))
                return False
            workflow = build_workflow(
                template,
                spec,
                job.request,
                filename_prefix="fategen",
                image_name=stored,
                upscale_model=self.config.defaults.upscale_model,
            )
            if job.ended() or job.id in self._cancels:
                return False
        # On disk before the post: after a crash, the job is looked up in ComfyUI (and goes
        # first). Not if it was cancelled meanwhile.
        if not await self.store.update(
            job, expect=(JobStatus.QUEUED,), submitted=time.time(), backend=self.backend.name
        ):
            return False
        try:
            await self.session.submit(
                workflow, prompt_id=job.id, fail_when_down=True, previews=job.previews
            )
        except ComfyUnavailable:
            raise  # the caller queues it again
        except FategenError as exc:
            await self._fail(job, str(exc))
            return False
        # Cancelled while it was being posted: `_cancels` knows at once, the job's status
        # only once the cancel's commit is durable (the prompt could run to its end meanwhile).
        if job.ended() or job.id in self._cancels:
            await self.stop_on_comfy(job.id)
            self.session.forget(job.id)
            return False
        return True

    async def _input_image(self, job: Job) -> tuple[str, bytes]:
        """The image the job starts from (read in a thread) and the name it is uploaded as.

        Raises:
            InputImageError: it is gone from the output folder.
        """
        if self.output_dir is None:
            raise InputImageError("this service keeps no input images (no output folder)")
        path = input_path(self.output_dir, job.id)
        try:
            return await trio.to_thread.run_sync(_read_input, path)
        except OSError as exc:
            log.error("job %s: cannot read its input image %s: %s", job.id, path, exc.strerror)
            raise InputImageError(
                "the image this job starts from is no longer kept; submit it again"
            ) from None

    async def _comfy_state(self, job: Job) -> str | None:
        """Where ComfyUI has the job's prompt (``done``, ``running``, ``queued``,
        ``unknown``), or None if it cannot say."""
        try:
            return await self.session.lookup(job.id)
        except FategenError:
            return None

    # -- follower -------------------------------------------------------------------------
    async def _follower(self, submitted: trio.MemoryReceiveChannel[Job]) -> None:
        async with submitted:
            async for job in submitted:
                lost = False
                try:
                    lost = await self._follow(job)
                finally:
                    self._release(job, lost=lost)

    async def _follow(self, job: Job) -> bool:
        """Run the job to its hand-over to the post-processor, or its end; True when the
        backend lost it and it is queued again (at the front)."""
        if self._taking is not None and self._taking[0] == job.id:
            await self._taking[1].wait()  # being taken back for an idle backend: decided?
        if job.id in self._taken:
            self._taken.discard(job.id)
            return True
        if self.backend.session.state == "down" and job.id not in self._cancels:
            # Posted ahead to a backend that went away since: it never started there.
            return await self._lose(job, f"{self.backend.session.label} went away", ran=False)
        # A start counts when ComfyUI is to run the job, not when a restart finds it done.
        attempts = job.attempts + (1 if job.generated is None else 0)
        now = time.time()
        # The hand-over from queued to processing is one transition: a job cancelled while
        # it waited ahead (or at this very moment) does not start.
        started = await self.store.update(
            job,
            expect=(JobStatus.QUEUED,),
            status=JobStatus.PROCESSING,
            started=now,
            first_started=job.first_started or now,
            attempts=attempts,
            progress_value=0,
            progress_max=0,
        )
        if not started:
            self.session.forget(job.id)
            return False
        self.running.add(job.id)
        log.info(
            "job %s started on %s (%s, %d image(s), attempt %d)",
            job.id,
            self.backend.name,
            job.model,
            job.request.count,
            attempts,
            extra=job.log_fields("started"),
        )

        def progress(value: int, maximum: int) -> None:
            self.store.set_progress(job, value, maximum)

        def preview(image: bytes, mime: str) -> None:
            self.store.set_preview(job, image, mime)

        refs: list[ImageRef] | None = None
        with trio.CancelScope() as scope:
            self._scopes[job.id] = scope
            if job.id in self._cancels:
                scope.cancel()
            try:
                refs = await self.session.follow(
                    job.id, progress, preview if job.previews else None
                )
            except ComfyUnavailable as exc:
                if job.id not in self._cancels:
                    return await self._lose(job, str(exc), ran=True)
            except FategenError as exc:
                if job.id not in self._cancels:
                    await self._fail(job, str(exc))
                    return False
            finally:
                del self._scopes[job.id]
        if job.id not in self._cancels:
            assert refs is not None, scope
            # ComfyUI is done with it: from now on a restart only makes its image, and a
            # cancel is too late.
            await self.store.update(job, expect=(JobStatus.PROCESSING,), generated=time.time())
        if job.id in self._cancels:  # cancelled during the follow (or just after it)
            await self._finish_cancelled(job)
            return False
        assert refs is not None
        self.backend.jobs_done += 1
        await self.results.send((job, refs))
        return False
