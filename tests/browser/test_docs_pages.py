"""The API documentation pages in a real headless Chromium (Debian's, driven by Playwright),
with every request off this machine refused: both pages must render the operations from
fategen's own assets. Run by ``nox -s browser`` (CI installs Chromium with apt-get)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import trio
from playwright.sync_api import Route, sync_playwright

from conftest import CHROMIUM, FLAGS, Stack

OPERATIONS = ["/request", "/job/{job_id}", "/wait/{job_id}", "/models", "/health", "/ready"]


def render(url: str, shots: Path) -> dict[str, object]:
    """Open /docs and /redoc; what each shows, and every request that left the machine."""
    outside: list[str] = []
    seen: dict[str, object] = {}

    def guard(route: Route) -> None:
        host = urlparse(route.request.url).hostname
        if host in ("127.0.0.1", "localhost") or route.request.url.startswith("data:"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()  # the network is off for this page

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route("**/*", guard)
            page.goto(f"{url}/docs")
            page.wait_for_selector(".opblock", timeout=20_000)
            seen["swagger"] = page.locator(".opblock-summary-path").all_inner_texts()
            page.screenshot(path=str(shots / "docs.png"))
            page.goto(f"{url}/redoc")
            page.wait_for_selector("[role=menuitem], .menu-content li", timeout=20_000)
            page.wait_for_timeout(500)
            seen["redoc"] = page.inner_text("body")
            page.screenshot(path=str(shots / "redoc.png"))
        finally:
            browser.close()
    seen["outside"] = outside
    return seen


async def test_docs_pages_render_offline(stack: Stack, tmp_path: Path) -> None:
    with trio.fail_after(90):
        seen = await trio.to_thread.run_sync(render, stack.url, tmp_path)
    # Nothing the pages need comes from outside: ReDoc's bundle only asks for its own
    # "API docs by Redocly" logo, which stays blank with the network off.
    assert set(seen["outside"]) <= {"https://cdn.redoc.ly/redoc/logo-mini.svg"}, seen  # type: ignore[arg-type]
    swagger = [p.replace("\u200b", "") for p in seen["swagger"]]  # type: ignore[attr-defined]
    for path in OPERATIONS:
        assert path in swagger, (path, swagger)
    redoc = str(seen["redoc"])
    assert "Queue a chat line as an image job" in redoc
    assert "/request" in redoc
    assert (tmp_path / "docs.png").stat().st_size > 10_000
