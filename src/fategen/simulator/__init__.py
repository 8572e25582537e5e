"""A protocol-faithful ComfyUI simulator (HTTP + websockets on trio) for tests and benchmarks.

    sim = Simulator(SimulatorKnobs(step_seconds=0.001))
    port = await nursery.start(sim.serve)

Input images are uploaded with POST /upload/image, as to ComfyUI. See ``SimulatorKnobs`` for
timing, model files, faults and the optional bearer token, ``Simulator.executions``
(also ``GET /sim/executions``, in wall-clock seconds) for what ran when.
"""

from fategen.simulator.knobs import (
    DEFAULT_CHECKPOINTS,
    DEFAULT_UPSCALE_MODELS,
    ExecutionRecord,
    SimulatorKnobs,
)
from fategen.simulator.server import Simulator

__all__ = [
    "DEFAULT_CHECKPOINTS",
    "DEFAULT_UPSCALE_MODELS",
    "ExecutionRecord",
    "Simulator",
    "SimulatorKnobs",
]
