"""``GET /metrics``: the service's numbers in Prometheus' text format (or OpenMetrics, when
the scraper asks for it in ``Accept``).

Each app has its own `CollectorRegistry` (never prometheus-client's global one: a test process
runs many services). The numbers come from three places:

- events, counted as they happen: the store's status transitions and webhook attempts
  (`JobMetrics`, prometheus-client counters and histograms) and the app's answers (`install`'s
  ``after_request`` hook, and a wrapper around the ``/wait`` handler for the parked long-polls);
- the queued jobs by model and the oldest of them, kept from those transitions
  (`QueueTracker`, O(log n) per transition);
- values read at scrape time (`ServiceCollector`): the store's O(1) counts, the fleet's
  backends (O(backends)), the open event streams.

So a scrape costs O(models + backends), whatever the number of jobs: nothing here iterates
over the store's jobs, but `QueueTracker.seed` once per process (the jobs loaded from disk at
start, which come in without a transition).

With API keys on, ``/metrics`` needs an admin key (401 without a key, 403 with a user key);
with keys off it is open, like ``/health`` and ``/backends``: it shows no address, key or
error, only counts and the names of models and backends.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from quart import Blueprint, Response, current_app, request
from quart_schema import hide
from quart_trio import QuartTrio
from sortedcontainers import SortedList

from fategen import __version__
from fategen.api.auth import caller
from fategen.api.common import EXTENSION, ApiState, error, state
from fategen.api.frontdesk import Frontdesk
from fategen.core.webhooks import DeliveryState
from fategen.store.jobs import Job, JobStatus, JobStore

__all__ = ["METRICS", "JobMetrics", "Metrics", "QueueTracker", "ServiceCollector", "install"]

log = logging.getLogger("fategen.metrics")
blueprint = Blueprint("metrics", __name__)

#: The key of the app's `Metrics` in ``app.extensions``.
METRICS = "fategen.metrics"
#: The endpoint of the long-poll (``GET /wait/<job_id>``), whose requests are counted open.
WAIT_ENDPOINT = "jobs.wait_job"
#: Statuses counted as refused requests: every 4xx, and 503 (shutting down, no backend).
REFUSED = frozenset([*range(400, 500), 503])
#: Webhook attempts remembered as begun (those in flight, and any a stop cut short).
BEGUN_HELD = 4096
#: Every state a backend may be in (`fategen.queue.fleet.BackendState`).
BACKEND_STATES = ("connecting", "up", "reconnecting", "down", "draining", "drained")

#: Histogram buckets, in seconds: waiting in the queue (seconds to an hour), generating on
#: ComfyUI (a fraction of a second to ten minutes), making the WebP (milliseconds to a minute).
QUEUE_WAIT_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
RUN_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
POSTPROCESS_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class QueueTracker:
    """The queued jobs by model, and the oldest of them, kept from the store's transitions so
    a scrape reads them in O(1) (O(models)) instead of scanning the queue.

    Each transition makes the job's entry agree with its status (queued: in, else: out), so
    applying one twice, or after `seed` already saw its result, changes nothing. Jobs loaded
    from disk at start come in without a transition: `seed` takes every queued job the store
    holds, once, at the first transition or the first scrape, whichever comes first. Both
    come after the store's `load` (the HTTP server starts after it, and only the scheduler,
    started after it too, makes jobs move), so no loaded job is missed.
    """

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._seeded = False
        #: Job id -> (model, created) of each queued job.
        self._queued: dict[str, tuple[str, float]] = {}
        self._by_model: collections.Counter[str] = collections.Counter()
        #: (created, job id) of each queued job, oldest first.
        self._by_age: SortedList[tuple[float, str]] = SortedList()

    def seed(self) -> None:
        """Take the queued jobs the store holds now (once: later calls do nothing). The one
        O(n) step here: it iterates over the active jobs, once per process."""
        if self._seeded:
            return
        self._seeded = True
        for job in self._store.active_jobs():
            self.note(job)

    def note(self, job: Job) -> None:
        """The job's status changed (or it was just seen): O(log n)."""
        self.seed()
        known = self._queued.get(job.id)
        if job.status is JobStatus.QUEUED:
            if known is None:
                entry = self._queued[job.id] = (job.model, job.created)
                self._by_model[entry[0]] += 1
                self._by_age.add((entry[1], job.id))
        elif known is not None:
            del self._queued[job.id]
            model, created = known
            self._by_model[model] -= 1
            if not self._by_model[model]:
                del self._by_model[model]
            self._by_age.discard((created, job.id))

    def by_model(self) -> Mapping[str, int]:
        """Queued jobs by model (the models with none are left out)."""
        self.seed()
        return self._by_model

    def oldest_created(self) -> float | None:
        """When the oldest queued job was submitted (wall clock); None with none queued."""
        self.seed()
        return self._by_age[0][0] if self._by_age else None


def _backend(job: Job) -> str:
    return job.backend or "none"


def _since(start: float | None, end: float | None) -> float | None:
    """Seconds from ``start`` to ``end``, never below 0 (the wall clock may step back)."""
    if start is None or end is None:
        return None
    return max(0.0, end - start)


class JobMetrics:
    """Counters and histograms fed by the store's observers (`JobStore.on_transition`,
    `JobStore.on_delivery`); each observation is O(1) (O(log n) for the tracker)."""

    def __init__(self, registry: CollectorRegistry, tracker: QueueTracker) -> None:
        self.tracker = tracker
        self.submitted = Counter(
            "fategen_jobs_submitted",
            "Jobs accepted, by model.",
            ["model"],
            registry=registry,
        )
        self.finished = Counter(
            "fategen_jobs_finished",
            "Jobs that ended, by final status (completed, failed, cancelled) and model.",
            ["status", "model"],
            registry=registry,
        )
        self.requeued = Counter(
            "fategen_jobs_requeued",
            "Jobs put back in the queue after they had started (a backend lost them, or "
            "fategen stopped while they ran), by model.",
            ["model"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "fategen_queue_wait_seconds",
            "Seconds from submission to the job's first start, by model and backend.",
            ["model", "backend"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.run = Histogram(
            "fategen_run_seconds",
            "Seconds ComfyUI took to generate a completed job (from its last start), by "
            "model and backend.",
            ["model", "backend"],
            buckets=RUN_BUCKETS,
            registry=registry,
        )
        self.postprocess = Histogram(
            "fategen_postprocess_seconds",
            "Seconds from ComfyUI's end of a completed job to its WebP on disk (fetching the "
            "images, the grid, the encoding).",
            buckets=POSTPROCESS_BUCKETS,
            registry=registry,
        )
        self.deliveries = Counter(
            "fategen_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered, retried (it failed and will be "
            "tried again), failed (it failed and was given up).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("delivered", "retried", "failed"):
            self.deliveries.labels(outcome)
        #: Delivery id -> its attempts when its attempt began (the sender records a delivery
        #: as begun, then with its outcome): at most the attempts in flight, and those cut
        #: short by a stop.
        self._begun: collections.OrderedDict[str, int] = collections.OrderedDict()

    def subscribe(self, store: JobStore) -> None:
        store.on_transition.append(self.transition)
        store.on_delivery.append(self.delivery)

    def transition(self, job: Job, before: JobStatus | None) -> None:
        """A status change the store committed (``before`` None: just submitted). The store
        wants its observers quick and never raising: a bug here is logged, not raised."""
        try:
            self._observe(job, before)
        except Exception:
            log.exception("metrics: could not count the transition of job %s", job.id)

    def _observe(self, job: Job, before: JobStatus | None) -> None:
        self.tracker.note(job)
        model, status = job.model, job.status
        if before is None:
            self.submitted.labels(model).inc()
        if status is JobStatus.PROCESSING:
            # The wait until the first start only: after a loss or a restart it starts again.
            if job.started is not None and job.started == job.first_started:
                wait = _since(job.created, job.started)
                if wait is not None:
                    self.queue_wait.labels(model, _backend(job)).observe(wait)
        elif status is JobStatus.QUEUED:
            if before is JobStatus.PROCESSING:
                self.requeued.labels(model).inc()
        else:
            self.finished.labels(status.value, model).inc()
            if status is JobStatus.COMPLETED:
                run = _since(job.started, job.generated)
                if run is not None:
                    self.run.labels(model, _backend(job)).observe(run)
                post = _since(job.generated, job.finished)
                if post is not None:
                    self.postprocess.observe(post)

    def delivery(self, delivery: DeliveryState) -> None:
        """A webhook attempt recorded: counted on its outcome, not when it begins (the sender
        records each attempt twice: begun, with its attempts unchanged, then its outcome,
        with one more attempt)."""
        try:
            self._count_delivery(delivery)
        except Exception:
            log.exception("metrics: could not count webhook delivery %s", delivery.id)

    def _count_delivery(self, delivery: DeliveryState) -> None:
        begun = self._begun.pop(delivery.id, None)
        if delivery.state == "delivered":
            self.deliveries.labels("delivered").inc()
        elif delivery.state == "failed":
            self.deliveries.labels("failed").inc()
        elif begun is not None and delivery.attempts > begun:
            self.deliveries.labels("retried").inc()
        else:  # an attempt begins
            self._begun[delivery.id] = delivery.attempts
            while len(self._begun) > BEGUN_HELD:  # attempts a stop or a crash never ended
                self._begun.popitem(last=False)


@attrs.define(eq=False)
class RequestMetrics:
    """The app's answers, counted by its ``after_request`` hook; the long-polls open."""

    requests: Counter
    refused: Counter
    #: ``GET /wait/...`` requests being answered now (parked, nearly all of their time).
    long_polls: int = 0

    @classmethod
    def create(cls, registry: CollectorRegistry) -> RequestMetrics:
        return cls(
            Counter(
                "fategen_http_requests",
                "HTTP requests answered, by route (the rule, like /job/<job_id>; "
                "'unmatched' when none matched) and status.",
                ["route", "status"],
                registry=registry,
            ),
            Counter(
                "fategen_requests_refused",
                "Requests refused (answered 4xx or 503), by route and status: 400 malformed, "
                "401 no valid key, 403 not allowed, 404 no such job, 409 too late, 422 "
                "unknown model, 429 a queue or stream limit, 503 shutting down or no backend.",
                ["route", "status"],
                registry=registry,
            ),
        )

    def answered(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()
        if status in REFUSED:
            self.refused.labels(route, str(status)).inc()


class ServiceCollector(Collector):
    """The values read at scrape time, each O(1) or O(backends) / O(models)."""

    def __init__(
        self,
        desk: Frontdesk,
        tracker: QueueTracker,
        requests: RequestMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.desk = desk
        self.tracker = tracker
        self.requests = requests
        self.clock = clock

    def describe(self) -> Iterable[Metric]:
        return ()  # no check for duplicate names at registration (nor a scrape for it)

    def collect(self) -> Iterable[Metric]:
        desk, store = self.desk, self.desk.store
        yield InfoMetricFamily("fategen", "The fategen version.", value={"version": __version__})
        queued = GaugeMetricFamily(
            "fategen_jobs_queued", "Jobs waiting in the queue, by model.", labels=["model"]
        )
        by_model = self.tracker.by_model()
        for model in sorted({*desk.config.models, *by_model}):
            queued.add_metric([model], by_model.get(model, 0))
        yield queued
        yield GaugeMetricFamily(
            "fategen_jobs_processing",
            "Jobs started and not finished (on ComfyUI, or having their images made).",
            value=store.count_processing(),
        )
        oldest = self.tracker.oldest_created()
        yield GaugeMetricFamily(
            "fategen_queue_oldest_age_seconds",
            "Seconds since the oldest queued job was submitted (0 with none queued).",
            value=0.0 if oldest is None else max(0.0, self.clock() - oldest),
        )
        yield GaugeMetricFamily(
            "fategen_event_streams_open",
            "Server-Sent Event streams open now (/events, /job/<job_id>/events).",
            value=desk.open_streams,
        )
        yield GaugeMetricFamily(
            "fategen_long_polls_open",
            "Long-polls (/wait/<job_id>) being answered now.",
            value=self.requests.long_polls,
        )
        yield GaugeMetricFamily(
            "fategen_comfyui_reachable",
            "1 while some ComfyUI backend can be reached.",
            value=1 if desk.health.available else 0,
        )
        yield GaugeMetricFamily(
            "fategen_queue_paused",
            "1 while an operator holds the queue (POST /queue/pause): nothing is dispatched.",
            value=int(desk.scheduler.held_back),
        )
        yield GaugeMetricFamily(
            "fategen_stopping", "1 once the service is shutting down.", value=int(desk.stopping)
        )
        yield from self._backends()

    def _backends(self) -> Iterable[Metric]:
        views = self.desk.fleet.views() if self.desk.fleet is not None else []
        up = GaugeMetricFamily(
            "fategen_backend_up",
            "1 while the backend takes jobs (connected, checked, not drained).",
            labels=["backend"],
        )
        states = GaugeMetricFamily(
            "fategen_backend_state",
            "1 for the state the backend is in (connecting, up, reconnecting, down, "
            "draining, drained), 0 for the others.",
            labels=["backend", "state"],
        )
        info = InfoMetricFamily(
            "fategen_backend",
            "The checkpoint the backend last ran ('' when none is loaded).",
            labels=["backend", "loaded_checkpoint"],
        )
        running = GaugeMetricFamily(
            "fategen_backend_jobs_running",
            "Jobs executing on the backend now.",
            labels=["backend"],
        )
        comfy_queue = GaugeMetricFamily(
            "fategen_backend_comfyui_queue",
            "Prompts in the backend's own ComfyUI queue, as it last said (absent: unknown).",
            labels=["backend"],
        )
        done = CounterMetricFamily(
            "fategen_backend_jobs_done", "Jobs the backend ran to the end.", labels=["backend"]
        )
        lost = CounterMetricFamily(
            "fategen_backend_jobs_lost",
            "Jobs the backend lost while running them (it died, or went away).",
            labels=["backend"],
        )
        loads = CounterMetricFamily(
            "fategen_backend_model_loads",
            "Checkpoint loads on the backend (a job of another checkpoint than the loaded one).",
            labels=["backend"],
        )
        for view in views:
            name = view.name
            up.add_metric([name], 1 if view.state == "up" else 0)
            for each in BACKEND_STATES:
                states.add_metric([name, each], 1 if view.state == each else 0)
            info.add_metric([name, view.loaded_checkpoint or ""], {})
            running.add_metric([name], len(view.running))
            if view.comfy_queue is not None:
                comfy_queue.add_metric([name], view.comfy_queue)
            done.add_metric([name], view.jobs_done)
            lost.add_metric([name], view.jobs_lost)
            loads.add_metric([name], view.model_loads)
        yield from (up, states, info, running, comfy_queue, done, lost, loads)


@attrs.define(eq=False)
class Metrics:
    """An app's registry and what feeds it."""

    registry: CollectorRegistry
    tracker: QueueTracker
    jobs: JobMetrics
    requests: RequestMetrics

    @classmethod
    def create(cls, desk: Frontdesk) -> Metrics:
        """A registry for one service, subscribed to its store's observers."""
        registry = CollectorRegistry()
        tracker = QueueTracker(desk.store)
        jobs = JobMetrics(registry, tracker)
        jobs.subscribe(desk.store)
        requests = RequestMetrics.create(registry)
        registry.register(ServiceCollector(desk, tracker, requests))
        return cls(registry, tracker, jobs, requests)


def install(app: QuartTrio) -> Metrics:
    """Serve ``/metrics`` on ``app`` (made by ``create_app``, its routes registered): a
    registry of its own, the answers counted, the long-polls counted open."""
    api = app.extensions[EXTENSION]
    assert isinstance(api, ApiState)
    metrics = app.extensions[METRICS] = Metrics.create(api.desk)
    app.register_blueprint(blueprint)
    app.after_request(_count_answer)
    wait = app.view_functions.get(WAIT_ENDPOINT)
    if wait is None:
        log.warning("metrics: no %s route; long-polls are not counted", WAIT_ENDPOINT)
    else:
        app.view_functions[WAIT_ENDPOINT] = _counted_open(wait, metrics.requests)
    return metrics


def _counted_open(view: Callable[..., Any], counts: RequestMetrics) -> Callable[..., Any]:
    """``view``, counted in `RequestMetrics.long_polls` while it answers (also when the
    client goes away: its handler is cancelled, and ``finally`` runs)."""

    @functools.wraps(view)
    async def counted(**kwargs: Any) -> Any:
        counts.long_polls += 1
        try:
            return await view(**kwargs)
        finally:
            counts.long_polls -= 1

    return counted


def app_metrics() -> Metrics:
    """The `Metrics` of the app answering the current request."""
    found = current_app.extensions[METRICS]
    assert isinstance(found, Metrics)
    return found


async def _count_answer(response: Response) -> Response:
    """An ``after_request`` hook: every answer counted by route and status."""
    rule = request.url_rule
    app_metrics().requests.answered(
        rule.rule if rule is not None else "unmatched", response.status_code
    )
    return response


@blueprint.get("/metrics")
@hide  # for Prometheus, not bots: the README tells operators
async def scrape() -> Response:
    """The metrics in Prometheus' text format, or OpenMetrics when ``Accept`` asks for it."""
    if state().keys:
        who = caller()
        if who is None:  # `auth.authenticate` answers first; in case it is not installed
            return error("an admin key is required (Authorization: Bearer <key>)", 401)
        if not who.admin:
            return error("the metrics need an admin key", 403)
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encoder(app_metrics().registry), status=200, content_type=content_type)
