"""``python -m fategen.simulator --port 8188``: run the ComfyUI simulator until interrupted.

``--checkpoint``, ``--lora`` and ``--upscale-model`` (each repeatable) set the model files it
has; ``--token`` makes it answer 401 without ``Authorization: Bearer <token>``; ``--name``
prefixes its log lines (one line per executed prompt, at INFO).
"""

from __future__ import annotations

import argparse
import logging
import signal
from functools import partial

import trio

from fategen.simulator.knobs import SimulatorKnobs
from fategen.simulator.server import Simulator


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve."""
    defaults = SimulatorKnobs()
    parser = argparse.ArgumentParser(
        prog="python -m fategen.simulator",
        description="Run the ComfyUI simulator until interrupted (Ctrl+C).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8188, help="port (default: 8188)")
    parser.add_argument(
        "--step-seconds",
        type=float,
        default=defaults.step_seconds,
        help=f"seconds per sampler step (default: {defaults.step_seconds})",
    )
    parser.add_argument(
        "--model-load-seconds",
        type=float,
        default=defaults.model_load_seconds,
        help=f"seconds to load a checkpoint (default: {defaults.model_load_seconds})",
    )
    #: The files ComfyUI "has": option, knob, what one is.
    for option, knob, what in (
        ("--checkpoint", "checkpoints", "a checkpoint name"),
        ("--lora", "loras", "a LoRA file name"),
        ("--upscale-model", "upscale_models", "an upscale model file name"),
    ):
        parser.add_argument(
            option,
            action="append",
            dest=knob,
            help=f"{what} ComfyUI has (repeatable; default: "
            + ", ".join(getattr(defaults, knob))
            + ")",
        )
    parser.add_argument(
        "--token",
        help="require the header 'Authorization: Bearer TOKEN' on every request (default: none)",
    )
    parser.add_argument(
        "--name", help="a prefix for the log lines, to tell several simulators apart"
    )
    args = parser.parse_args(argv)
    if args.token == "":
        parser.error("--token must not be empty")
    prefix = f"[{args.name.replace('%', '%%')}] " if args.name else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {prefix}%(name)s: %(message)s")
    knobs = SimulatorKnobs(
        step_seconds=args.step_seconds,
        model_load_seconds=args.model_load_seconds,
        required_token=args.token,
    )
    for knob in ("checkpoints", "loras", "upscale_models"):
        if getattr(args, knob):
            setattr(knobs, knob, list(getattr(args, knob)))
    simulator = Simulator(knobs)
    try:
        trio.run(partial(serve_until_signalled, simulator, args.host, args.port))
    except* KeyboardInterrupt:
        pass  # a second Ctrl+C: exit 0, quietly


async def serve_until_signalled(simulator: Simulator, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully. The signals are received, not
    raised as KeyboardInterrupt wherever trio happens to run (which can land inside a
    nursery's exit in hypercorn and corrupt trio's state)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(simulator.serve, host=host, port=port))
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    main()
