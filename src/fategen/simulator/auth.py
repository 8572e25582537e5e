"""The optional bearer token a reverse proxy in front of a real ComfyUI would check."""

from __future__ import annotations

import hmac


def authorized(header: str | None, token: str | None) -> bool:
    """Whether a request whose ``Authorization`` header is ``header`` may pass.

    Args:
        header: the request's ``Authorization`` header, None if it has none.
        token: the token required (``SimulatorKnobs.required_token``); None lets everything in.

    Returns:
        True when no token is required or the header is ``Bearer <token>`` (scheme in any case).
    """
    if token is None:
        return True
    if header is None:
        return False
    scheme, _, credentials = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode(), token.encode()
    )
