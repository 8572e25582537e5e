"""The ComfyUI simulator as a benchmark process, with a control channel on stdin.

Prints ``PORT <n>`` once it serves, then answers one line ``ok`` per command read on stdin:

- ``dump PATH``: write the execution log and the swap counts to PATH as JSON;
- ``reset``: forget executions, history, swaps and the loaded checkpoint;
- ``go``: start executing prompts (with ``--held`` the simulator takes prompts but runs none
  until then);
- ``hold``: take prompts but start none (the running one finishes) until the next ``go``.

It stops when stdin closes or on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from fategen.simulator import Simulator, SimulatorKnobs


def _dump(sim: Simulator) -> dict[str, Any]:
    return {
        "executions": [attrs.asdict(record) for record in sim.executions],
        "model_swaps": sim.model_swaps,
        "model_loads": sim.model_loads,
    }


def _reset(sim: Simulator) -> None:
    engine = sim.engine
    engine.free({"unload_models": True})
    engine.free_requests.clear()
    engine.executions.clear()
    engine.model_swaps = 0
    engine.model_loads = 0
    sim.queue.history.clear()


async def _lines(stream: trio.lowlevel.FdStream) -> Any:
    buffer = b""
    while True:
        data = await stream.receive_some(4096)
        if not data:
            return
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode().strip()


class _GatedQueue:
    """The simulator's prompt queue, as the executor sees it: nothing starts while held."""

    def __init__(self, queue: Any, held: bool) -> None:
        self._queue = queue
        self.gate = trio.Event()
        if not held:
            self.gate.set()

    def go(self) -> None:
        self.gate.set()

    def hold(self) -> None:
        if self.gate.is_set():
            self.gate = trio.Event()

    async def get(self) -> Any:
        while not self.gate.is_set():
            await self.gate.wait()
        item = await self._queue.get()
        # Held while waiting for a prompt: it stays "running" but starts only on ``go``.
        while not self.gate.is_set():
            await self.gate.wait()
        return item

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


async def serve(sim: Simulator, held: bool) -> None:
    gated = _GatedQueue(sim.queue, held)
    sim.engine.queue = gated  # type: ignore[assignment]
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(sim.serve, host="127.0.0.1", port=0))
        print(f"PORT {port}", flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            nursery.start_soon(_stop_on_signal, signals, nursery.cancel_scope)
            async for line in _lines(stdin):
                command, _, argument = line.partition(" ")
                if command == "dump":
                    text = json.dumps(_dump(sim))
                    await trio.to_thread.run_sync(Path(argument).write_text, text)
                elif command == "reset":
                    _reset(sim)
                elif command == "go":
                    gated.go()
                elif command == "hold":
                    gated.hold()
                print("ok", flush=True)
        nursery.cancel_scope.cancel()


async def _stop_on_signal(signals: Any, scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--step-seconds", type=float, default=0.01)
    parser.add_argument("--model-load-seconds", type=float, default=0.05)
    parser.add_argument("--held", action="store_true")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logging.basicConfig(level=logging.WARNING)
    knobs = SimulatorKnobs(
        step_seconds=args.step_seconds, model_load_seconds=args.model_load_seconds
    )
    trio.run(serve, Simulator(knobs), args.held)


if __name__ == "__main__":
    main()
