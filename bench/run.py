"""``python bench/run.py``: fategen's benchmark suite against the ComfyUI simulator.

Runs each scenario (bench/scenarios/) on its own: a scenario's figures are merged into the
results file as soon as it ends, a scenario that fails is reported (in the table and the file,
with its error) and the others still run; one that fails on a lost connection is run once more.
Every headline figure is measured several times in the run (min / median / max shown) and its
median is checked against a target: the table says PASS or FAIL.

Options:
  --only NAME     one scenario (repeatable): throughput, swaps, frontend, longpoll, postprocess,
                  fleet
  --quick         a smoke run (fewer jobs, sizes and repeats; about two minutes), written to
                  bench/results-quick.json unless --out says otherwise
  --strict        exit with status 1 when a target is missed (without it, only a scenario that
                  failed to run gives status 1: figures on a shared machine are noisy)
  --table         print the table of the results file, run nothing
  --profile DIR   py-spy samples the service in the front-end and long-poll scenarios
  --out FILE      the results file (default bench/results.json)
  --keep          keep the work folder (service and simulator logs)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, machine_facts, raise_fd_limit
from scenarios import fleet, frontend, inputs, longpoll, postprocess, swaps, throughput

SCENARIOS = ("throughput", "swaps", "frontend", "longpoll", "postprocess", "fleet", "inputs")
#: A scenario that fails with one of these (a connection reset, a process gone) runs again once.
RETRYABLE = (OSError, EOFError, httpx.TransportError, trio.BrokenResourceError)
#: Seconds one attempt at a scenario may take before it is stopped and reported failed.
SCENARIO_LIMIT = {"quick": 300.0, "full": 900.0}


async def run_one(name: str, workdir: Path, *, quick: bool, profile: Path | None) -> Any:
    if name == "throughput":
        return await throughput.run(workdir, quick=quick)
    if name == "swaps":
        return await swaps.run(workdir, quick=quick)
    if name == "frontend":
        prof = None if profile is None else profile / "frontend.txt"
        return await frontend.run(workdir, quick=quick, profile=prof)
    if name == "longpoll":
        prof = None if profile is None else profile / "longpoll.txt"
        return await longpoll.run(workdir, quick=quick, profile=prof)
    if name == "postprocess":
        return await postprocess.run(workdir, quick=quick)
    if name == "fleet":
        return await fleet.run(workdir, quick=quick)
    if name == "inputs":
        return await inputs.run(workdir, quick=quick)
    raise ValueError(name)


def _cause(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (what actually went wrong)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def run_scenario(
    name: str, workdir: Path, *, quick: bool, profile: Path | None
) -> dict[str, Any]:
    """One scenario's entry for the results file: ``status`` ok or failed, never raises."""
    started = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        scenario_dir = workdir / f"{name}-{attempts}"
        scenario_dir.mkdir()
        try:
            with trio.fail_after(SCENARIO_LIMIT["quick" if quick else "full"]):
                result = await run_one(name, scenario_dir, quick=quick, profile=profile)
        except Exception as exc:
            cause = _cause(exc)
            print(f"   {name} failed: {type(cause).__name__}: {cause}", file=sys.stderr)
            if isinstance(cause, RETRYABLE) and attempts == 1:
                print(f"   {name}: once more", file=sys.stderr)
                continue
            return {
                "status": "failed",
                "error": f"{type(cause).__name__}: {cause}",
                "traceback": traceback.format_exception(exc),
                "attempts": attempts,
                "seconds": time.monotonic() - started,
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "quick": quick,
            }
        return {
            "status": "ok",
            "attempts": attempts,
            "seconds": time.monotonic() - started,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "quick": quick,
            **result,
        }


def load_results(path: Path) -> dict[str, Any]:
    """The results file, or an empty one (also when it is from the old suite's format)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"scenarios": {}}
    if not isinstance(data, dict) or not isinstance(data.get("scenarios"), dict):
        return {"scenarios": {}}
    return data


def save_results(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: a run stopped halfway leaves the previous file whole."""
    text = json.dumps(data, indent=1, allow_nan=True) + "\n"
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


async def run_all(
    names: list[str], workdir: Path, out: Path, *, quick: bool, profile: Path | None
) -> dict[str, Any]:
    data = load_results(out)
    data["machine"] = machine_facts()
    for name in names:
        t0 = time.monotonic()
        print(f"-- {name} ...", file=sys.stderr, flush=True)
        entry = await run_scenario(name, workdir, quick=quick, profile=profile)
        data["scenarios"][name] = entry
        data["machine"] = machine_facts()
        save_results(out, data)  # each scenario's result is kept as soon as it ends
        print(f"   {name}: {entry['status']}, {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return data


# -- the table -------------------------------------------------------------------------------


def _number(value: float, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _target(target: dict[str, Any] | None) -> str:
    if target is None:
        return ""
    value = target["value"]
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{target['op']} {text}"


def rows(data: dict[str, Any], names: list[str] | None = None) -> list[list[str]]:
    """Table rows: scenario, figure, median, min / max, target, PASS / FAIL, note."""
    table: list[list[str]] = []
    for name in names or list(data.get("scenarios", {})):
        entry = data.get("scenarios", {}).get(name)
        if entry is None:
            continue
        if entry["status"] != "ok":
            table.append([name, "scenario failed", "", "", "", "FAILED", entry["error"]])
            continue
        for f in entry.get("figures", []):
            d = f["digits"]
            verdict = "" if f["target"] is None else "PASS" if f["pass"] else "FAIL"
            spread = f"{_number(f['min'], d)} / {_number(f['max'], d)}"
            if len(f["values"]) == 1:
                spread = "(one run)"
            note = f["note"]
            if f["noisy"]:
                note = ("noisy on 2 shared cores; " + note).rstrip("; ")
            median = _number(f["median"], d)
            table.append([name, f["label"], median, spread, _target(f["target"]), verdict, note])
    return table


def markdown(data: dict[str, Any], names: list[str] | None = None) -> str:
    """The benchmark table in Markdown (for the README), with the machine and the date."""
    m = data.get("machine", {})
    header = [
        f"fategen bench, {m.get('date', '?')}: {m.get('cpu_count', '?')} CPUs, Python "
        f"{m.get('python', '?')}, {m.get('platform', '?')}.",
        "",
        "| scenario | figure | median | min / max | target | result | note |",
        "|---|---|---|---|---|---|---|",
    ]
    body = [
        "| " + " | ".join(cell.replace("|", "/") for cell in row) + " |"
        for row in rows(data, names)
    ]
    return "\n".join(header + body)


def misses(data: dict[str, Any], names: list[str]) -> tuple[int, int]:
    """(targets missed, scenarios failed) among ``names``."""
    missed = failed = 0
    for name in names:
        entry = data["scenarios"].get(name)
        if entry is None:
            continue
        if entry["status"] != "ok":
            failed += 1
            continue
        missed += sum(1 for f in entry.get("figures", []) if f["pass"] is False)
    return missed, failed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", action="append", choices=SCENARIOS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--strict", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args()
    out = args.out or BENCH / ("results-quick.json" if args.quick else "results.json")
    names = [n for n in SCENARIOS if args.only is None or n in args.only]
    if args.table:
        print(markdown(load_results(out), names if args.only else None))
        return 0
    raise_fd_limit()
    if args.profile is not None:
        if not shutil.which(os.environ.get("PY_SPY", "py-spy")):
            parser.error("--profile needs py-spy (pip install py-spy, or set PY_SPY)")
        args.profile.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="fategen-bench-"))
    started = time.monotonic()
    try:
        data = trio.run(
            lambda: run_all(names, workdir, out, quick=args.quick, profile=args.profile)
        )
    finally:
        if args.keep:
            print(f"work folder: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nsuite: {time.monotonic() - started:.0f} s{' (quick)' if args.quick else ''}\n")
    print(markdown(data, names))
    missed, failed = misses(data, names)
    print(f"\n{missed} target(s) missed, {failed} scenario(s) failed; written: {out}")
    if failed or (args.strict and missed):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
