"""GET /metrics over real sockets: jobs counted by outcome and timed, the queue's depth by
model and its oldest job's age (also for jobs loaded from disk after a restart), long-polls
and event streams open, refused requests by route and status, webhook outcomes, OpenMetrics
when asked for, the admin key when keys are on; and a scrape that never goes over the jobs."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from conftest import Receiver, Stack, open_stack
from fategen import __version__
from fategen.api.metrics import METRICS, JobMetrics, Metrics, QueueTracker
from fategen.core.prompt import GenerationRequest
from fategen.core.webhooks import DeliveryState
from fategen.simulator import SimulatorKnobs
from fategen.store.jobs import Job, JobStatus, JobStore
from fategen.store.sqlite import JobDB

TINY = "-m tiny -w 256 -h 256"
ADMIN = "ops:" + "o" * 24
USER = "bot:" + "u" * 24
AS_ADMIN = {"Authorization": f"Bearer {ADMIN.partition(':')[2]}"}
AS_USER = {"Authorization": f"Bearer {USER.partition(':')[2]}"}


def slow(step: float = 0.2) -> SimulatorKnobs:
    """A simulator slow enough for jobs to wait (tests speed it up live to drain)."""
    return SimulatorKnobs(step_seconds=step, model_load_seconds=0.01)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str, *, openmetrics: bool = False) -> Samples:
    """Every sample of an exposition, by name and labels."""
    parse = openmetrics_families if openmetrics else text_string_to_metric_families
    return {(s.name, frozenset(s.labels.items())): s.value for f in parse(text) for s in f.samples}


def value(found: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when it is not there: a counter not yet counted)."""
    return found.get((name, frozenset(labels.items())), 0.0)


def matching(found: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in found.items() if n == name}


async def scrape(client: httpx.AsyncClient, **headers: str) -> Samples:
    r = await client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(r.text)


def metrics_of(stack: Stack) -> Metrics:
    found = stack.running.service.app.extensions[METRICS]
    assert isinstance(found, Metrics)
    return found


def collected(stack: Stack) -> Samples:
    """The exposition made in this task, with no await (for exact comparisons with the
    store at the same moment)."""
    return samples(generate_latest(metrics_of(stack).registry).decode())


def queued_by_scan(store: JobStore) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in store.active_jobs():
        if job.status is JobStatus.QUEUED:
            counts[job.model] = counts.get(job.model, 0) + 1
    return counts


def check_against_a_scan(stack: Stack) -> Samples:
    """The queue's gauges agree with a scan of the store, made at the same moment."""
    store = stack.running.store
    found = collected(stack)
    scanned = queued_by_scan(store)
    gauges = {dict(k)["model"]: v for k, v in matching(found, "fategen_jobs_queued").items()}
    assert {m: n for m, n in gauges.items() if n} == scanned
    assert sum(gauges.values()) == store.count_queued()
    assert value(found, "fategen_jobs_processing") == store.count_processing()
    created = [j.created for j in store.active_jobs() if j.status is JobStatus.QUEUED]
    age = value(found, "fategen_queue_oldest_age_seconds")
    if created:
        assert age == pytest.approx(time.time() - min(created), abs=0.5)
    else:
        assert age == 0
    return found


async def wait_for(
    client: httpx.AsyncClient, done: Callable[[Samples], bool], **headers: str
) -> Samples:
    """Scrape until ``done`` holds (wrap it in a timeout)."""
    while True:
        found = await scrape(client, **headers)
        if done(found):
            return found
        await trio.sleep(0.02)


async def test_jobs_are_counted_by_outcome_and_timed(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        with trio.fail_after(60):
            for i in range(3):
                await stack.wait((await stack.submit(f"fine {i} {TINY}"))["job_id"])
            stack.sim.knobs.execution_error = 2
            for i in range(2):
                failed = await stack.wait((await stack.submit(f"broken {i} {TINY}"))["job_id"])
                assert failed["status"] == "failed"
            found = await scrape(stack.client)
            stack.running.service.scheduler.hold(True)
            paused = await scrape(stack.client)
    assert (value(found, "fategen_queue_paused"), value(paused, "fategen_queue_paused")) == (0, 1)
    assert value(found, "fategen_jobs_submitted_total", model="tiny") == 5
    finished = "fategen_jobs_finished_total"
    assert value(found, finished, status="completed", model="tiny") == 3
    assert value(found, finished, status="failed", model="tiny") == 2
    assert value(found, finished, status="cancelled", model="tiny") == 0
    # Every job started once; only the completed ones are timed on ComfyUI and after.
    backend = stack.running.service.backend.name
    by = {"model": "tiny", "backend": backend}
    assert value(found, "fategen_queue_wait_seconds_count", **by) == 5
    assert value(found, "fategen_queue_wait_seconds_bucket", le="+Inf", **by) == 5
    assert value(found, "fategen_run_seconds_count", **by) == 3
    assert 0 < value(found, "fategen_run_seconds_sum", **by) < 30
    assert value(found, "fategen_postprocess_seconds_count") == 3
    assert value(found, "fategen_jobs_queued", model="tiny") == 0
    assert value(found, "fategen_jobs_queued", model="lumina2") == 0  # every model shown
    assert value(found, "fategen_jobs_processing") == 0
    assert value(found, "fategen_queue_oldest_age_seconds") == 0
    assert value(found, "fategen_http_requests_total", route="/request", status="200") == 5
    assert value(found, "fategen_http_requests_total", route="/wait/<job_id>", status="200") == 5
    # The fleet, read at the scrape.
    assert value(found, "fategen_backend_up", backend=backend) == 1
    assert value(found, "fategen_backend_state", backend=backend, state="up") == 1
    assert value(found, "fategen_backend_state", backend=backend, state="down") == 0
    assert value(found, "fategen_backend_jobs_done_total", backend=backend) >= 3
    assert value(found, "fategen_backend_jobs_lost_total", backend=backend) == 0
    assert value(found, "fategen_backend_model_loads_total", backend=backend) == 1
    info = matching(found, "fategen_backend_info")
    assert [dict(k)["loaded_checkpoint"] for k in info] == ["tiny-sd15-random.safetensors"]
    assert value(found, "fategen_comfyui_reachable") == 1
    assert value(found, "fategen_info", version=__version__) == 1


async def test_queue_depth_age_long_polls_and_streams_while_jobs_wait(tmp_path: Path) -> None:
    async with open_stack(tmp_path, slow()) as stack:
        with trio.fail_after(60):
            started = time.time()
            ids = [(await stack.submit(f"slow {i} {TINY}"))["job_id"] for i in range(4)]
            ids += [
                (await stack.submit(f"other {i} -m lumina2 -w 256 -h 256"))["job_id"]
                for i in range(2)
            ]
            found = check_against_a_scan(stack)
            assert sum(matching(found, "fategen_jobs_queued").values()) >= 3
            over_http = await scrape(stack.client)
            assert value(over_http, "fategen_jobs_queued", model="lumina2") == 2
            assert 0 < value(over_http, "fategen_queue_oldest_age_seconds") <= time.time() - started

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stack.client.get, f"/wait/{ids[-1]}")
                found = await wait_for(
                    stack.client, lambda f: value(f, "fategen_long_polls_open") == 1
                )
                async with stack.client.stream("GET", f"/job/{ids[-1]}/events") as events:
                    assert events.status_code == 200
                    found = await scrape(stack.client)
                    assert value(found, "fategen_event_streams_open") == 1
                # The queue drains; the gauges follow each move, checked against a scan.
                stack.sim.knobs.step_seconds = 0.01
                while stack.running.store.active:
                    check_against_a_scan(stack)
                    await trio.sleep(0.05)
            found = await wait_for(
                stack.client, lambda f: value(f, "fategen_event_streams_open") == 0
            )
    assert value(found, "fategen_long_polls_open") == 0  # answered: counted closed
    assert sum(matching(found, "fategen_jobs_queued").values()) == 0
    assert value(found, "fategen_queue_oldest_age_seconds") == 0
    assert value(found, "fategen_jobs_finished_total", status="completed", model="tiny") == 4


async def test_a_long_poll_given_up_by_its_client_is_counted_closed(tmp_path: Path) -> None:
    async with open_stack(tmp_path, slow(0.5)) as stack:
        with trio.fail_after(30):
            job_id = (await stack.submit(f"slow {TINY}"))["job_id"]
            async with httpx.AsyncClient(base_url=stack.url) as waiter, trio.open_nursery() as n:
                n.start_soon(waiter.get, f"/wait/{job_id}")
                await wait_for(stack.client, lambda f: value(f, "fategen_long_polls_open") == 1)
                n.cancel_scope.cancel()  # the client goes away (its connection closes)
            await wait_for(stack.client, lambda f: value(f, "fategen_long_polls_open") == 0)
            job = stack.running.store.held(job_id)
            assert job is not None and not job.ended()  # closed by the client, not answered
            await stack.wait(job_id)


async def test_jobs_queued_on_disk_are_counted_after_a_restart(tmp_path: Path) -> None:
    """Jobs loaded at start come in without a transition: the metrics still count them."""
    with trio.fail_after(60):
        async with open_stack(tmp_path) as stack:
            stack.running.service.scheduler.pause()  # hand out nothing: all stay queued
            first = time.time()
            for i in range(3):
                await stack.submit(f"kept {i} {TINY}")
            for i in range(2):
                await stack.submit(f"kept {i} -m lumina2 -w 256 -h 256", "bob")
            found = await scrape(stack.client)
            assert value(found, "fategen_jobs_queued", model="tiny") == 3
            assert value(found, "fategen_jobs_queued", model="lumina2") == 2
        restarted = time.time()
        async with open_stack(tmp_path, slow(0.5)) as stack:
            store = stack.running.store
            # Some may have started already (a transition before the first scrape).
            found = check_against_a_scan(stack)
            assert sum(matching(found, "fategen_jobs_queued").values()) >= 3
            assert value(found, "fategen_queue_oldest_age_seconds") >= restarted - first
            over_http = await scrape(stack.client)
            assert value(over_http, "fategen_jobs_queued", model="lumina2") >= 1  # of 2
            assert sum(matching(over_http, "fategen_jobs_queued").values()) >= 3
            stack.sim.knobs.step_seconds = 0.01
            # Counters are this process's: nothing was submitted since it started.
            assert value(over_http, "fategen_jobs_submitted_total", model="tiny") == 0
            while store.active:
                check_against_a_scan(stack)
                await trio.sleep(0.05)
            found = await scrape(stack.client)
    assert value(found, "fategen_jobs_finished_total", status="completed", model="tiny") == 3
    assert value(found, "fategen_queue_oldest_age_seconds") == 0


def _job(model: str = "tiny") -> Job:
    request = GenerationRequest(
        prompt="p", negative="", model=model, width=256, height=256, count=1, seed=1
    )
    return Job(id=Job.new_id(), nick="alice", message="p", request=request)


@pytest.mark.parametrize("first", ["scrape", "transition"])
async def test_the_tracker_takes_the_jobs_loaded_before_its_first_use(
    tmp_path: Path, first: str
) -> None:
    path = tmp_path / "jobs.sqlite3"
    db = JobDB(path)
    store = JobStore(db)
    jobs = [_job(), _job(), _job("lumina2")]
    for job in jobs:
        await store.add(job)
    db.close()
    # As the service does: the metrics subscribe when the app is made, before the load.
    db = JobDB(path)
    store = JobStore(db)
    tracker = QueueTracker(store)
    JobMetrics(CollectorRegistry(), tracker).subscribe(store)
    await store.load()
    if first == "transition":
        loaded = store.held(jobs[0].id)
        assert loaded is not None
        await store.update(loaded, status=JobStatus.PROCESSING, started=time.time())
        assert dict(tracker.by_model()) == {"tiny": 1, "lumina2": 1}
        assert tracker.oldest_created() == jobs[1].created
    else:
        assert dict(tracker.by_model()) == {"tiny": 2, "lumina2": 1}
        assert tracker.oldest_created() == jobs[0].created
    db.close()


async def test_a_job_started_again_after_a_loss_waited_once() -> None:
    store = JobStore(JobDB(None))
    registry = CollectorRegistry()
    JobMetrics(registry, QueueTracker(store)).subscribe(store)
    job = _job()
    job.created = time.time() - 3
    await store.add(job)
    first = time.time()
    await store.update(
        job, status=JobStatus.PROCESSING, started=first, first_started=first, backend="a"
    )
    await store.update(job, status=JobStatus.QUEUED, started=None, losses=1)  # lost
    again = first + 10
    await store.update(
        job, status=JobStatus.PROCESSING, started=again, first_started=first, backend="b"
    )
    await store.update(job, generated=again + 2)
    await store.update(job, status=JobStatus.COMPLETED, finished=again + 2.5)
    found = samples(generate_latest(registry).decode())
    assert value(found, "fategen_queue_wait_seconds_count", model="tiny", backend="a") == 1
    assert value(found, "fategen_queue_wait_seconds_sum", model="tiny", backend="a") >= 3
    assert value(found, "fategen_queue_wait_seconds_count", model="tiny", backend="b") == 0
    assert value(found, "fategen_jobs_requeued_total", model="tiny") == 1
    assert value(found, "fategen_run_seconds_sum", model="tiny", backend="b") == 2
    assert value(found, "fategen_postprocess_seconds_sum") == 0.5
    assert value(found, "fategen_jobs_finished_total", status="completed", model="tiny") == 1


def _delivery(state: str, attempts: int, error: str | None = None) -> DeliveryState:
    return DeliveryState(
        id="msg_1",
        job_id="j",
        event="job.completed",
        url="https://example.com/hook",
        state=state,
        attempts=attempts,
        next_at=None,
        last_error=error,
    )


def test_webhook_attempts_are_counted_on_their_outcome_not_when_they_begin() -> None:
    registry = CollectorRegistry()
    store = JobStore(JobDB(None))
    metrics = JobMetrics(registry, QueueTracker(store))
    # Begun (attempts unchanged), then the outcome (one more attempt): three tries.
    for record in [
        _delivery("pending", 0),
        _delivery("pending", 1, "answered 500"),
        _delivery("pending", 1, "answered 500"),
        _delivery("pending", 2, "answered 503"),
        _delivery("pending", 2, "answered 503"),
        _delivery("delivered", 3),
    ]:
        metrics.delivery(record)
    # After a restart, a pending one is first seen as begun; this one is given up.
    metrics.delivery(_delivery("pending", 7, "answered 500"))
    metrics.delivery(_delivery("failed", 8, "answered 500"))
    found = samples(generate_latest(registry).decode())
    name = "fategen_webhook_deliveries_total"
    assert value(found, name, outcome="retried") == 2
    assert value(found, name, outcome="delivered") == 1
    assert value(found, name, outcome="failed") == 1


async def test_webhook_outcomes_over_real_sockets(tmp_path: Path) -> None:
    async with (
        Receiver().running() as receiver,
        open_stack(
            tmp_path,
            FATEGEN_WEBHOOK_SECRET="whsec_" + "A" * 43 + "=",
            FATEGEN_WEBHOOK_ALLOW_PRIVATE="1",
        ) as stack,
    ):
        receiver.statuses = [500]  # the start's first attempt fails; the end's is taken
        r = await stack.client.post(
            "/request",
            json={
                "message": f"a heron {TINY}",
                "nick": "ana",
                "webhook_url": receiver.url,
                "webhook_started": True,
            },
        )
        assert r.status_code == 200, r.text
        with trio.fail_after(30):
            found = await wait_for(
                stack.client,
                lambda f: value(f, "fategen_webhook_deliveries_total", outcome="delivered") == 1,
            )
    assert value(found, "fategen_webhook_deliveries_total", outcome="retried") == 1
    assert value(found, "fategen_webhook_deliveries_total", outcome="failed") == 0


async def test_refused_requests_are_counted_by_route_and_status(tmp_path: Path) -> None:
    async with open_stack(tmp_path, slow(), FATEGEN_MAX_STREAMS="1") as stack:
        with trio.fail_after(30):
            assert (await stack.client.post("/request", json={})).status_code == 400
            r = await stack.client.post("/request", json={"message": "x -m nope", "nick": "a"})
            assert r.status_code == 400, r.text  # an unknown model
            job_id = (await stack.submit(f"held {TINY}"))["job_id"]
            async with stack.client.stream("GET", f"/job/{job_id}/events") as held:
                assert held.status_code == 200
                assert (await stack.client.get(f"/job/{job_id}/events")).status_code == 429
            assert (await stack.client.get("/job/not-a-job")).status_code == 404
            assert (await stack.client.get("/no/such/path")).status_code == 404
            found = await scrape(stack.client)
            await stack.wait(job_id)
    refused = "fategen_requests_refused_total"
    assert value(found, refused, route="/request", status="400") == 2
    assert value(found, refused, route="/job/<job_id>/events", status="429") == 1
    assert value(found, refused, route="/job/<job_id>", status="404") == 1
    assert value(found, refused, route="unmatched", status="404") == 1
    assert sum(matching(found, refused).values()) == 5
    # Every answer is in the requests' counter; the refused ones by the same labels.
    assert value(found, "fategen_http_requests_total", route="/request", status="200") == 1
    assert value(found, "fategen_http_requests_total", route="unmatched", status="404") == 1


async def test_openmetrics_when_the_scraper_asks_for_it(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        with trio.fail_after(30):
            await stack.wait((await stack.submit(f"a fox {TINY}"))["job_id"])
            accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
            r = await stack.client.get("/metrics", headers={"Accept": accept})
            plain = await stack.client.get("/metrics", headers={"Accept": "text/plain"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert r.text.endswith("# EOF\n")
    found = samples(r.text, openmetrics=True)
    assert value(found, "fategen_jobs_submitted_total", model="tiny") == 1
    assert value(found, "fategen_jobs_finished_total", status="completed", model="tiny") == 1
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# EOF" not in plain.text


async def test_metrics_need_an_admin_key_when_keys_are_on(tmp_path: Path) -> None:
    async with open_stack(tmp_path, FATEGEN_API_KEYS=USER, FATEGEN_ADMIN_KEYS=ADMIN) as stack:
        with trio.fail_after(30):
            r = await stack.client.get("/metrics")
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            r = await stack.client.get("/metrics", headers=AS_USER)
            assert r.status_code == 403 and "admin key" in r.json()["error"]
            found = await scrape(stack.client, **AS_ADMIN)
    refused = "fategen_requests_refused_total"
    assert value(found, refused, route="/metrics", status="401") == 1
    assert value(found, refused, route="/metrics", status="403") == 1


async def test_metrics_are_open_with_keys_off_and_not_in_the_api_document(
    tmp_path: Path,
) -> None:
    async with open_stack(tmp_path) as stack:
        assert (await stack.client.get("/metrics")).status_code == 200
        document = (await stack.client.get("/openapi.json")).json()
    assert "/metrics" not in document["paths"]
    assert "/wait/{job_id}" in document["paths"]  # still documented, though counted


@pytest.fixture
def iterations(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The store's methods that go over jobs, each call made from the metrics module
    recorded (the service's own calls go on as before)."""
    calls: list[str] = []
    for name in ("active_jobs", "held_jobs", "queued", "processing", "last_served"):
        original = getattr(JobStore, name)

        def recording(
            self: JobStore, *args: Any, _name: str = name, _original: Any = original
        ) -> Any:
            caller = inspect.currentframe()
            assert caller is not None and caller.f_back is not None
            if caller.f_back.f_globals.get("__name__") == "fategen.api.metrics":
                calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(JobStore, name, recording)
    yield calls


async def test_a_scrape_never_goes_over_the_jobs(tmp_path: Path, iterations: list[str]) -> None:
    async with open_stack(tmp_path, slow(0.05)) as stack:
        with trio.fail_after(60):
            ids = [(await stack.submit(f"job {i} {TINY}", f"n{i}"))["job_id"] for i in range(5)]
            for _ in range(20):
                await scrape(stack.client)
            for job_id in ids:
                await stack.wait(job_id)
            for _ in range(5):
                await scrape(stack.client)
    # Once: the jobs held at the first use (those loaded from disk); never again.
    assert iterations == ["active_jobs"]
