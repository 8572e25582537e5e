"""``python -m fategen.simulator --port 8188``: run the ComfyUI simulator until interrupted."""

from __future__ import annotations

import argparse
import logging
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
    parser.add_argument(
        "--checkpoint",
        action="append",
        dest="checkpoints",
        help="a checkpoint name ComfyUI has (repeatable; default: "
        + ", ".join(defaults.checkpoints)
        + ")",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    knobs = SimulatorKnobs(
        step_seconds=args.step_seconds, model_load_seconds=args.model_load_seconds
    )
    if args.checkpoints:
        knobs.checkpoints = list(args.checkpoints)
    simulator = Simulator(knobs)
    try:
        trio.run(partial(simulator.serve, host=args.host, port=args.port))
    except* KeyboardInterrupt:
        pass  # Ctrl+C is how it is meant to stop: exit 0, quietly


if __name__ == "__main__":
    main()
