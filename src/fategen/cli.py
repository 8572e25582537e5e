"""The command line: ``fategen serve`` runs the service (with ``--simulate [N]``, beside N
built-in ComfyUI simulators); ``fategen init`` writes a configuration to start from."""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from fategen import __version__
from fategen.core.backends import BackendSpec
from fategen.errors import ConfigError
from fategen.logs import configure_logging
from fategen.settings import Settings, describe_backends

if TYPE_CHECKING:
    from fategen.simulator import SimulatorKnobs

log = logging.getLogger("fategen")

#: ``--simulate N`` starts at most this many simulators.
MAX_SIMULATORS = 8
#: Simulator i runs at the base step/load seconds times ``SPEEDS[i % len(SPEEDS)]``.
SPEEDS = (1.0, 1.0, 2.0, 0.5)


def _simulator_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_SIMULATORS:
        raise argparse.ArgumentTypeError(
            f"expected a number of simulators from 1 to {MAX_SIMULATORS}, got {text!r}"
        )
    return count


def simulator_knobs(
    count: int,
    *,
    step_seconds: float,
    load_seconds: float,
    checkpoints: Sequence[str] | None = None,
) -> list[SimulatorKnobs]:
    """The knobs of ``count`` simulators, unlike each other so that placement matters.

    Simulator i is ``SPEEDS[i % 4]`` times as slow as the base ``step_seconds`` and
    ``load_seconds`` (1, 1, 2, 0.5, 1, ...). Given ``checkpoints``, every simulator has exactly
    those; otherwise simulator 0 has all of `DEFAULT_CHECKPOINTS` and simulator i >= 1 lacks
    ``DEFAULT_CHECKPOINTS[(i - 1) % 4]``, so every checkpoint is on at least one simulator and,
    with 3 or more, on at least two.
    """
    from fategen.simulator import DEFAULT_CHECKPOINTS, SimulatorKnobs

    fleet = []
    for i in range(count):
        if checkpoints:
            installed = list(checkpoints)
        else:
            lacking = DEFAULT_CHECKPOINTS[(i - 1) % len(DEFAULT_CHECKPOINTS)] if i else None
            installed = [c for c in DEFAULT_CHECKPOINTS if c != lacking]
        speed = SPEEDS[i % len(SPEEDS)]
        fleet.append(
            SimulatorKnobs(
                step_seconds=step_seconds * speed,
                model_load_seconds=load_seconds * speed,
                checkpoints=installed,
            )
        )
    return fleet


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fategen",
        description="fategen: an image-generation job service for chat bots, driving ComfyUI.",
    )
    parser.add_argument("--version", action="version", version=f"fategen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the service",
        description=(
            "Run the service. Settings come from environment variables, then from the .env "
            "file (--env-file); the environment wins. 'fategen settings' lists every setting "
            "with its value and where it came from; 'fategen init' writes a commented .env "
            "of them all."
        ),
    )
    serve.add_argument("--host", help="address to listen on (FATEGEN_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (FATEGEN_PORT)")
    serve.add_argument(
        "--simulate",
        nargs="?",
        const=1,
        default=0,
        type=_simulator_count,
        metavar="N",
        help="also run the built-in ComfyUI simulator and use it (no GPU needed); with N "
        f"(2 to {MAX_SIMULATORS}), a fleet of N simulators of different speeds and "
        "checkpoints, named sim0, sim1, ... (as COMFYUI_BACKENDS)",
    )
    serve.add_argument(
        "--simulate-step-seconds",
        type=float,
        default=0.01,
        metavar="S",
        help="with --simulate: seconds per sampler step (default: 0.01; try 0.5 to watch "
        "progress and cancel a running job); with N simulators, the base of their speeds",
    )
    serve.add_argument(
        "--simulate-load-seconds",
        type=float,
        default=0.05,
        metavar="S",
        help="with --simulate: seconds to load a checkpoint (default: 0.05)",
    )
    serve.add_argument(
        "--simulate-checkpoint",
        action="append",
        dest="simulate_checkpoints",
        metavar="NAME",
        help="with --simulate: a checkpoint the simulator has (repeatable; default: the "
        "shipped models' checkpoints); with N simulators, every one has exactly these",
    )
    serve.add_argument(
        "--env-file",
        type=Path,
        default=None,
        help="settings file (default: .env in the working directory, if there is one)",
    )
    init = sub.add_parser(
        "init",
        help="write an editable configuration to start from",
        description=(
            "Write config/modelConfiguration.json, workflows/*.json and a commented .env "
            "into DIR (default: the working directory). Existing files are left alone."
        ),
    )
    init.add_argument("dir", nargs="?", type=Path, default=Path("."))
    settings = sub.add_parser(
        "settings",
        help="print every setting, its value and where it came from (keys masked)",
    )
    settings.add_argument("--env-file", type=Path, default=None, help="as for serve")
    return parser


def print_settings(dotenv: Path, required: bool) -> int:
    """Every setting: variable, value in force, and whether it came from the environment,
    the settings file or the default. Keys are counted, never shown; neither are the tokens
    and header values of ``COMFYUI_BACKENDS``."""
    import os

    from dotenv import dotenv_values

    from fategen.scaffold import variables

    settings = Settings.from_env(dotenv=dotenv, dotenv_required=required)
    in_file = dotenv_values(dotenv) if dotenv.is_file() else {}
    for name, default in variables():
        if name in os.environ:
            source = "environment"
        elif name in in_file:
            source = str(dotenv)
        else:
            source = "default"
        value = _value_of(settings, name, default)
        print(f"{name}={value}    # {source}")
    return 0


def _value_of(settings: Settings, name: str, default: str) -> str:
    import attrs

    for field in attrs.fields(type(settings)):  # type: ignore[arg-type]
        entry = field.metadata.get("environ_config")
        if entry is not None and entry.name == name:
            value = getattr(settings, field.name)
            if name.endswith("_KEYS"):
                return f"<{len(value)} key(s)>"
            if isinstance(value, tuple) and all(isinstance(v, BackendSpec) for v in value):
                return describe_backends(value)
            if isinstance(value, frozenset):
                return ",".join(sorted(value))
            return "" if value is None else str(value)
    return default


def _leaves(exc: BaseException) -> list[BaseException]:
    """Every exception inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def _watch_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if shutdown.is_set():
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                raise KeyboardInterrupt
            log.info("%s received: stopping gracefully", signal.Signals(signum).name)
            shutdown.set()


async def _start_simulators(
    nursery: trio.Nursery, settings: Settings, simulators: Sequence[SimulatorKnobs]
) -> Settings:
    """Start a simulator per knobs on 127.0.0.1 and return the settings that use them: one is
    ``COMFYUI_ADDRESS``/``COMFYUI_PORT``, several are ``COMFYUI_BACKENDS`` ``sim0``, ``sim1``..."""
    from fategen.simulator import Simulator

    ports: list[int] = []
    for knobs in simulators:
        sim = Simulator(knobs)
        ports.append(await nursery.start(functools.partial(sim.serve, host="127.0.0.1", port=0)))
    settings = settings.replace(comfyui_address="127.0.0.1", comfyui_port=ports[0])
    if len(simulators) == 1:
        log.info("ComfyUI simulator running on 127.0.0.1:%d", ports[0])
        return settings
    for i, (knobs, port) in enumerate(zip(simulators, ports, strict=True)):
        log.info(
            "ComfyUI simulator sim%d running on 127.0.0.1:%d: %g s per step, %g s per load, "
            "checkpoints %s",
            i,
            port,
            knobs.step_seconds,
            knobs.model_load_seconds,
            ", ".join(knobs.checkpoints),
        )
    fleet = tuple(
        BackendSpec(name=f"sim{i}", url=f"http://127.0.0.1:{port}") for i, port in enumerate(ports)
    )
    return settings.replace(comfyui_backends=fleet)


async def serve(settings: Settings, *, simulators: Sequence[SimulatorKnobs] = ()) -> None:
    """Run the service until SIGINT/SIGTERM, beside a simulator per ``simulators`` knobs."""
    from fategen.service import run_service

    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, shutdown)
        if simulators:
            settings = await _start_simulators(nursery, settings, simulators)
        async with trio.open_nursery() as service:
            running = await service.start(run_service, settings, shutdown)
            print(
                f"fategen is ready on {running.url}  (try: curl -s {running.url}/models; "
                f"API docs: {running.url}/docs)",
                flush=True,
            )
        # The service has stopped: stop the signal watcher and the simulator too.
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "init":
        from fategen.scaffold import init

        return init(args.dir)
    try:
        if args.command == "settings":
            dotenv = args.env_file if args.env_file is not None else Path(".env")
            return print_settings(dotenv, args.env_file is not None)
        dotenv = args.env_file if args.env_file is not None else Path(".env")
        settings = Settings.from_env(dotenv=dotenv, dotenv_required=args.env_file is not None)
        changes: dict[str, object] = {}
        if args.host:
            changes["http_host"] = args.host
        if args.port is not None:
            changes["http_port"] = args.port
        settings = settings.replace(**changes)
    except ConfigError as exc:
        print(f"fategen: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    simulators = []
    if args.simulate:
        simulators = simulator_knobs(
            args.simulate,
            step_seconds=args.simulate_step_seconds,
            load_seconds=args.simulate_load_seconds,
            checkpoints=args.simulate_checkpoints,
        )
    try:
        trio.run(functools.partial(serve, settings, simulators=simulators))
    except BaseException as exc:
        leaves = _leaves(exc)
        config = [e for e in leaves if isinstance(e, ConfigError)]
        if config:
            for message in dict.fromkeys(str(e) for e in config):
                print(f"fategen: {message}", file=sys.stderr)
            return 2
        if all(isinstance(e, KeyboardInterrupt) for e in leaves):
            return 130
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
