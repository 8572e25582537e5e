"""The fleet: every ComfyUI backend fategen drives, what each can run and has loaded, and how
it is; read by the scheduler (placement), the front desk (which models can run anywhere) and
``/backends``.

Each `Backend` is an actor (`Backend.run`): its session (WebSocket and probes), its idle
watchdog, the check of what it has installed (on every connect, before it takes a job), the
clean-up of prompts it holds that fategen placed elsewhere meanwhile, and its workers (one per
slot, each keeping one prompt ahead).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Literal, NoReturn

import attrs
import trio

from fategen.comfy.session import ComfySession
from fategen.comfy.watchdog import IdleWatchdog
from fategen.core.availability import ModelAvailability
from fategen.core.backends import BackendSpec
from fategen.core.modelconfig import UPSCALE_MODEL_WORKFLOW, ModelConfig
from fategen.core.workflow import WorkflowTemplate
from fategen.errors import FategenError
from fategen.store.jobs import Job, JobStore

if TYPE_CHECKING:
    from fategen.queue.worker import ComfyWorker

log = logging.getLogger("fategen.fleet")

#: What `/backends` shows: the session's state, or ``drained``/``draining`` when the operator
#: took the backend out (it finishes what it holds and takes nothing new).
BackendState = Literal["connecting", "up", "reconnecting", "down", "draining", "drained"]


@attrs.frozen
class BackendView:
    """A snapshot of one backend, for the API."""

    name: str
    url: str
    state: BackendState
    enabled: bool
    loaded_checkpoint: str | None
    running: tuple[str, ...]
    ahead: tuple[str, ...]
    comfy_queue: int | None
    jobs_done: int
    jobs_lost: int
    model_loads: int
    last_error: str | None
    #: Models it can run (None: not known yet), and why each other one cannot.
    models: tuple[str, ...] | None
    unavailable: Mapping[str, str]


@attrs.define(eq=False)
class Backend:
    """One ComfyUI server and what fategen knows of it."""

    spec: BackendSpec
    session: ComfySession
    watchdog: IdleWatchdog
    #: Model ids it can run, as found on its last connection (None: not checked yet).
    runnable: frozenset[str] | None = None
    #: Model id -> why it cannot run here.
    unavailable: dict[str, str] = attrs.field(factory=dict)
    #: The LoRA files it has, as found on its last check (None: not known).
    loras: frozenset[str] | None = None
    #: ``(model id, kind)`` -> why it cannot run that kind of job (``img2img``, ``upscale``)
    #: of a model it can otherwise run: a node type of the variant's workflow, or the upscale
    #: model, is missing.
    unrunnable: dict[tuple[str, str], str] = attrs.field(factory=dict)
    #: The checkpoint it last ran (None after an idle unload, or before its first job).
    loaded: str | None = None
    #: False once drained: it finishes what it holds and takes nothing new.
    enabled: bool = True
    #: Jobs dispatched to it and not released by its workers; those executing now.
    held: set[str] = attrs.field(factory=set)
    running: set[str] = attrs.field(factory=set)
    #: Jobs posted to it ahead of the running ones, not followed yet.
    ahead: dict[str, Job] = attrs.field(factory=dict)
    jobs_done: int = 0
    jobs_lost: int = 0
    model_loads: int = 0
    workers: list[ComfyWorker] = attrs.field(factory=list)
    #: What its first check found missing of the configuration (one sentence each).
    warnings: list[str] = attrs.field(factory=list)
    #: Set once it was checked (or could not be) for the first time.
    first_check: trio.Event = attrs.field(factory=trio.Event)
    #: The session connection that `runnable` was checked on.
    _checked_connection: int = 0
    _fleet: Fleet | None = attrs.field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def accepting(self) -> bool:
        """It may take a job now: connected, checked on this connection, not drained."""
        return (
            self.enabled
            and self.session.available
            and self._checked_connection == self.session.connections
        )

    @property
    def gone(self) -> bool:
        """Its jobs may run elsewhere: down (not back within the grace), or drained."""
        return self.session.state == "down" or not self.enabled

    def can_run(self, job: Job) -> bool:
        """Whether it has what the job needs. A job no backend can run (accepted before
        they were checked) runs anywhere, to fail there with ComfyUI's own sentence."""
        loras = self.loras
        if loras is not None and not all(name in loras for name, _ in job.request.loras):
            return False  # it lacks one of the job's LoRAs
        kind = job.request.kind
        if kind != "txt2img" and (job.model, kind) in self.unrunnable:
            return self._fleet is not None and self._fleet.kind_refusal(job.model, kind) is not None
        if self.runnable is None or job.model in self.runnable:
            return True
        return self._fleet is not None and self._fleet.availability.reason(job.model) is not None

    def busy(self) -> bool:
        return bool(self.held)

    def note_activity(self) -> None:
        """Its workers took or released a job: the idle watchdog follows."""
        if self.held:
            self.watchdog.notify_busy()
        else:
            self.watchdog.notify_idle()
        if self._fleet is not None:
            self._fleet.changed()

    def state(self) -> BackendState:
        if not self.enabled:
            return "draining" if self.held else "drained"
        return self.session.state

    def view(self) -> BackendView:
        return BackendView(
            name=self.name,
            url=self.spec.url,
            state=self.state(),
            enabled=self.enabled,
            loaded_checkpoint=self.loaded,
            running=tuple(sorted(self.running)),
            ahead=tuple(sorted(self.ahead)),
            comfy_queue=self.session.queue_remaining,
            jobs_done=self.jobs_done,
            jobs_lost=self.jobs_lost,
            model_loads=self.model_loads,
            last_error=self.session.last_error,
            models=None if self.runnable is None else tuple(sorted(self.runnable)),
            unavailable=dict(self.unavailable),
        )

    def took(self, checkpoint: str) -> None:
        """A job for ``checkpoint`` was dispatched here."""
        if checkpoint != self.loaded:
            self.model_loads += 1
        self.loaded = checkpoint

    def checked(
        self,
        runnable: frozenset[str] | None,
        unavailable: dict[str, str],
        loras: frozenset[str] | None = None,
        unrunnable: dict[tuple[str, str], str] | None = None,
    ) -> None:
        self.runnable = runnable
        self.unavailable = unavailable
        self.loras = loras
        self.unrunnable = unrunnable or {}
        self._checked_connection = self.session.connections
        if self._fleet is not None:
            self._fleet.changed()


@attrs.define(eq=False)
class Fleet:
    """Every backend, by name, in the configured order."""

    backends: dict[str, Backend]
    store: JobStore
    #: Job id -> who cancels it, while a cancel is being recorded (shared by every worker).
    cancels: dict[str, str] = attrs.field(factory=dict)
    #: Which models can run somewhere (what the front desk and /models read).
    availability: ModelAvailability = attrs.field(factory=ModelAvailability)
    #: Called on any change a placement may depend on (the scheduler's wake).
    on_change: list[object] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        for backend in self.backends.values():
            backend._fleet = self

    def __iter__(self) -> Iterator[Backend]:
        return iter(self.backends.values())

    def __len__(self) -> int:
        return len(self.backends)

    def changed(self) -> None:
        self._merge_availability()
        for callback in self.on_change:
            callback()  # type: ignore[operator]

    # -- what can run where ----------------------------------------------------------------
    def _merge_availability(self) -> None:
        """A model is refused only when every backend was checked and none can run it; the
        reason names what each one lacks."""
        backends = list(self.backends.values())
        if any(b.runnable is None for b in backends):
            checked = [b for b in backends if b.runnable is not None]
            if not checked:
                return  # nothing known yet: every model is taken
        reasons: dict[str, str] = {}
        candidates = {m for b in backends for m in b.unavailable}
        for model in sorted(candidates):
            if any(b.runnable is None or model in b.runnable for b in backends):
                continue
            if len(backends) == 1:
                reasons[model] = backends[0].unavailable[model]
            else:
                reasons[model] = "; ".join(f"{b.unavailable[model]}" for b in backends)
        self.availability.reasons = reasons

    def available_loras(self) -> frozenset[str] | None:
        """The LoRAs some backend has (None while none was checked): a LoRA none has is
        refused at submit. O(backends x LoRAs)."""
        known = [b.loras for b in self.backends.values() if b.loras is not None]
        if not known:
            return None
        return frozenset().union(*known)

    def kind_refusal(self, model: str, kind: str) -> str | None:
        """Why no backend can run a ``kind`` job of ``model`` (one sentence naming what each
        lacks), or None if one can (or some were not checked yet). O(backends)."""
        if kind == "txt2img":
            return None
        reasons = []
        for backend in self.backends.values():
            if backend.runnable is None:
                return None
            reason = backend.unrunnable.get((model, kind))
            if reason is None and model in backend.runnable:
                return None
            reasons.append(reason or backend.unavailable.get(model, "it cannot run the model"))
        return "; ".join(dict.fromkeys(reasons)) or None

    def home(self, job: Job) -> Backend | None:
        """The backend the job's prompt was last posted to, if it is one of the fleet."""
        return self.backends.get(job.backend) if job.backend is not None else None

    def loaded_elsewhere(self, backend: Backend) -> frozenset[str]:
        """Checkpoints loaded on the other backends that are working (they will take their
        jobs): a free backend prefers work nobody has loaded."""
        return frozenset(
            b.loaded
            for b in self.backends.values()
            if b is not backend and b.loaded is not None and b.accepting and b.busy()
        )

    # -- health ----------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """Some backend is connected."""
        return any(b.session.available for b in self.backends.values())

    @property
    def last_error(self) -> str | None:
        for backend in self.backends.values():
            if not backend.session.available and backend.session.last_error:
                return backend.session.last_error
        return None

    @property
    def running(self) -> bool:
        return any(b.running for b in self.backends.values())

    def views(self) -> list[BackendView]:
        return [b.view() for b in self.backends.values()]

    # -- the operator ------------------------------------------------------------------------
    def drain(self, name: str) -> BackendView:
        """Take nothing new on ``name``; what it holds runs to its end. KeyError if unknown."""
        backend = self.backends[name]
        if backend.enabled:
            log.info("backend %s drained: it takes no new job", name)
        backend.enabled = False
        self.changed()
        return backend.view()

    def enable(self, name: str) -> BackendView:
        backend = self.backends[name]
        if not backend.enabled:
            log.info("backend %s enabled again", name)
        backend.enabled = True
        self.changed()
        return backend.view()

    # -- jobs --------------------------------------------------------------------------------
    def holder(self, job_id: str) -> ComfyWorker | None:
        for backend in self.backends.values():
            if job_id in backend.held:
                for worker in backend.workers:
                    if worker.holds(job_id):
                        return worker
        return None

    async def cancel(self, job: Job, by: str) -> bool:
        """Cancel a job at whatever stage (see `ComfyWorker.cancel`): through the worker that
        holds it, or, held by none, through a worker of the backend it was posted to."""
        worker = self.holder(job.id)
        if worker is None:
            home = self.home(job) or next(iter(self.backends.values()))
            worker = home.workers[0]
        return await worker.cancel(job, by)

    async def withdraw_submitted(self) -> None:
        """Shutdown: take the prompts posted ahead back out of every ComfyUI's queue."""
        async with trio.open_nursery() as nursery:
            for backend in self.backends.values():
                for worker in backend.workers:
                    nursery.start_soon(worker.withdraw_submitted)

    async def stop_elsewhere(self, job: Job, taker: Backend) -> None:
        """``taker`` is to run a job whose prompt was posted to another backend before: take
        it out of that one, so it does not run twice (if that one is down, its clean-up on
        return does it)."""
        home = self.home(job)
        if home is None or home is taker or not home.session.available:
            return
        try:
            await home.session.cancel(job.id)
        except FategenError as exc:
            log.warning("could not take job %s out of %s: %s", job.id, home.name, exc)


async def check_backend(
    backend: Backend,
    config: ModelConfig,
    templates: Mapping[str, WorkflowTemplate],
    *,
    first: bool,
) -> list[str]:
    """What the backend has of the configuration: marks the models it can run (all, if it
    cannot say) and returns the warnings (one sentence each)."""
    node_classes = {
        name: {node["class_type"] for node in t.graph.values()} for name, t in templates.items()
    }
    checkpoints = {m: spec.checkpoint_name for m, spec in config.models.items()}
    templates_of = {m: spec.workflow for m, spec in config.models.items()}
    try:
        found = await backend.session.inspect(node_classes, checkpoints, templates_of)
    except FategenError as exc:
        log.warning("could not check %s's nodes and checkpoints: %s", backend.session.label, exc)
        backend.checked(None, {})
        return []
    runnable = frozenset(m for m in config.models if m not in found.unavailable)
    if not first and found.unavailable != backend.unavailable:
        log.info(
            "%s reconnected; models it cannot run: %s",
            backend.session.label,
            ", ".join(sorted(found.unavailable)) or "none",
        )
    unrunnable: dict[tuple[str, str], str] = {}
    for model in runnable:
        for kind in ("img2img", "upscale"):
            name = config.workflow_for(model, kind)
            if name in found.missing_nodes:
                unrunnable[model, kind] = (
                    f"{backend.session.label} lacks the node type "
                    f'"{found.missing_nodes[name][0]}" of the workflow {name!r}'
                )
            elif name == UPSCALE_MODEL_WORKFLOW and (
                config.defaults.upscale_model not in found.upscale_models
            ):
                wanted = config.defaults.upscale_model
                unrunnable[model, kind] = f'{backend.session.label} has no upscale model "{wanted}"'

    backend.checked(runnable, dict(found.unavailable), found.loras, unrunnable)
    return found.warnings


async def clean_up(backend: Backend, store: JobStore) -> None:
    """After a (re)connect: prompts of fategen's jobs that ComfyUI still holds but that are no
    longer this backend's (finished, or placed on another backend meanwhile) are deleted from
    its queue, or interrupted if running, so nothing runs twice. Jobs posted here and still
    queued stay: this backend takes them up (the worker looks each one up first)."""
    try:
        running, pending = await backend.session.rest.queue()
    except FategenError as exc:
        log.warning("could not read %s's queue: %s", backend.session.label, exc)
        return
    stale: list[str] = []
    for prompt_id in sorted(running | pending):
        if prompt_id in backend.held:
            continue
        job = await store.get(prompt_id)
        if job is None:
            continue  # not fategen's: someone else's prompt
        if job.status.finished or job.backend != backend.name:
            stale.append(prompt_id)
    for prompt_id in stale:
        log.info(
            "%s still held job %s, which ran elsewhere or ended: taking it out",
            backend.session.label,
            prompt_id,
        )
        try:
            await backend.session.cancel(prompt_id)
        except FategenError as exc:
            log.warning("could not take job %s out of %s: %s", prompt_id, backend.name, exc)


async def run_backend(
    backend: Backend,
    store: JobStore,
    config: ModelConfig,
    templates: Mapping[str, WorkflowTemplate],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """The backend's actors: session, watchdog, workers, and on every connect the check of
    what it has and the clean-up of what it should no longer hold."""
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.session.run)
        await nursery.start(backend.watchdog.run)
        for worker in backend.workers:
            await nursery.start(worker.run)
        task_status.started()
        first = True
        while True:
            await backend.session.wait_available()
            connection = backend.session.connections
            await clean_up(backend, store)
            warnings = await check_backend(backend, config, templates, first=first)
            if first:
                backend.warnings = warnings
                for warning in warnings:
                    log.warning("%s", warning)
                first = False
                backend.first_check.set()
            while backend.session.available and backend.session.connections == connection:
                await backend.session.wait_state_change()
