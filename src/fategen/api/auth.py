"""Bearer API keys: with any key configured, every path but `OPEN_PATHS` needs one."""

from __future__ import annotations

import hmac
from typing import cast

import attrs
from quart import Response, g, request

from fategen.api.common import error, state

#: Paths anyone may read: the health check and the API documentation.
OPEN_PATHS = (
    "/health",
    "/ready",
    "/docs",
    "/redoc",
    "/openapi.json",
    # The operator's page and its files: a browser cannot add a key to a page load (every
    # call the page makes carries the admin key the operator enters).
    "/ui",
    "/ui/",
    "/ui/ui.js",
    "/ui/ui.css",
)
#: The documentation pages' own JavaScript and CSS.
OPEN_PREFIX = "/docs/assets/"


def key_of_request() -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if there is one."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


@attrs.frozen
class Caller:
    """The key a request carries: its name, and whether it is an admin key."""

    key: str
    admin: bool


def caller() -> Caller | None:
    """The key of the current request, or None (no key, or keys are off). Worked out once
    per request (the check, the routes and the access log all ask); the token is compared
    with every key, in constant time each."""
    if "caller" in g:
        return cast(Caller | None, g.caller)
    token = key_of_request()
    found: Caller | None = None
    if token is not None:
        for secret, name, admin in state().keys:
            if hmac.compare_digest(token.encode(), secret.encode()) and found is None:
                found = Caller(name, admin)
    g.caller = found
    return found


def key_label() -> str:
    """The request's key for the logs: its name (``admin:`` before an admin key's), or ``-``."""
    who = caller()
    if who is None:
        return "-"
    return f"admin:{who.key}" if who.admin else who.key


def may_see_details() -> bool:
    """Whether the caller may see internals (ComfyUI's address, errors): with keys on, any
    valid key; with keys off, a caller on this machine."""
    if state().keys:
        return caller() is not None
    return (request.remote_addr or "") in ("127.0.0.1", "::1", "localhost")


async def authenticate() -> Response | None:
    """A ``before_request`` hook: 401 unless the request may go on."""
    if not state().keys or request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIX):
        return None
    if caller() is None:
        return error(
            "a valid API key is required (Authorization: Bearer <key>)",
            401,
            WWW_Authenticate="Bearer",
        )
    return None
