"""Logging set-up: one line per event, as text (default) or as JSON (``LOG_FORMAT=json``).

The standard library does it: a small `logging.Formatter` is all JSON lines need, and every
logger in the process (hypercorn's, httpx's, ours) goes through it unchanged; structlog would
add a dependency and a second API for the same lines. Fields a call site passes with
``extra=`` (`FIELDS`: the job id, nick, key, event, the HTTP fields of an access line) become
JSON fields of their own.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

#: ``extra=`` names that become fields of a JSON line.
FIELDS = ("job_id", "nick", "key", "event", "http", "reason", "model")

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the known
    ``extra`` fields, and the traceback (``exc``) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str = "text") -> None:
    """One format for every logger; httpx's line per ComfyUI request only at DEBUG."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if level != "DEBUG":
        logging.getLogger("httpx").setLevel(logging.WARNING)
