"""The service as an ASGI app, for a plain hypercorn deployment::

    hypercorn --worker-class trio --bind 127.0.0.1:8000 'fategen.asgi:create_app()'

Settings come from the environment (and ``.env``) when hypercorn calls the factory. The actors run
in the app's lifespan, in quart-trio's nursery. Use one worker process (``--workers 1``, the
default): the queue lives in one process. Note that with ``--workers 0`` hypercorn exits at once
on SIGTERM, with no lifespan shutdown; and that under plain hypercorn long-polls are answered
only once hypercorn's graceful timeout has passed (``fategen serve`` answers them at once).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from pathlib import Path

import trio
from quart_trio import QuartTrio

from fategen.logs import configure_logging
from fategen.service import build_service, prepare_process_for_hypercorn
from fategen.settings import Settings


def create_app(settings: Settings | None = None) -> QuartTrio:
    """Build the service and return its app; the actors start with the app's lifespan."""
    if settings is None:
        settings = Settings.from_env(dotenv=Path(".env"))
        configure_logging(settings.log_level, settings.log_format)
    prepare_process_for_hypercorn()
    service = build_service(settings)
    app = service.app
    # quart-trio cancels its nursery this long after shutdown starts: leave the grace period.
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = settings.shutdown_grace + 5

    @app.while_serving
    async def lifespan() -> AsyncGenerator[None, None]:
        shutdown = trio.Event()
        await app.nursery.start(service.run_actors, shutdown)
        yield
        shutdown.set()
        await service.stopped.wait()

    return app
