"""The command line: ``fategen serve`` runs the service (with ``--simulate [N]``, beside N
built-in ComfyUI simulators); ``fategen init`` writes a configuration to start from;
``fategen submit``, ``status``, ``cancel`` and ``models`` talk to a running service through
`fategen.client` (``--url``/``--key``, or ``FATEGEN_URL``/``FATEGEN_KEY``)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import getpass
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import trio

from fategen import __version__
from fategen.client import (
    DEFAULT_URL,
    AsyncClient,
    FategenClientError,
    FategenConnectionError,
    JobInfo,
    WaitTimeout,
)
from fategen.core.backends import BackendSpec
from fategen.errors import ConfigError
from fategen.logs import configure_logging
from fategen.settings import Settings, describe_backends

if TYPE_CHECKING:
    from rich.progress import Progress

    from fategen.simulator import SimulatorKnobs

log = logging.getLogger("fategen")

#: ``--simulate N`` starts at most this many simulators.
MAX_SIMULATORS = 8
#: Simulator i runs at the base step/load seconds times ``SPEEDS[i % len(SPEEDS)]``.
SPEEDS = (1.0, 1.0, 2.0, 0.5)

#: The client commands' variables: the service's URL and an API key. The service never reads
#: them (`service_environment` leaves them out of its settings' check).
URL_VARIABLE = "FATEGEN_URL"
KEY_VARIABLE = "FATEGEN_KEY"
CLIENT_VARIABLES = frozenset({URL_VARIABLE, KEY_VARIABLE})
#: Exit codes of the client commands: the service refused (or the job failed or was
#: cancelled); the service could not be reached; interrupted.
EXIT_REFUSED = 1
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130
#: Seconds between two looks at a job when the service has no event stream.
POLL_SECONDS = 1.0


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
    _add_client_commands(sub)
    _add_irc_command(sub)
    return parser


def _default_nick() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return "cli"


def _add_client_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", help=f"the service's URL (default: ${URL_VARIABLE}, else {DEFAULT_URL})"
    )
    common.add_argument("--key", help=f"an API key (default: ${KEY_VARIABLE})")
    common.add_argument(
        "--json", action="store_true", help="print the service's answer as JSON (for scripts)"
    )
    submit = sub.add_parser(
        "submit",
        parents=[common],
        help="queue a chat line as an image job",
        description=(
            "Queue a chat line (a prompt, then modifiers) and print its place in the queue. "
            "With --wait (or -o), follow it to its end with a progress bar. Exit status: 0 "
            "done, 1 refused or the job failed, 3 the service cannot be reached."
        ),
    )
    submit.add_argument("message", help='the chat line, quoted: "a lighthouse at night -c 4"')
    submit.add_argument("--nick", default=_default_nick(), help="who asks (default: your login)")
    submit.add_argument(
        "--wait", action="store_true", help="wait for the job to finish, showing its progress"
    )
    submit.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="save the WebP there (implies --wait)"
    )
    submit.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="a retry with the same key gets the same job back instead of a second one",
    )
    submit.add_argument(
        "--image-file",
        type=Path,
        metavar="FILE",
        help="start from this image (uploaded; for a URL, put --image URL in the line)",
    )
    status = sub.add_parser("status", parents=[common], help="show a job's state")
    status.add_argument("job_id", metavar="ID")
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a job")
    cancel.add_argument("job_id", metavar="ID")
    cancel.add_argument(
        "--nick",
        default=_default_nick(),
        help="the nick that submitted it (default: your login; an admin key needs none)",
    )
    sub.add_parser("models", parents=[common], help="list the models and whether each can run")


def _add_irc_command(sub: Any) -> None:
    irc = sub.add_parser(
        "irc",
        help="run an IRC bot: !img <prompt> in a channel queues an image",
        description=(
            "Join IRC channels and answer !img <prompt with modifiers>, !cancel [job], "
            "!status [job] and !help, through the service at --url with the bot's --key; "
            "the sender's IRC nick is the job's nick. Reconnects when the server drops it."
        ),
    )
    irc.add_argument(
        "--server",
        metavar="HOST:PORT",
        help="the IRC server (default: $IRC_SERVER; port 6667, or 6697 with --tls)",
    )
    irc.add_argument(
        "--tls", action="store_true", help="connect with TLS (the certificate is checked)"
    )
    irc.add_argument("--nick", help="the bot's nick (default: $IRC_NICK, else fategen)")
    irc.add_argument(
        "--channel",
        action="append",
        dest="channels",
        default=[],
        metavar="#NAME",
        help="a channel to join (repeatable; default: $IRC_CHANNELS, comma-separated)",
    )
    irc.add_argument(
        "--url", help=f"the service's URL (default: ${URL_VARIABLE}, else {DEFAULT_URL})"
    )
    irc.add_argument("--key", help=f"the bot's API key (default: ${KEY_VARIABLE})")
    irc.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="DEBUG shows every IRC line (default: INFO)",
    )


def run_irc_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``fategen irc``: the bot of the flags (each falling back on its variable) until
    Ctrl-C; 2 for a configuration that is none."""
    from fategen.irc import IrcConfig
    from fategen.irc import main as run_bot

    try:
        config = IrcConfig.from_options(
            environ,
            server=args.server,
            nick=args.nick,
            channels=args.channels,
            tls=args.tls,
            url=args.url or environ.get(URL_VARIABLE),
            key=args.key or environ.get(KEY_VARIABLE),
        )
    except ConfigError as exc:
        print(f"fategen: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    return run_bot(config)


def service_environment() -> dict[str, str]:
    """The environment the service's settings are read from: without the client commands'
    variables, which are no setting (`CLIENT_VARIABLES`)."""
    return {k: v for k, v in os.environ.items() if k not in CLIENT_VARIABLES}


def print_settings(dotenv: Path, required: bool) -> int:
    """Every setting: variable, value in force, and whether it came from the environment,
    the settings file or the default. Keys are counted, never shown; neither are the tokens
    and header values of ``COMFYUI_BACKENDS``."""
    from dotenv import dotenv_values

    from fategen.scaffold import variables

    settings = Settings.from_env(service_environment(), dotenv=dotenv, dotenv_required=required)
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
            if name == "FATEGEN_WEBHOOK_SECRET":
                return "<set>" if value else ""
            if name == "FATEGEN_KEY_WEBHOOKS":
                return ",".join(
                    f"{key}={url}" + (";secret=***" if secret else "") for key, url, secret in value
                )
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


def _print_json(value: object) -> None:
    """The service's answer (``raw``), as it sent it."""
    print(json.dumps(value, ensure_ascii=False), flush=True)


def _place(position: int) -> str:
    if position == 0:
        return "running"
    if position == 1:
        return "next in line"
    return f"at position {position} in the queue"


def _submitted(job_id: str, status: str, position: int | None) -> str:
    """``job ID queued, at position 3 in the queue`` (a retried Idempotency-Key may give a
    job that is further on)."""
    return f"job {job_id} {status}" + ("" if position is None else f", {_place(position)}")


def _describe(job: JobInfo, *, steps: bool = True) -> str:
    """A job's state in a few words: ``processing, step 12 of 28, on gpu0``."""
    if job.status == "queued" and job.queue_position is not None:
        return f"queued, {_place(job.queue_position)}"
    if job.status == "processing":
        step = ""
        if steps and job.progress.of:
            step = f", step {job.progress.step} of {job.progress.of}"
        return f"processing{step}" + (f", on {job.backend}" if job.backend else "")
    if job.status == "failed":
        return f"failed: {job.error or 'no reason given'}"
    if job.status == "cancelled":
        return "cancelled" + (f" by {job.cancelled_by}" if job.cancelled_by else "")
    return job.status


class _ProgressView:
    """A progress bar on stderr (rich), following a job's states, when ``shown`` and stderr
    is a terminal; nothing is left behind once it ends."""

    def __init__(self, shown: bool) -> None:
        from rich.console import Console

        self._progress: Progress | None = None
        console = Console(stderr=True)
        if shown and console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self._task = self._progress.add_task("queued", total=None)

    def __enter__(self) -> _ProgressView:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def show(self, job: JobInfo) -> None:
        if self._progress is None:
            return
        total = job.progress.of if job.status == "processing" and job.progress.of else None
        self._progress.update(
            self._task,
            description=_describe(job, steps=False),  # the bar's own column counts them
            completed=job.progress.step,
            total=total,
        )


async def _follow(client: AsyncClient, job_id: str, view: _ProgressView) -> JobInfo:
    """The job once finished, shown as it goes: from its event stream, or by long-polls when
    the stream cannot be had (a service without streams answers 404, a full one 429, or the
    stream keeps breaking); a lasting problem then surfaces as the long-poll's error."""
    try:
        async with contextlib.aclosing(client.events(job_id)) as events:
            async for event in events:
                if event.job is not None:
                    view.show(event.job)
                    if event.final:
                        return event.job
    except FategenClientError as exc:
        log.debug("no event stream for job %s (%s): polling", job_id, exc)
    while True:
        try:
            job = await client.wait(job_id, timeout=POLL_SECONDS)
        except WaitTimeout as running:
            view.show(running.job)
            continue
        view.show(job)
        return job


async def _submit_command(client: AsyncClient, args: argparse.Namespace) -> int:
    image = None
    if args.image_file is not None:
        try:
            image = await trio.Path(args.image_file).read_bytes()
        except OSError as exc:
            print(f"fategen: cannot read {args.image_file}: {exc.strerror}", file=sys.stderr)
            return 1
    submitted = await client.submit(
        args.message, args.nick, idempotency_key=args.idempotency_key, image=image
    )
    if not (args.wait or args.output):
        if args.json:
            _print_json(submitted.raw)
        else:
            print(_submitted(submitted.job_id, submitted.status, submitted.queue_position))
        return 0
    if not args.json:
        line = _submitted(submitted.job_id, submitted.status, submitted.queue_position)
        print(line, flush=True)
    try:
        with _ProgressView(shown=not args.json) as view:
            job = await _follow(client, submitted.job_id, view)
    except KeyboardInterrupt:
        print(
            f"fategen: stopped waiting; job {submitted.job_id} goes on "
            f"(fategen cancel {submitted.job_id} stops it)",
            file=sys.stderr,
        )
        raise
    if job.status == "completed" and args.output:
        image = await client.image(job.job_id)
        try:
            await trio.Path(args.output).write_bytes(image)
        except OSError as exc:
            print(f"fategen: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_REFUSED
    if args.json:
        _print_json(job.raw)
    elif job.status == "completed":
        images = f"{job.count} images" if job.count > 1 else "1 image"
        where = f"saved to {args.output}" if args.output else (job.image_url or job.result)
        print(
            f"job {job.job_id} completed: {images} of {job.width}x{job.height}, "
            f"{job.model}, seed {job.seed}; {where}"
        )
    if job.status != "completed":
        print(f"fategen: job {job.job_id} {_describe(job)}", file=sys.stderr)
        return EXIT_REFUSED
    return 0


async def _status_command(client: AsyncClient, args: argparse.Namespace) -> int:
    job = await client.job(args.job_id)
    if args.json:
        _print_json(job.raw)
        return 0
    print(f"job {job.job_id}: {_describe(job)}")
    images = f"{job.count} images" if job.count > 1 else "1 image"
    print(f"  {job.prompt!r} for {job.nick}: {job.model}, {images} of {job.width}x{job.height}")
    print(f"  seed {job.seed}, created {job.created:%Y-%m-%d %H:%M:%S} UTC")
    if job.image_url:
        print(f"  image: {job.image_url}")
    return 0


async def _cancel_command(client: AsyncClient, args: argparse.Namespace) -> int:
    job = await client.cancel(args.job_id, nick=args.nick)
    if args.json:
        _print_json(job.raw)
    else:
        print(f"job {job.job_id} {_describe(job)}")
    return 0


async def _models_command(client: AsyncClient, args: argparse.Namespace) -> int:
    models = await client.models()
    if args.json:
        _print_json([m.raw for m in models])
        return 0
    width = max((len(m.id) for m in models), default=0)
    for m in models:
        line = f"{m.id:<{width}}  {m.width}x{m.height}  {m.steps:>3} steps  {m.description}"
        if m.available is False:
            line += f"  (cannot run now: {m.unavailable_reason or 'unavailable'})"
        print(line)
    return 0


CLIENT_COMMANDS: dict[str, Callable[[AsyncClient, argparse.Namespace], Awaitable[int]]] = {
    "submit": _submit_command,
    "status": _status_command,
    "cancel": _cancel_command,
    "models": _models_command,
}


def run_client_command(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """A client command against the service at ``--url`` / ``FATEGEN_URL``: its exit code;
    a refusal is the service's sentence on stderr."""
    url = args.url or environ.get(URL_VARIABLE) or DEFAULT_URL
    key = args.key or environ.get(KEY_VARIABLE) or None

    async def run() -> int:
        async with AsyncClient(url, key=key) as client:
            return await CLIENT_COMMANDS[args.command](client, args)

    try:
        return trio.run(run)
    except ValueError as exc:  # a URL that is none
        print(f"fategen: {exc}", file=sys.stderr)
        return 2
    except FategenConnectionError as exc:
        print(f"fategen: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except FategenClientError as exc:
        print(f"fategen: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "init":
        from fategen.scaffold import init

        return init(args.dir)
    if args.command in CLIENT_COMMANDS:
        return run_client_command(args, os.environ)
    if args.command == "irc":
        return run_irc_command(args, os.environ)
    try:
        if args.command == "settings":
            dotenv = args.env_file if args.env_file is not None else Path(".env")
            return print_settings(dotenv, args.env_file is not None)
        dotenv = args.env_file if args.env_file is not None else Path(".env")
        settings = Settings.from_env(
            service_environment(), dotenv=dotenv, dotenv_required=args.env_file is not None
        )
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
    if os.environ.get(KEY_VARIABLE) and not (settings.api_keys or settings.admin_keys):
        log.warning(
            "%s is set, but only the client commands read it (fategen submit, status...); "
            "the service's keys are FATEGEN_API_KEYS, and none is set: every endpoint is open",
            KEY_VARIABLE,
        )
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
