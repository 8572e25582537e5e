"""``fategen serve``: run the service (and, with ``--simulate``, a built-in ComfyUI simulator)."""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
from pathlib import Path

import trio

from fategen.errors import ConfigError
from fategen.settings import Settings

log = logging.getLogger("fategen")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fategen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--host", help="address to listen on (FATEGEN_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (FATEGEN_PORT)")
    serve.add_argument(
        "--simulate",
        action="store_true",
        help="also run the built-in ComfyUI simulator and use it (no GPU needed)",
    )
    serve.add_argument("--env-file", type=Path, default=Path(".env"), help="default: .env")
    return parser


async def _watch_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if shutdown.is_set():
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                raise KeyboardInterrupt
            log.info("%s received: stopping gracefully", signal.Signals(signum).name)
            shutdown.set()


async def serve(settings: Settings, *, simulate: bool) -> None:
    from fategen.service import run_service

    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, shutdown)
        if simulate:
            from fategen.simulator import Simulator

            sim = Simulator()
            sim_port = await nursery.start(functools.partial(sim.serve, host="127.0.0.1", port=0))
            settings = settings.replace(comfyui_address="127.0.0.1", comfyui_port=sim_port)
            log.info("ComfyUI simulator running on 127.0.0.1:%d", sim_port)
        async with trio.open_nursery() as service:
            running = await service.start(run_service, settings, shutdown)
            print(
                f"fategen is ready on {running.url}  (try: curl -s {running.url}/models; "
                f"API docs: {running.url}/docs)",
                flush=True,
            )
        # The service has stopped: stop the signal watcher and the simulator too.
        nursery.cancel_scope.cancel()


def configure_logging(level: str) -> None:
    """One format for every logger; httpx's line per ComfyUI request only at DEBUG."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    if level != "DEBUG":
        logging.getLogger("httpx").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env(dotenv=args.env_file)
        changes: dict[str, object] = {}
        if args.host:
            changes["http_host"] = args.host
        if args.port is not None:
            changes["http_port"] = args.port
        settings = settings.replace(**changes)
    except ConfigError as exc:
        print(f"fategen: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    status = 0
    try:
        trio.run(functools.partial(serve, settings, simulate=args.simulate))
    except* ConfigError as group:
        for error in group.exceptions:
            print(f"fategen: {error}", file=sys.stderr)
        status = 2
    except* KeyboardInterrupt:
        status = 130
    return status


if __name__ == "__main__":
    sys.exit(main())
