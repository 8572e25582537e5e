"""The service: every actor in one nursery, started in dependency order, HTTP last.

    bot --HTTP--> front end --submit--> store + scheduler --job--> worker/backend --> ComfyUI xN
                     ^ /job /wait            | job state          | image refs   (REST/WS)
                     +------ store <---------+<--- post-processor <+ (grid, WebP)
                          idle watchdog per backend --(/free after idle)--> ComfyUI

`run_service` reports ready (through ``task_status``) only once every actor runs and the HTTP
socket is bound. Setting the ``shutdown`` event stops it gracefully: new requests are refused,
long-polls are answered, the running job gets ``shutdown_grace`` seconds, then all stops.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import resource
import socket
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import cast

import attrs
import httpx
import trio
from quart_trio import QuartTrio

from fategen import __version__
from fategen.api.app import create_app
from fategen.api.frontdesk import PAUSED_META, Frontdesk
from fategen.api.server import install_connection_isolation, serve_http
from fategen.comfy.session import ComfySession
from fategen.comfy.watchdog import FreeFunction, IdleWatchdog
from fategen.comfy.wire import ImageRef
from fategen.core.availability import ModelAvailability
from fategen.core.backends import DEFAULT_BACKEND, BackendSpec
from fategen.core.modelconfig import ModelConfig, load_model_config
from fategen.core.policy import FairPolicy
from fategen.core.workflow import WorkflowTemplate, load_templates
from fategen.errors import ConfigError
from fategen.queue.fetch import FetchLimits, fetch_image
from fategen.queue.fleet import Backend, Fleet, run_backend
from fategen.queue.postprocess import Fetch, PostProcessor, remove_partial_results
from fategen.queue.scheduler import Scheduler, WorkRequest, requeue_interrupted
from fategen.queue.webhooks import WebhookSender
from fategen.queue.worker import ComfyWorker
from fategen.settings import Settings
from fategen.store.jobs import Job, JobStore
from fategen.store.retention import Pruner, remove_orphan_inputs
from fategen.store.sqlite import JobDB

log = logging.getLogger("fategen")


@attrs.frozen
class Running:
    """What a started service hands back (tests and the CLI use it)."""

    urls: list[str]
    service: Service

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def settings(self) -> Settings:
        return self.service.settings

    @property
    def store(self) -> JobStore:
        return self.service.store

    @property
    def desk(self) -> Frontdesk:
        return self.service.desk

    @property
    def session(self) -> ComfySession:
        return self.service.session


def load_configuration(settings: Settings) -> tuple[ModelConfig, dict[str, WorkflowTemplate]]:
    """Templates and model configuration (blocking; raises ConfigError)."""
    if not settings.workflows_dir.is_dir():
        raise ConfigError(f"the workflows folder {settings.workflows_dir} does not exist")
    templates = load_templates(settings.workflows_dir)
    config = load_model_config(settings.model_config, templates=frozenset(templates))
    return config, templates


def _prepare_output(path: Path) -> None:
    """Create the output folder, check it takes files, and remove what a crash left
    half-written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder {path}: {exc.strerror}") from exc
    _check_writable(path, "the output folder (FATEGEN_OUTPUT_DIR)")
    remove_partial_results(path)


def _check_writable(folder: Path, what: str) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write to {what} {folder}: {exc.strerror}") from None


def _open_db(data_dir: Path) -> JobDB:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the data folder (FATEGEN_DATA_DIR) {data_dir}: {exc.strerror}"
        ) from None
    _check_writable(data_dir, "the data folder (FATEGEN_DATA_DIR)")
    path = data_dir / "jobs.sqlite3"
    try:
        return JobDB(path)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot open the job database {path}: {exc}") from None


def _check_comfyui_host(settings: Settings) -> None:
    """A ComfyUI host name that does not resolve is a mistake in the settings; one that
    resolves but does not answer is ComfyUI being down, which the service waits out."""
    for spec in settings.backends:
        parsed = httpx.URL(spec.url)
        host = parsed.host.strip("[]")
        variable = "COMFYUI_BACKENDS" if settings.comfyui_backends else "COMFYUI_ADDRESS"
        try:
            socket.getaddrinfo(host, parsed.port or 80, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_AGAIN,):
                log.warning("cannot resolve the ComfyUI host %r for now: %s", host, exc.strerror)
                continue
            what = f"the ComfyUI host {host!r}"
            if settings.comfyui_backends:
                what += f" of backend {spec.name!r}"
            raise ConfigError(f"{what} ({variable}) does not resolve: {exc.strerror}") from None


@attrs.define(eq=False)
class Service:
    """Every actor of the service, built but not yet running (see `build_service`)."""

    settings: Settings
    store: JobStore
    policy: FairPolicy
    fleet: Fleet
    scheduler: Scheduler
    post: PostProcessor
    desk: Frontdesk
    app: QuartTrio
    clients: list[httpx.AsyncClient]
    db: JobDB
    config: ModelConfig
    templates: dict[str, WorkflowTemplate]
    webhooks: WebhookSender
    #: Set once `run_actors` has returned (or failed).
    stopped: trio.Event = attrs.field(factory=trio.Event)

    # -- the first backend's parts (a fleet of one: the only one) ----------------------------
    @property
    def backend(self) -> Backend:
        return next(iter(self.fleet))

    @property
    def session(self) -> ComfySession:
        return self.backend.session

    @property
    def worker(self) -> ComfyWorker:
        return self.backend.workers[0]

    @property
    def watchdog(self) -> IdleWatchdog:
        return self.backend.watchdog

    @property
    def availability(self) -> ModelAvailability:
        """Which models can run on some backend (what the front desk and /models read)."""
        return self.fleet.availability

    @property
    def setup_warnings(self) -> list[str]:
        """What the backends' first checks found missing (one sentence each)."""
        return [w for backend in self.fleet for w in backend.warnings]

    async def wait_checked(self) -> None:
        """Until every backend was checked once (or could not be)."""
        for backend in self.fleet:
            await backend.first_check.wait()

    async def run_actors(
        self, shutdown: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run every actor but the HTTP server until ``shutdown`` is set, then stop gracefully.

        Reports ready once every actor runs. On shutdown: new jobs are refused, waiters are
        answered, the running jobs get ``shutdown_grace`` seconds, then everything stops.
        """
        try:
            async with contextlib.AsyncExitStack() as clients:
                for client in self.clients:
                    await clients.enter_async_context(client)
                async with trio.open_nursery() as nursery:
                    await self._recover()
                    await nursery.start(self.post.run)
                    await nursery.start(self.webhooks.run)
                    await nursery.start(self.scheduler.run)
                    for backend in self.fleet:
                        await nursery.start(
                            run_backend, backend, self.store, self.config, self.templates
                        )
                    if self.settings.retention_hours > 0:
                        pruner = Pruner(
                            self.store,
                            self.settings.output_dir,
                            max_age=self.settings.retention_hours * 3600,
                            every=self.settings.prune_interval,
                        )
                        await nursery.start(pruner.run)
                    task_status.started()
                    await shutdown.wait()
                    await self._stop()
                    nursery.cancel_scope.cancel()
        finally:
            self.db.close()
            self.stopped.set()
        log.info("fategen stopped")

    async def _recover(self) -> None:
        """Load the jobs and queue again, first, those that were processing."""
        for job in await self.store.load():
            if job.generated is not None:
                outcome = "ComfyUI had finished it; making its image"
            else:
                outcome = "asking ComfyUI about it before it goes on"
            log.warning("job %s was processing when fategen stopped: %s", job.id, outcome)
            await self.store.update(job, **requeue_interrupted(job))
        self.store.recovered = {j.id for j in self.store.queued()}
        if await self.store.get_meta(PAUSED_META) == "1":
            log.warning("the queue is paused (POST /queue/resume to dispatch again)")
            self.scheduler.hold(True)
        # The turns need each nick's last served job: finished ones are read from disk (one
        # per nick), not all held in memory.
        self.scheduler.restore([*self.store.active_jobs(), *await self.store.last_served()])
        # The same WebSocket client id as before a restart, per backend: ComfyUI sends the
        # events of the prompts posted before it to that id, so they can be followed.
        for backend in self.fleet:
            key = "comfyui_client_id"
            if len(self.fleet) > 1 or backend.name != DEFAULT_BACKEND:
                key += f":{backend.name}"
            client_id = await self.db.run(self.db.get_meta, key)
            if client_id is None:
                client_id = backend.session.client_id
                await self.db.run(self.db.set_meta, key, client_id)
            backend.session.client_id = client_id

    def begin_stop(self) -> None:
        """Refuse new jobs and answer every long-poll now (idempotent)."""
        if not self.desk.stopping:
            log.info("shutting down: refusing new jobs, answering waiters")
        self.desk.stop()
        self.scheduler.pause()

    async def _stop(self) -> None:
        self.begin_stop()
        grace = self.settings.shutdown_grace
        with trio.move_on_after(grace) as scope:
            while self.fleet.running or self.post.busy:
                await self.store.wait_any_change()
        if scope.cancelled_caught:
            log.warning(
                "the running job did not finish within %.0f s; it will run again after the restart",
                grace,
            )
        await self.fleet.withdraw_submitted()


def build_service(settings: Settings) -> Service:
    """Load the configuration and build every actor (blocking: files and SQLite are opened).

    Raises:
        ConfigError: the configuration, the output folder or the database is unusable.
    """
    config, templates = load_configuration(settings)
    _prepare_output(settings.output_dir)
    _check_comfyui_host(settings)
    db = _open_db(settings.data_dir)
    remove_orphan_inputs(settings.output_dir, db.has)
    store = JobStore(db)
    policy = FairPolicy(
        max_passes=settings.affinity_max_passes,
        max_delay=settings.affinity_max_delay,
        checkpoint_of=lambda m: config.models[m].checkpoint_name if m in config.models else m,
        user_of=lambda job: cast(Job, job).user,
    )
    requests_tx, requests_rx = trio.open_memory_channel[WorkRequest](0)
    results_tx, results_rx = trio.open_memory_channel[tuple[Job, list[ImageRef]]](4)
    clients: list[httpx.AsyncClient] = []
    backends: dict[str, Backend] = {}

    def unloader(name: str) -> FreeFunction:
        async def free(*, unload_models: bool = True, free_memory: bool = False) -> None:
            await backends[name].session.free(unload_models=unload_models, free_memory=free_memory)
            scheduler.unloaded(backends[name])  # defined below, before any watchdog runs

        return free

    for spec in settings.backends:
        http = _client_for(settings, spec)
        clients.append(http)
        session = ComfySession(
            spec.url,
            http=http,
            folder_path=spec.folder_path,
            connect_timeout=settings.connect_timeout,
            stall_timeout=settings.stall_timeout,
            job_timeout=settings.job_timeout,
            call_timeout=settings.comfyui_call_timeout,
            max_response_bytes=settings.comfyui_max_response_mib * 2**20,
            name=spec.name,
            headers=spec.request_headers(),
            probe_interval=settings.probe_interval,
            probe_timeout=settings.probe_timeout,
        )
        watchdog = IdleWatchdog(
            unloader(spec.name),
            unload_after=settings.idle_unload_seconds,
            free_memory_after=settings.idle_free_memory_seconds,
        )
        backends[spec.name] = Backend(spec, session, watchdog)
    fleet = Fleet(backends, store)
    scheduler = Scheduler(store, policy, requests_rx, fleet)
    for backend in fleet:
        for _ in range(backend.spec.slots):
            backend.workers.append(
                ComfyWorker(
                    store,
                    scheduler,
                    backend.session,
                    config,
                    templates,
                    requests_tx.clone(),
                    results_tx.clone(),
                    backend,
                    fleet,
                    max_losses=settings.max_losses,
                    output_dir=settings.output_dir,
                )
            )
    requests_tx.close()
    results_tx.close()
    first = next(iter(fleet))

    def fetch_for(job: Job) -> Fetch:
        """A job's images come from the backend that ran it."""
        return fleet.backends.get(job.backend or "", first).session.fetch_images

    post = PostProcessor(
        store,
        first.session.fetch_images,
        settings.output_dir,
        results_rx,
        settings.webp_quality,
        job_timeout=settings.job_timeout,
        fetch_for=fetch_for,
    )
    desk = Frontdesk(
        store,
        scheduler,
        config,
        templates,
        canceller=fleet,
        health=fleet,
        fleet=fleet,
        max_queue=settings.max_queue,
        max_queue_per_user=settings.max_queue_per_user,
        idempotency_ttl=settings.idempotency_hours * 3600,
        availability=fleet.availability,
    )
    webhook_http = httpx.AsyncClient(
        timeout=httpx.Timeout(15.0), follow_redirects=False, trust_env=False
    )
    clients.append(webhook_http)
    secret_for = _webhook_secrets(settings)
    webhooks = WebhookSender(
        store, webhook_http, secret_for, allow_private=settings.webhook_allow_private
    )
    desk.webhook_defaults = {key: url for key, url, _ in settings.key_webhooks if url}
    desk.webhook_signer = lambda key: secret_for(key) is not None
    desk.webhook_allow_private = settings.webhook_allow_private
    # Input images: fetched with their own client (redirects are followed hop by hop, each
    # checked), within the operator's limits.
    image_http = httpx.AsyncClient(
        timeout=httpx.Timeout(settings.image_fetch_timeout),
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": f"fategen/{__version__} (image fetch)"},
    )
    clients.append(image_http)
    limits = FetchLimits(
        max_bytes=settings.image_max_mib * 2**20,
        timeout=settings.image_fetch_timeout,
        allowed_networks=settings.image_allow_networks,
    )
    desk.image_fetcher = functools.partial(_fetch_image, limits=limits, http=image_http)
    desk.output_dir = settings.output_dir
    desk.image_max_pixels = settings.image_max_megapixels * 1_000_000
    app = create_app(desk, settings, first.spec.url)
    return Service(
        settings,
        store,
        policy,
        fleet,
        scheduler,
        post,
        desk,
        app,
        clients,
        db,
        config,
        templates,
        webhooks,
    )


async def _fetch_image(url: str, *, limits: FetchLimits, http: httpx.AsyncClient) -> bytes:
    return await fetch_image(url, limits, http=http)


def _webhook_secrets(settings: Settings) -> Callable[[str | None], str | None]:
    """The signing secret of an API key's webhooks: its own, else the service's (None: it
    cannot send webhooks)."""
    own = {key: secret for key, _, secret in settings.key_webhooks if secret}
    default = settings.webhook_secret or None

    def secret_for(key: str | None) -> str | None:
        return own.get(key, default) if key is not None else default

    return secret_for


def _client_for(settings: Settings, spec: BackendSpec) -> httpx.AsyncClient:
    """The REST client of one backend: its headers (token) on every call."""
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=8, max_keepalive_connections=4),
        timeout=httpx.Timeout(30.0, connect=settings.connect_timeout),
        headers=spec.request_headers(),
    )


#: File descriptors kept free of client connections: ComfyUI's connections (REST pool and
#: WebSocket), the database and its journal, images being read and written, logs, threads.
FD_RESERVE = 128


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
    return soft


def connection_cap(settings: Settings, fd_limit: int) -> int:
    """Client connections allowed at once: the setting, or fewer so `FD_RESERVE` descriptors
    stay free for ComfyUI and the database."""
    room = max(16, fd_limit - FD_RESERVE)
    if settings.max_connections > room:
        log.warning(
            "FATEGEN_MAX_CONNECTIONS=%d is more than %d open files allow (keeping %d for "
            "ComfyUI and the database): at most %d client connections at once",
            settings.max_connections,
            fd_limit,
            FD_RESERVE,
            room,
        )
        return room
    return settings.max_connections


#: Linux caps every listen backlog at this (``sysctl net.core.somaxconn``).
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


def listen_backlog(settings: Settings) -> int:
    """``FATEGEN_LISTEN_BACKLOG``, with a warning when the kernel holds fewer connections
    than that (blocking: reads ``/proc``)."""
    try:
        cap = int(SOMAXCONN.read_text(encoding="ascii"))
    except (OSError, ValueError):  # not Linux, or no /proc
        return settings.listen_backlog
    if settings.listen_backlog > cap:
        log.warning(
            "FATEGEN_LISTEN_BACKLOG=%d is more than the kernel allows (net.core.somaxconn=%d): "
            "at most %d connections wait to be accepted",
            settings.listen_backlog,
            cap,
            cap,
        )
    return settings.listen_backlog


def prepare_process_for_hypercorn() -> None:
    """For a plain hypercorn deployment (`fategen.asgi`): the open-files limit raised and each
    connection isolated, as under ``fategen serve`` (the connection cap is ``serve``'s only)."""
    raise_fd_limit()
    install_connection_isolation()


def log_setup(settings: Settings) -> None:
    """What an operator checks first: authentication (key counts, never keys), where data
    and images go; a warning when the service listens beyond this machine with no keys."""
    users, admins = len(settings.api_keys), len(settings.admin_keys)
    if users or admins:
        log.info("authentication is on: %d user key(s), %d admin key(s)", users, admins)
    else:
        log.info("authentication is off (no FATEGEN_API_KEYS or FATEGEN_ADMIN_KEYS)")
        if not _is_loopback(settings.http_host):
            log.warning(
                "listening on %s with no API keys: anyone who can reach it may submit and "
                "cancel jobs; set FATEGEN_API_KEYS",
                settings.http_host,
            )
    log.info(
        "jobs in %s, images in %s",
        (settings.data_dir / "jobs.sqlite3").resolve(),
        settings.output_dir.resolve(),
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def http_read_timeout(settings: Settings) -> float:
    """hypercorn's read timeout also runs while a request is answered (a parked /wait sends
    and receives nothing), so it must outlast the longest /wait, or the socket is dropped."""
    return max(settings.read_timeout, settings.wait_timeout_max + 5)


async def run_service(
    settings: Settings,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The whole service with its own HTTP server (``fategen serve``)."""
    service = await trio.to_thread.run_sync(build_service, settings)
    backlog = await trio.to_thread.run_sync(listen_backlog, settings)
    stop_http = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run_actors, shutdown)
        urls = await nursery.start(
            functools.partial(
                serve_http,
                service.app,
                settings.http_host,
                settings.http_port,
                stop_http.wait,
                read_timeout=http_read_timeout(settings),
                max_connections=connection_cap(settings, raise_fd_limit()),
                backlog=backlog,
            )
        )
        log.info(
            "fategen listening on %s, ComfyUI at %s",
            ", ".join(urls),
            ", ".join(f"{b.name}={b.url}" for b in settings.backends),
        )
        log_setup(settings)
        # Links in webhook payloads: the public URL, or where the service listens.
        service.store.public_base = settings.public_url or urls[0]
        task_status.started(Running(urls, service))
        await shutdown.wait()
        # Answer long-polls first, or they hold hypercorn's graceful shutdown.
        service.begin_stop()
        stop_http.set()
        await service.stopped.wait()
