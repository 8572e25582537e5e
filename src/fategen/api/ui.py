"""The operator's page, ``GET /ui``: the queue, the running jobs, recent results, failures
with Retry, Pause/Resume, the backends and a few live figures, updated from ``GET /events``.

Three static files in ``fategen/api/ui/`` (HTML, plain JavaScript, CSS: no build step,
nothing from a CDN). The files hold no data, so a browser loads them without a key, also
with keys on; every API call the page makes carries the admin key the operator types in.
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response, request, send_from_directory
from quart_schema import hide

from fategen.api.frontdesk import Refused

blueprint = Blueprint("ui", __name__)

FOLDER = Path(__file__).with_name("ui")
#: The page's files by URL path; anything else under /ui/ is a 404.
FILES = {"/ui": "index.html", "/ui/": "index.html", "/ui/ui.js": "ui.js", "/ui/ui.css": "ui.css"}
#: What the page may do: its own scripts and styles, the API, blob: URLs of fetched images.
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' blob:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


@blueprint.get("/ui")
@blueprint.get("/ui/")
@blueprint.get("/ui/<name>")
@hide
async def page(name: str | None = None) -> Response:
    """The page, or one of its files."""
    filename = FILES.get(request.path)
    if filename is None:
        raise Refused("there is no such file of the page", 404)
    response = await send_from_directory(FOLDER, filename)
    response.headers["Cache-Control"] = "no-cache"  # revalidated: an upgrade shows at once
    response.headers["Content-Security-Policy"] = POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
