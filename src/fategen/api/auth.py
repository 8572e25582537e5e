"""Bearer API keys: with any key configured, every path but `OPEN_PATHS` needs one."""

from __future__ import annotations

import hmac

from quart import Response, request

from fategen.api.common import error, state

#: Paths anyone may read: the health check and the API documentation.
OPEN_PATHS = ("/health", "/ready", "/docs", "/redoc", "/openapi.json")


def key_of_request() -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if there is one."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def matches(token: str | None, keys: frozenset[str]) -> bool:
    """Whether ``token`` is one of ``keys``, compared with every key in constant time."""
    if token is None:
        return False
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def key_label() -> str:
    """Which kind of key the request carries, for the logs: ``admin``, ``user`` or ``-``."""
    token = key_of_request()
    settings = state().settings
    if matches(token, settings.admin_keys):
        return "admin"
    if matches(token, settings.api_keys):
        return "user"
    return "-"


def is_admin() -> bool:
    """Whether the current request carries an admin key."""
    return matches(key_of_request(), state().settings.admin_keys)


def may_see_details() -> bool:
    """Whether the caller may see internals (ComfyUI's address, errors): with keys on, any
    valid key; with keys off, a caller on this machine."""
    if state().all_keys:
        return matches(key_of_request(), state().all_keys)
    return (request.remote_addr or "") in ("127.0.0.1", "::1", "localhost")


async def authenticate() -> Response | None:
    """A ``before_request`` hook: 401 unless the request may go on."""
    all_keys = state().all_keys
    if not all_keys or request.path in OPEN_PATHS:
        return None
    if not matches(key_of_request(), all_keys):
        return error(
            "a valid API key is required (Authorization: Bearer <key>)",
            401,
            WWW_Authenticate="Bearer",
        )
    return None
