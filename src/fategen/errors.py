"""The error tree. Every error carries the one sentence a user should read: ``str(err)``."""

from __future__ import annotations


class FategenError(Exception):
    """Base of every error fategen raises on purpose; ``str()`` is a sentence a bot can relay."""


class ConfigError(FategenError):
    """The settings or the model configuration are invalid (start-up stops)."""


class PromptError(FategenError):
    """A user's chat line cannot become a generation request."""


class WorkflowError(FategenError):
    """A workflow template is broken, or cannot take what a request needs."""


class ComfyError(FategenError):
    """ComfyUI refused or failed a prompt (node errors, execution errors, interrupts)."""


class ComfyUnavailable(FategenError):
    """ComfyUI cannot be reached right now."""


class JobTimeout(FategenError):
    """A job stalled or ran past its time limit."""


class ImageError(FategenError):
    """The result images could not be read, combined or written."""


class InputImageError(FategenError):
    """An input image that cannot be used (not fetched, too large, not an image); ``str()``
    is one line for the user."""
