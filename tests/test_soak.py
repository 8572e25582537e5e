"""A short soak (``nox -s soak`` runs the long one): no job is lost while faults come and go."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import trio

from conftest import ROOT


def _load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fategen_soak", ROOT / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_short_soak_loses_no_job() -> None:
    seconds = float(os.environ.get("SOAK_TEST_SECONDS", "8"))
    soak = _load_soak()
    with trio.fail_after(seconds + 60):
        figures = await soak.run_soak(seconds, 20, seed=7)
    assert figures["submitted"] > 20
    assert figures["lost"] == 0, figures["lost_ids"]
    assert figures["completed"] + figures["failed"] + figures["cancelled"] == figures["submitted"]
    assert figures["completed"] > 0
