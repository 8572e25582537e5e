"""The service: every actor in one nursery, started in dependency order, HTTP last.

    bot --HTTP--> front end --submit--> store + scheduler --job--> worker --REST/WS--> ComfyUI
                     ^ /job /wait            | job state          | image refs
                     +------ store <---------+<--- post-processor <+ (grid, WebP)
                          idle watchdog --(/free after idle)--> ComfyUI

`run_service` reports ready (through ``task_status``) only once every actor runs and the HTTP
socket is bound. Setting the ``shutdown`` event stops it gracefully: new requests are refused,
long-polls are answered, the running job gets ``shutdown_grace`` seconds, then all stops.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path

import attrs
import httpx
import trio

from fategen.comfy import ComfySession, ImageRef
from fategen.db import JobDB
from fategen.errors import ConfigError
from fategen.frontdesk import Frontdesk
from fategen.http import create_app, serve_http
from fategen.jobs import Job, JobStatus, JobStore
from fategen.modelconfig import ModelConfig, load_model_config
from fategen.policy import FairPolicy
from fategen.postprocess import PostProcessor
from fategen.scheduler import Scheduler, requeue_interrupted
from fategen.settings import Settings
from fategen.watchdog import IdleWatchdog
from fategen.worker import ComfyWorker
from fategen.workflow import WorkflowTemplate, load_templates

log = logging.getLogger("fategen")


@attrs.frozen
class Running:
    """What a started service hands back (tests and the CLI use it)."""

    urls: list[str]
    settings: Settings
    store: JobStore
    desk: Frontdesk
    session: ComfySession

    @property
    def url(self) -> str:
        return self.urls[0]


def load_configuration(settings: Settings) -> tuple[ModelConfig, dict[str, WorkflowTemplate]]:
    """Templates and model configuration (blocking; raises ConfigError)."""
    if not settings.workflows_dir.is_dir():
        raise ConfigError(f"the workflows folder {settings.workflows_dir} does not exist")
    templates = load_templates(settings.workflows_dir)
    config = load_model_config(settings.model_config, templates=frozenset(templates))
    return config, templates


def _prepare_output(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder {path}: {exc.strerror}") from exc


async def run_service(
    settings: Settings,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    config, templates = await trio.to_thread.run_sync(load_configuration, settings)
    await trio.to_thread.run_sync(_prepare_output, settings.output_dir)
    db = await trio.to_thread.run_sync(JobDB, settings.data_dir / "jobs.sqlite3")
    try:
        await _run(settings, shutdown, config, templates, db, task_status)
    finally:
        db.close()


async def _run(
    settings: Settings,
    shutdown: trio.Event,
    config: ModelConfig,
    templates: Mapping[str, WorkflowTemplate],
    db: JobDB,
    task_status: trio.TaskStatus[Running],
) -> None:
    store = JobStore(db)
    for job in await store.load():
        changes = requeue_interrupted(job)
        log.warning(
            "job %s was processing when fategen stopped: %s",
            job.id,
            "running it again" if changes["status"] is JobStatus.QUEUED else "failed",
        )
        await store.update(job, **changes)
    store.recovered = {j.id for j in store.queued()}
    policy = FairPolicy(
        checkpoint_of=lambda m: config.models[m].checkpoint_name if m in config.models else m
    )
    requests_tx, requests_rx = trio.open_memory_channel[trio.MemorySendChannel[Job]](0)
    results_tx, results_rx = trio.open_memory_channel[tuple[Job, list[ImageRef]]](4)
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=4)
    timeout = httpx.Timeout(30.0, connect=settings.connect_timeout)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        session = ComfySession(
            settings.comfyui_url,
            http=http,
            folder_path=settings.comfyui_folder_path,
            connect_timeout=settings.connect_timeout,
            stall_timeout=settings.stall_timeout,
            job_timeout=settings.job_timeout,
        )
        scheduler = Scheduler(store, policy, requests_rx)
        worker = ComfyWorker(store, scheduler, session, config, templates, requests_tx, results_tx)
        post = PostProcessor(
            store, session.fetch_images, settings.output_dir, results_rx, settings.webp_quality
        )

        async def free(*, unload_models: bool = True, free_memory: bool = False) -> None:
            await session.free(unload_models=unload_models, free_memory=free_memory)
            policy.unloaded()

        watchdog = IdleWatchdog(
            free,
            unload_after=settings.idle_unload_seconds,
            free_memory_after=settings.idle_free_memory_seconds,
        )
        store.on_activity = lambda active: (
            watchdog.notify_busy() if active else watchdog.notify_idle()
        )
        desk = Frontdesk(
            store,
            scheduler,
            config,
            templates,
            canceller=worker,
            health=session,
            max_queue=settings.max_queue,
            max_queue_per_user=settings.max_queue_per_user,
        )
        app = create_app(desk, settings, settings.comfyui_url)
        stop_http = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            await nursery.start(watchdog.run)
            if store.active:
                watchdog.notify_busy()
            await nursery.start(post.run)
            await nursery.start(scheduler.run)
            await nursery.start(worker.run)
            urls = await nursery.start(
                functools.partial(
                    serve_http, app, settings.http_host, settings.http_port, stop_http.wait
                )
            )
            log.info(
                "fategen listening on %s, ComfyUI at %s", ", ".join(urls), settings.comfyui_url
            )
            task_status.started(Running(urls, settings, store, desk, session))
            await shutdown.wait()
            log.info("shutting down: refusing new jobs, answering waiters")
            desk.stop()
            scheduler.pause()
            stop_http.set()
            with trio.move_on_after(settings.shutdown_grace) as grace:
                while worker.running or post.busy:
                    await store.wait_any_change()
            if grace.cancelled_caught:
                log.warning(
                    "the running job did not finish within %.0f s; it will run again "
                    "after the restart",
                    settings.shutdown_grace,
                )
            await worker.withdraw_submitted()
            nursery.cancel_scope.cancel()
    log.info("fategen stopped")
