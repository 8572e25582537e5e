"""The operator's page (``GET /ui``) in a real headless Chromium (Debian's, driven by
Playwright) against the real service and simulator over real sockets, with every request off
this machine refused. Playwright's sync API runs in a worker thread; it reaches the service's
API (submits) back on the trio loop with ``trio.from_thread.run``. Run by ``nox -s browser``.
Screenshots go to each test's ``tmp_path``, as in test_docs_pages.py."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import trio
from playwright.sync_api import Page, Route, expect, sync_playwright

from conftest import CHROMIUM, FLAGS, Stack, open_stack
from fategen.simulator import Simulator, SimulatorKnobs

KEY = "ui-test-admin-key-0123456789abcd"  # 32 characters
BOT_KEY = "ui-test-bot-key-0123456789abcdef"
ENV = {
    "FATEGEN_ADMIN_KEYS": f"boss:{KEY}",
    "FATEGEN_API_KEYS": f"bot:{BOT_KEY}",
    # Chromium and the service share the CPU: a ping answered late must not fail the backend
    # over (its job would leave the page's Running list and run again).
    "FATEGEN_PROBE_TIMEOUT": "5",
}
#: Playwright's waits (ms): generous, the jobs take about three seconds each.
WAIT = 15_000


@contextmanager
def browser_page(url: str) -> Iterator[tuple[Page, list[str]]]:
    """A page on ``url`` with the network cut off but for this machine; yields the page and
    the JavaScript errors it raised (the test asserts there were none)."""
    errors: list[str] = []

    def guard(route: Route) -> None:
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            errors.append(f"left the machine: {route.request.url}")
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route("**/*", guard)
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.goto(f"{url}/ui")
            yield page, errors
        finally:
            browser.close()


def log_in(page: Page, key: str) -> None:
    expect(page.locator("#login")).to_be_visible(timeout=WAIT)
    page.fill("#key", key)
    page.click("#login button[type=submit]")


def job(page: Page, section: str, job_id: str) -> Any:
    return page.locator(f'#{section} [data-job="{job_id}"]')


def submit(stack: Stack, message: str, nick: str = "alice") -> str:
    """From the browser's thread: queue a job through the API (on the trio loop)."""
    body = trio.from_thread.run(functools.partial(stack.submit, message, nick))
    return str(body["job_id"])


def api(stack: Stack, path: str) -> dict[str, Any]:
    """From the browser's thread: ``GET path`` of the API."""
    r = trio.from_thread.run(stack.client.get, path)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def in_browser(stack: Stack, drive: Callable[[Stack, Path], None], shots: Path) -> None:
    """Run ``drive(stack, shots)`` in a worker thread, with the admin key on the API client."""
    stack.client.headers["Authorization"] = f"Bearer {KEY}"
    with trio.fail_after(60):
        await trio.to_thread.run_sync(drive, stack, shots)


# -- the page, offline, logging in, the fleet, a phone --------------------------------------


def login_and_phone(stack: Stack, shots: Path) -> None:
    with browser_page(stack.url) as (page, errors):
        log_in(page, "not-the-key-but-long-enough-000")
        refused = page.locator("#refused")
        expect(refused).to_be_visible(timeout=WAIT)
        expect(refused).to_contain_text("Refused")
        expect(refused).to_contain_text("API key")
        expect(page.locator("#login")).to_be_visible()
        expect(page.locator("#app")).to_be_hidden()
        page.screenshot(path=str(shots / "ui-refused.png"))
        log_in(page, BOT_KEY)  # a valid key, but not an admin's
        expect(refused).to_contain_text("needs an admin key", timeout=WAIT)
        expect(page.locator("#app")).to_be_hidden()

        log_in(page, KEY)
        expect(page.locator("#app")).to_be_visible(timeout=WAIT)
        expect(page.locator("#live")).to_have_text("live", timeout=WAIT)
        # Two backends: the table shows each with its state and loaded checkpoint.
        expect(page.locator("#fleet")).to_be_visible(timeout=WAIT)
        expect(page.locator("#backends tr")).to_have_count(2)
        expect(page.locator('#backends [data-backend="gpu0"]')).to_contain_text("up")
        done = page.locator("#gallery .thumb img[src^='blob:']")
        expect(done).to_have_count(1, timeout=WAIT)
        expect(page.locator("#backends")).to_contain_text("safetensors")
        expect(page.locator("#f-hour")).to_have_text("1")
        page.screenshot(path=str(shots / "ui-desktop.png"), full_page=True)

        # The key stays for the tab: a reload does not ask again.
        page.reload()
        expect(page.locator("#app")).to_be_visible(timeout=WAIT)
        expect(page.locator("#login")).to_be_hidden()

        page.set_viewport_size({"width": 390, "height": 844})
        expect(done).to_have_count(1, timeout=WAIT)
        page.wait_for_timeout(200)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page is {width} px wide on a 390 px phone"
        page.screenshot(path=str(shots / "ui-phone.png"), full_page=True)

        page.click("#logout")
        expect(page.locator("#login")).to_be_visible()
        assert page.evaluate("sessionStorage.length") == 0
        assert not errors, errors


async def test_ui_loads_offline_refuses_a_wrong_key_and_fits_a_phone(tmp_path: Path) -> None:
    sims = [Simulator(SimulatorKnobs(step_seconds=0.002)) for _ in range(2)]
    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(functools.partial(s.serve, port=0)) for s in sims]
        fleet = ",".join(f"gpu{i}=http://127.0.0.1:{port}" for i, port in enumerate(ports))
        async with open_stack(tmp_path, COMFYUI_BACKENDS=fleet, **ENV) as stack:
            # The page's files need no key; the API does.
            async with httpx.AsyncClient(base_url=stack.url) as bare:
                assert (await bare.get("/ui")).status_code == 200
                assert (await bare.get("/ui/ui.js")).status_code == 200
                assert (await bare.get("/queue")).status_code == 401
            stack.client.headers["Authorization"] = f"Bearer {KEY}"  # for the job below
            first = await stack.submit("a lighthouse at night")
            await stack.wait(first["job_id"])
            await in_browser(stack, login_and_phone, tmp_path)
        nursery.cancel_scope.cancel()
    for name in ("ui-refused.png", "ui-desktop.png", "ui-phone.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name


# -- a job from queued to done; pausing the queue ---------------------------------------


def follow_and_pause(stack: Stack, shots: Path) -> None:
    with browser_page(stack.url) as (page, errors):
        log_in(page, KEY)
        expect(page.locator("#live")).to_have_text("live", timeout=WAIT)
        page.evaluate("window.notReloaded = true")

        first = submit(stack, "a red fox in the snow")
        second = submit(stack, "a harbour at dawn", nick="bob")
        # The first runs with live progress while the second waits its turn.
        running = job(page, "running", first)
        expect(running).to_be_visible(timeout=WAIT)
        page.wait_for_function(
            "id => Number(document.querySelector(`#running [data-job='${id}']`)"
            "?.dataset.step) >= 3",
            arg=first,
            timeout=WAIT,
        )
        queued = job(page, "queue", second)
        expect(queued).to_be_visible()
        expect(queued.locator(".position")).to_have_text("1")
        page.screenshot(path=str(shots / "ui-running.png"), full_page=True)

        # Done: its thumbnail, and the full image with what made it.
        thumb = job(page, "gallery", first)
        expect(thumb.locator("img[src^='blob:']")).to_be_visible(timeout=WAIT)
        expect(running).to_have_count(0)
        thumb.click()
        viewer = page.locator("#viewer")
        expect(viewer).to_be_visible()
        seed = api(stack, f"/job/{first}")["seed"]
        expect(viewer.locator("#viewer-facts")).to_contain_text(str(seed))
        expect(viewer.locator("#viewer-facts")).to_contain_text("a red fox in the snow")
        expect(viewer.locator("#viewer-facts")).to_contain_text("illustriousXL")
        page.wait_for_function("document.getElementById('viewer-img').naturalWidth > 0")
        page.screenshot(path=str(shots / "ui-viewer.png"))
        page.keyboard.press("Escape")
        expect(viewer).to_be_hidden()
        expect(job(page, "gallery", second).locator("img[src^='blob:']")).to_be_visible(
            timeout=WAIT
        )

        # Paused: a job submitted now stays queued; it runs after Resume.
        page.click("#pause")
        expect(page.locator("#pause")).to_have_text("Resume", timeout=WAIT)
        expect(page.locator("#paused")).to_be_visible()
        third = submit(stack, "a quiet library")
        held = job(page, "queue", third)
        expect(held).to_be_visible(timeout=WAIT)
        page.wait_for_timeout(1500)
        expect(held).to_be_visible()
        expect(job(page, "running", third)).to_have_count(0)
        assert api(stack, f"/job/{third}")["status"] == "queued"
        page.screenshot(path=str(shots / "ui-paused.png"), full_page=True)
        page.click("#pause")
        expect(page.locator("#pause")).to_have_text("Pause", timeout=WAIT)
        expect(page.locator("#paused")).to_be_hidden()
        expect(job(page, "running", third)).to_be_visible(timeout=WAIT)
        expect(job(page, "gallery", third).locator("img[src^='blob:']")).to_be_visible(timeout=WAIT)

        # A follow-up says what it started from.
        varied = submit(stack, f"--vary {first}:1")
        thumb = job(page, "gallery", varied)
        expect(thumb.locator("img[src^='blob:']")).to_be_visible(timeout=WAIT)
        thumb.click()
        expect(viewer).to_be_visible()
        facts = viewer.locator("#viewer-facts")
        expect(facts).to_contain_text(f"image 1 of job {first[:8]}, strength 0.45")
        page.keyboard.press("Escape")
        assert page.evaluate("window.notReloaded") is True
        assert not errors, errors


async def test_ui_follows_a_job_to_its_image_and_pauses_the_queue(tmp_path: Path) -> None:
    async with open_stack(tmp_path, SimulatorKnobs(step_seconds=0.1), **ENV) as stack:
        await in_browser(stack, follow_and_pause, tmp_path)
        assert len(stack.sim.executions) == 4


# -- a failed job, retried ------------------------------------------------------------------


def retry_a_failure(stack: Stack, shots: Path) -> None:
    with browser_page(stack.url) as (page, errors):
        log_in(page, KEY)
        expect(page.locator("#live")).to_have_text("live", timeout=WAIT)
        broken = submit(stack, "a castle made of glass")
        failure = job(page, "failed", broken)
        expect(failure).to_be_visible(timeout=WAIT)
        expect(failure.locator(".error")).not_to_be_empty()
        page.screenshot(path=str(shots / "ui-failed.png"), full_page=True)

        failure.get_by_role("button", name="Retry").click()
        expect(page.locator("#notice")).to_contain_text("Retried as job", timeout=WAIT)
        again = page.locator("#notice").inner_text().removeprefix("Retried as job ").rstrip(".")
        expect(job(page, "gallery", again).locator("img[src^='blob:']")).to_be_visible(timeout=WAIT)
        expect(failure.get_by_role("button")).to_have_text("Retried")
        expect(failure.get_by_role("button")).to_be_disabled()
        retried = api(stack, f"/job/{again}")
        assert retried["retry_of"] == broken
        assert retried["status"] == "completed"
        assert not errors, errors


async def test_ui_retries_a_failed_job(tmp_path: Path) -> None:
    async with open_stack(tmp_path, SimulatorKnobs(step_seconds=0.02), **ENV) as stack:
        stack.sim.knobs.execution_error = 1
        await in_browser(stack, retry_a_failure, tmp_path)
