"""Bearer API keys: with any key configured, every path but `OPEN_PATHS` needs one."""

from __future__ import annotations

import hmac
from typing import cast

import attrs
from quart import Response, g, request

from fategen.api.common import error, state
from fategen.settings import split_key

#: Paths anyone may read: the health check and the API documentation.
OPEN_PATHS = ("/health", "/ready", "/docs", "/redoc", "/openapi.json")
#: The documentation pages' own JavaScript and CSS.
OPEN_PREFIX = "/docs/assets/"


def key_of_request() -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if there is one."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def matches(token: str | None, keys: frozenset[str]) -> bool:
    """Whether ``token`` is one of ``keys``, compared with every key in constant time."""
    return _name_of(token, keys) is not None


def _name_of(token: str | None, keys: frozenset[str]) -> str | None:
    """The name of the key ``token`` is, comparing with every key in constant time."""
    if token is None:
        return None
    found = None
    for entry in keys:
        name, secret = split_key(entry)
        if hmac.compare_digest(token.encode(), secret.encode()):
            found = name
    return found


@attrs.frozen
class Caller:
    """The key a request carries: its name, and whether it is an admin key."""

    key: str
    admin: bool


def caller() -> Caller | None:
    """The key of the current request, or None (no key, or keys are off). Worked out once
    per request (the check, the routes and the access log all ask)."""
    if "caller" in g:
        return cast(Caller | None, g.caller)
    token = key_of_request()
    settings = state().settings
    found: Caller | None = None
    admin = _name_of(token, settings.admin_keys)
    if admin is not None:
        found = Caller(admin, True)
    else:
        user = _name_of(token, settings.api_keys)
        found = None if user is None else Caller(user, False)
    g.caller = found
    return found


def key_label() -> str:
    """The request's key for the logs: its name (``admin:`` before an admin key's), or ``-``."""
    who = caller()
    if who is None:
        return "-"
    return f"admin:{who.key}" if who.admin else who.key


def is_admin() -> bool:
    """Whether the current request carries an admin key."""
    who = caller()
    return who is not None and who.admin


def may_see_details() -> bool:
    """Whether the caller may see internals (ComfyUI's address, errors): with keys on, any
    valid key; with keys off, a caller on this machine."""
    if state().all_keys:
        return caller() is not None
    return (request.remote_addr or "") in ("127.0.0.1", "::1", "localhost")


async def authenticate() -> Response | None:
    """A ``before_request`` hook: 401 unless the request may go on."""
    all_keys = state().all_keys
    if not all_keys or request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIX):
        return None
    if caller() is None:
        return error(
            "a valid API key is required (Authorization: Bearer <key>)",
            401,
            WWW_Authenticate="Bearer",
        )
    return None
