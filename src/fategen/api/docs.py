"""The API documentation's own assets: Swagger UI (``/docs``) and ReDoc (``/redoc``) load
their JavaScript and CSS from fategen, not from a CDN, so the pages work on a box without
internet. The files come from two packages that ship them (``swagger-ui-bundle-v2`` with
Swagger UI 5, ``openapi-ui-bundles`` with ReDoc)."""

from __future__ import annotations

from pathlib import Path

import openapi_ui_bundles.redoc
import swagger_ui_bundle
from quart import Blueprint, Response, send_from_directory
from quart_schema import hide

from fategen.api.frontdesk import Refused

blueprint = Blueprint("docs", __name__)

SWAGGER = Path(str(swagger_ui_bundle.swagger_ui_path))
REDOC = Path(openapi_ui_bundles.redoc.static_path)
#: The assets the pages use, by URL path (anything else is a 404).
ASSETS = {
    "swagger-ui-bundle.js": SWAGGER,
    "swagger-ui.css": SWAGGER,
    "redoc.standalone.js": REDOC,
}
PREFIX = "/docs/assets/"
#: What quart-schema's pages load, pointed at the routes here.
CONFIG = {
    "QUART_SCHEMA_SWAGGER_JS_URL": PREFIX + "swagger-ui-bundle.js",
    "QUART_SCHEMA_SWAGGER_CSS_URL": PREFIX + "swagger-ui.css",
    "QUART_SCHEMA_REDOC_JS_URL": PREFIX + "redoc.standalone.js",
}
#: A week: the files change only with an upgrade of their package.
MAX_AGE = 7 * 86400


@blueprint.get("/docs/assets/<name>")
@hide
async def asset(name: str) -> Response:
    folder = ASSETS.get(name)
    if folder is None:
        raise Refused("there is no such documentation file", 404)
    response = await send_from_directory(folder, name)
    response.cache_control.max_age = MAX_AGE
    response.cache_control.public = True
    return response
