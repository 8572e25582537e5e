"""``python bench/run.py``: fategen's benchmark suite against the ComfyUI simulator.

Runs each scenario (bench/scenarios/), prints a table and writes ``bench/results.json``
(figures plus machine facts). Every headline figure is a ratio or a comparison measured in the
same run. Options: ``--only NAME`` (repeatable: throughput, swaps, frontend, longpoll,
postprocess, growth), ``--profile DIR`` (py-spy samples the service in the front-end and
long-poll scenarios; needs py-spy), ``--out FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, machine_facts, own_cpu_seconds, raise_fd_limit
from scenarios import frontend, longpoll, postprocess, swaps, throughput

SCENARIOS = ("throughput", "swaps", "frontend", "longpoll", "postprocess", "growth")


async def run_all(names: list[str], workdir: Path, profile: Path | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in names:
        t0 = time.monotonic()
        print(f"-- {name} ...", file=sys.stderr, flush=True)
        if name == "throughput":
            results[name] = await throughput.run(workdir, jobs=40, repeats=3)
        elif name == "swaps":
            results[name] = await swaps.run(workdir)
        elif name == "frontend":
            prof = None if profile is None else profile / "frontend.txt"
            results[name] = await frontend.run(workdir, profile=prof)
        elif name == "longpoll":
            prof = None if profile is None else profile / "longpoll.txt"
            results[name] = await longpoll.run(workdir, waiters=5000, profile=prof)
        elif name == "postprocess":
            results[name] = await postprocess.run(workdir)
        elif name == "growth":
            results[name] = {
                "throughput_40": results.get("throughput")
                or await throughput.run(workdir, jobs=40, repeats=1, step_seconds=0.004),
                "throughput_400": await throughput.run(
                    workdir, jobs=400, repeats=1, step_seconds=0.004, nicks=40
                ),
                "longpoll_1000": await longpoll.run(workdir, waiters=1000),
                "longpoll_5000": results.get("longpoll")
                or await longpoll.run(workdir, waiters=5000),
            }
        print(f"   {name}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    return results


def _f(value: float, unit: str = "", digits: int = 1) -> str:
    return f"{value:,.{digits}f}{unit}"


def table(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, value, target or note) rows."""
    rows: list[tuple[str, str, str]] = []
    if "throughput" in results:
        t = results["throughput"]
        rows += [
            (
                f"1. makespan fategen / direct ({t['jobs']} jobs, median of {t['repeats']})",
                _f(t["makespan_ratio"], digits=3),
                "target <= 1.02; runs: " + ", ".join(_f(r, digits=3) for r in t["makespan_ratios"]),
            ),
            (
                "1. makespan direct / fategen (s)",
                f"{_f(t['direct_makespan'], digits=2)} / {_f(t['fategen_makespan'], digits=2)}",
                "first submit to last result ready",
            ),
            (
                "1. simulator span direct / fategen (s)",
                f"{_f(t['direct_sim_span'], digits=2)} / {_f(t['fategen_sim_span'], digits=2)}",
                f"ratio {_f(t['sim_span_ratio'], digits=3)}: first execution start to last end",
            ),
            (
                "1. gap between prompts, median / max (ms)",
                f"{_f(t['gap_ms_median'], digits=2)} / {_f(t['gap_ms_max'], digits=2)}",
                f"target median < 5; direct: {_f(t['direct_gap_ms_median'], digits=2)} / "
                f"{_f(t['direct_gap_ms_max'], digits=2)}",
            ),
            (
                "1. before first / after last execution (ms)",
                f"{_f(t['lead_ms']['fategen'])} / {_f(t['tail_ms']['fategen'])}",
                f"direct: {_f(t['lead_ms']['direct'])} / {_f(t['tail_ms']['direct'])}",
            ),
            (
                "1. service CPU per job (ms)",
                _f(t["service_cpu_per_job_ms"]),
                f"peak RSS {_f(t['service_rss_peak_mib'])} MiB",
            ),
        ]
    if "swaps" in results:
        s = results["swaps"]
        note = f"{s['jobs']} jobs, {s['users']} users, 3 models, {s['model_load_seconds']} s/swap"
        rows.append(
            (
                "2. FIFO: swaps, makespan",
                f"{s['fifo']['swaps']}, {_f(s['fifo']['makespan'])} s",
                note,
            )
        )
        for name, label in (("fair", "fair turns only"), ("fair_affinity", "fair + affinity")):
            v = s[name]
            rows.append(
                (
                    f"2. {label}: swaps, makespan",
                    f"{v['swaps']}, {_f(v['makespan'])} s",
                    f"worst extra wait vs FIFO: job {_f(v['worst_job_extra_s'], digits=2)} s, "
                    f"user's last job {_f(v['worst_user_extra_s'], digits=2)} s",
                )
            )
    if "frontend" in results:
        f = results["frontend"]
        rows += [
            (
                f"3. front end, {f['clients']} clients: requests/s",
                _f(f["requests_per_second"], digits=0),
                f"POST+GET pairs; queue grew to {f['queued_at_end']}",
            ),
            (
                "3. POST /request p50 / p99 (ms)",
                f"{_f(f['post_p50_ms'])} / {_f(f['post_p99_ms'])}",
                "",
            ),
            (
                "3. GET /job p50 / p99 (ms)",
                f"{_f(f['get_p50_ms'])} / {_f(f['get_p99_ms'])}",
                "",
            ),
            (
                "3. CPU share: service / load generator",
                f"{_f(100 * f['service_cpu_share'], '%', 0)} / "
                f"{_f(100 * f['loadgen_cpu_share'], '%', 0)}",
                "of one core, over the run",
            ),
        ]
    if "longpoll" in results:
        lp = results["longpoll"]
        rows += [
            (
                f"4. {lp['waiters']:,} /wait held: service RSS before / holding (MiB)",
                f"{_f(lp['rss_before_mib'])} / {_f(lp['rss_holding_mib'])}",
                f"{_f(lp['kib_per_waiter'])} KiB per waiter; all connected in "
                f"{_f(lp['connect_seconds'])} s",
            ),
            (
                "4. job finished -> waiter answered p50 / p99 (ms)",
                f"{_f(lp['answer_p50_ms'])} / {_f(lp['answer_p99_ms'])}",
                f"{lp['jobs']} jobs; load generators' CPU {_f(lp['loadgen_cpu_s'])} s",
            ),
        ]
    if "postprocess" in results:
        p = results["postprocess"]
        rows += [
            ("5. 2x2 grid of 1024x1024 -> WebP (ms)", _f(p["grid_2x2_1024_ms"]), "in process"),
            (
                "5. service overhead per job, median / max (ms)",
                f"{_f(p['overhead_median_ms'])} / {_f(p['overhead_max_ms'])}",
                "simulator execution end -> job completed",
            ),
        ]
    if "growth" in results:
        g = results["growth"]
        small, big = g["throughput_40"], g["throughput_400"]
        rows += [
            (
                "6. makespan ratio, 40 -> 400 jobs",
                f"{_f(small['makespan_ratio'], digits=3)} -> {_f(big['makespan_ratio'], digits=3)}",
                f"steps {big['step_seconds']} s at 400",
            ),
            (
                "6. service CPU per job (ms), 40 -> 400 jobs",
                f"{_f(small['service_cpu_per_job_ms'])} -> {_f(big['service_cpu_per_job_ms'])}",
                f"peak RSS {_f(small['service_rss_peak_mib'])} -> "
                f"{_f(big['service_rss_peak_mib'])} MiB",
            ),
            (
                "6. gap median / max (ms), 400 jobs",
                f"{_f(big['gap_ms_median'], digits=2)} / {_f(big['gap_ms_max'], digits=2)}",
                "",
            ),
        ]
        a, b = g["longpoll_1000"], g["longpoll_5000"]
        rows += [
            (
                "6. waiters 1,000 -> 5,000: KiB per waiter",
                f"{_f(a['kib_per_waiter'])} -> {_f(b['kib_per_waiter'])}",
                f"RSS holding {_f(a['rss_holding_mib'])} -> {_f(b['rss_holding_mib'])} MiB",
            ),
            (
                "6. waiters 1,000 -> 5,000: answer p50 / p99 (ms)",
                f"{_f(a['answer_p50_ms'])}/{_f(a['answer_p99_ms'])} -> "
                f"{_f(b['answer_p50_ms'])}/{_f(b['answer_p99_ms'])}",
                f"connect {_f(a['connect_seconds'])} -> {_f(b['connect_seconds'])} s",
            ),
        ]
    return rows


def markdown(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| figure | value | target / note |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", action="append", choices=SCENARIOS)
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--out", type=Path, default=BENCH / "results.json")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args()
    raise_fd_limit()
    names = [n for n in SCENARIOS if args.only is None or n in args.only]
    if args.profile is not None:
        if not shutil.which(os.environ.get("PY_SPY", "py-spy")):
            parser.error("--profile needs py-spy (pip install py-spy, or set PY_SPY)")
        args.profile.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="fategen-bench-"))
    started = time.monotonic()
    try:
        results = trio.run(run_all, names, workdir, args.profile)
    finally:
        if args.keep:
            print(f"work folder: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = table(results)
    report = {
        "machine": machine_facts(),
        "suite_seconds": time.monotonic() - started,
        "driver_cpu_seconds": own_cpu_seconds(),
        "table": [{"figure": a, "value": b, "note": c} for a, b, c in rows],
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    m = report["machine"]
    print(
        f"\nfategen bench, {m['date']}: {m['cpu_count']} CPUs, Python {m['python']}, "
        f"{m['platform']}; suite {report['suite_seconds']:.0f} s\n"
    )
    print(markdown(rows))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
