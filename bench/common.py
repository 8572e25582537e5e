"""What every scenario shares: the simulator and service processes, /proc figures, statistics.

Each process under test is its own OS process, so its RSS and CPU time are its own:

    bench (this process: scenario driver) --HTTP--> fategen serve --REST/WS--> simproc.py
                  \\--rawload.py processes--/          (or bare.py: the baselines)

`simulator()`, `service()`, `bare()` and `rawload()` are async context managers that start the
process, wait until it is ready, and stop it (SIGTERM, then SIGKILL) on the way out. `figure`
makes one row of the table: the values of the repeats and the target their median must meet.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
MODEL_CONFIG = BENCH / "config" / "modelConfiguration.json"
WORKFLOWS = ROOT / "workflows"
_TICK = os.sysconf("SC_CLK_TCK")
_READY = re.compile(r"fategen is ready on (\S+)")


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def own_cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- statistics ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN when ``b`` is 0 (a figure with no data, not a crash)."""
    return a / b if b else float("nan")


def figure(
    key: str,
    label: str,
    values: Sequence[float],
    *,
    target: tuple[str, float] | None = None,
    digits: int = 2,
    noisy: bool = False,
    note: str = "",
) -> dict[str, Any]:
    """One row of the table: the values of the repeats, and the target their median must meet.

    ``target`` is ``("<=", 1.25)``, ``(">=", 0.5)`` or ``("<", 2.0)``; None for a figure shown
    for context. ``noisy``: it moves by more than its margin between runs on a shared 2-core
    machine (say so next to it, rather than tune it).
    """
    clean = [float(v) for v in values if v == v]  # NaN (no data) left out
    mid = median(clean)
    passed = None
    if target is not None:
        op, limit = target
        passed = bool(clean) and {"<=": mid <= limit, "<": mid < limit, ">=": mid >= limit}[op]
    return {
        "key": key,
        "label": label,
        "values": [float(v) for v in values],
        "min": min(clean) if clean else float("nan"),
        "median": mid,
        "max": max(clean) if clean else float("nan"),
        "target": None if target is None else {"op": target[0], "value": target[1]},
        "pass": passed,
        "digits": digits,
        "noisy": noisy,
        "note": note,
    }


def http_client(url: str, **kwargs: Any) -> httpx.AsyncClient:
    """An httpx client that opens a failed connection again (three times) before giving up."""
    kwargs.setdefault("timeout", 60)
    return httpx.AsyncClient(base_url=url, transport=httpx.AsyncHTTPTransport(retries=3), **kwargs)


# -- /proc ---------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (10 ms resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def proc_memory(pid: int) -> dict[str, int]:
    """``rss`` and ``hwm`` (peak RSS) of process ``pid``, in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found["rss" if key == "VmRSS" else "hwm"] = int(value.split()[0]) * 1024
    return found


def proc_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- processes -----------------------------------------------------------------------------


class LineReader:
    """Lines from a process's stdout."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def readline(self) -> str:
        while b"\n" not in self._buffer:
            data = await self._stream.receive_some(65536)
            if not data:
                raise EOFError("the process closed its output")
            self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line.decode()


def _raise_child_fd_limit() -> None:  # runs in the child between fork and exec
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def stop(process: trio.Process, sig: int = signal.SIGTERM, grace: float = 10) -> None:
    """Ask ``process`` to stop with ``sig``; kill it if it has not exited within ``grace``.

    Shielded: it runs on the way out of a cancelled scope too.
    """
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.send_signal(sig)
            with trio.move_on_after(grace):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def child(
    command: list[str], *, log: Path, cwd: Path, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[trio.Process, LineReader]]:
    """Run ``command`` with piped stdin/stdout (stderr to ``log``); stop it on the way out."""
    with log.open("ab") as err:
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            preexec_fn=_raise_child_fd_limit,
        )
    assert process.stdout is not None
    try:
        yield process, LineReader(process.stdout)
    finally:
        await stop(process)
        with trio.CancelScope(shield=True):
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    await pipe.aclose()


class SimProcess:
    """The ComfyUI simulator process (``simproc.py``) and its control commands."""

    def __init__(self, process: trio.Process, lines: LineReader, port: int, workdir: Path):
        self.process = process
        self._lines = lines
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._workdir = workdir
        self._dumps = 0

    async def _command(self, line: str) -> str:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")
        return await self._lines.readline()

    async def go(self) -> None:
        """Start executing prompts (the simulator starts held with ``held=True``)."""
        await self._command("go")

    async def hold(self) -> None:
        """Stop taking prompts (the one running finishes); `go` starts again."""
        await self._command("hold")

    async def reset(self) -> None:
        """Forget executions, swaps and the loaded checkpoint (between two runs)."""
        await self._command("reset")

    async def dump(self) -> dict[str, Any]:
        """The execution log and swap counts so far."""
        self._dumps += 1
        path = self._workdir / f"sim-dump-{self._dumps}.json"
        await self._command(f"dump {path}")
        data: dict[str, Any] = json.loads(await trio.Path(path).read_text())
        return data


@contextlib.asynccontextmanager
async def simulator(
    workdir: Path,
    *,
    step_seconds: float,
    model_load_seconds: float,
    held: bool = False,
) -> AsyncIterator[SimProcess]:
    command = [
        PYTHON,
        str(BENCH / "simproc.py"),
        f"--step-seconds={step_seconds}",
        f"--model-load-seconds={model_load_seconds}",
    ]
    if held:
        command.append("--held")
    async with child(command, log=workdir / "simulator.log", cwd=workdir) as (process, lines):
        with trio.fail_after(30):
            line = await lines.readline()
        port = int(line.split()[1])
        yield SimProcess(process, lines, port, workdir)


class ServiceProcess:
    """A running ``fategen serve`` process."""

    def __init__(self, process: trio.Process, url: str, data_dir: Path) -> None:
        self.process = process
        self.url = url
        self.pid = process.pid
        self.data_dir = data_dir

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def memory(self) -> dict[str, int]:
        return proc_memory(self.pid)

    def fd_count(self) -> int:
        return proc_fd_count(self.pid)

    def finished_times(self) -> dict[str, float]:
        """Job id -> the store's ``finished`` time (epoch seconds), read from the job database."""
        with contextlib.closing(sqlite3.connect(self.data_dir / "jobs.sqlite3", timeout=10)) as db:
            rows = db.execute("SELECT id, finished FROM jobs WHERE finished IS NOT NULL")
            return {job_id: float(finished) for job_id, finished in rows}


def known_settings() -> set[str]:
    """The environment variables this fategen reads (a name it does not know is refused)."""
    from fategen.settings import KNOWN_VARIABLES

    return set(KNOWN_VARIABLES)


@contextlib.asynccontextmanager
async def service(
    workdir: Path,
    sim: SimProcess,
    *,
    max_passes: int | None = None,
    profile: Path | None = None,
    database: Path | None = None,
    ready_timeout: float = 30,
    **env: str,
) -> AsyncIterator[ServiceProcess]:
    """``python -m fategen serve`` against ``sim``, in a fresh data and output folder.

    ``max_passes`` (e.g. 0: fair order, no model affinity) runs the same CLI through
    ``serve_policy.py``, which only changes the policy's ``max_passes``. ``database``: a job
    database (`prefill.template`) copied in before the start, which the service loads. With
    ``profile``, py-spy samples the service while it runs and writes collapsed stacks there
    (and ``profile.with_suffix(".top.txt")``: the functions with the most samples).
    """
    run_dir = Path(tempfile.mkdtemp(prefix="service-", dir=workdir))
    settings = {
        "FATEGEN_HOST": "127.0.0.1",
        "FATEGEN_PORT": "0",
        "COMFYUI_ADDRESS": "127.0.0.1",
        "COMFYUI_PORT": str(sim.port),
        "FATEGEN_OUTPUT_DIR": str(run_dir / "output"),
        "FATEGEN_DATA_DIR": str(run_dir / "data"),
        "FATEGEN_MODEL_CONFIG": str(MODEL_CONFIG),
        "FATEGEN_WORKFLOWS_DIR": str(WORKFLOWS),
        "FATEGEN_SHUTDOWN_GRACE": "2",
        "FATEGEN_WAIT_TIMEOUT_MAX": "600",
        # A benchmark measures the service, never its queue caps.
        "FATEGEN_MAX_QUEUE": "1000000",
        "FATEGEN_MAX_QUEUE_PER_USER": "1000000",
        "LOG_LEVEL": "INFO",
    }
    if "FATEGEN_LISTEN_BACKLOG" in known_settings():
        settings["FATEGEN_LISTEN_BACKLOG"] = "4096"
    settings.update(env)
    if database is not None:
        from prefill import copy_into

        await trio.to_thread.run_sync(copy_into, database, run_dir / "data")
    if max_passes is None:
        command = [PYTHON, "-m", "fategen", "serve"]
    else:
        command = [PYTHON, str(BENCH / "serve_policy.py"), str(max_passes)]
    async with child(command, log=run_dir / "service.log", cwd=run_dir, env=settings) as (
        process,
        lines,
    ):
        with trio.fail_after(ready_timeout):
            while not (match := _READY.search(await lines.readline())):
                pass
        url = match.group(1)
        async with http_client(url) as client:
            with trio.fail_after(30):
                while True:  # polling another process: no event to wait on
                    if (await client.get("/health")).json()["comfyui"]["reachable"]:
                        break
                    await trio.sleep(0.05)
        if profile is None:
            yield ServiceProcess(process, url, run_dir / "data")
        else:
            async with py_spy(process.pid, profile, workdir):
                yield ServiceProcess(process, url, run_dir / "data")


@contextlib.asynccontextmanager
async def bare(workdir: Path, kind: str) -> AsyncIterator[ServiceProcess]:
    """A baseline endpoint (``bare.py quart`` or ``asgi``) in its own process."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"bare-{kind}-", dir=workdir))
    command = [PYTHON, str(BENCH / "bare.py"), kind]
    async with child(command, log=run_dir / "bare.log", cwd=run_dir) as (process, lines):
        with trio.fail_after(30):
            while not (match := _READY.search(await lines.readline())):
                pass
        yield ServiceProcess(process, match.group(1), run_dir)


@contextlib.asynccontextmanager
async def py_spy(pid: int, out: Path, workdir: Path) -> AsyncIterator[None]:
    """Sample process ``pid`` with py-spy (``PY_SPY`` or ``py-spy`` on PATH) while inside."""
    command = [
        os.environ.get("PY_SPY", "py-spy"),
        "record",
        f"--pid={pid}",
        f"--output={out}",
        "--format=raw",
        "--rate=250",
        "--nonblocking",
    ]
    with (workdir / "py-spy.log").open("ab") as log:
        process = await trio.lowlevel.open_process(command, stdout=log, stderr=log)
    try:
        await trio.sleep(0.5)  # py-spy attaches
        yield
    finally:
        await stop(process, signal.SIGINT)  # py-spy writes its output on SIGINT
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_write_top, out)


def _write_top(collapsed: Path) -> None:
    if collapsed.exists():
        collapsed.with_suffix(".top.txt").write_text(top_functions(collapsed.read_text()))


def top_functions(collapsed: str, n: int = 25) -> str:
    """The functions in the most samples (anywhere on the stack, and at the top) of py-spy's
    collapsed stacks."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    lines = [f"{total} samples", "", "inclusive:"]
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:n]:
        lines.append(f"{100 * count / total:5.1f}%  {frame}")
    lines += ["", "own:"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:n]:
        lines.append(f"{100 * count / total:5.1f}%  {frame}")
    return "\n".join(lines) + "\n"


async def wait_quiet(pid: int, *, below: float = 0.05, window: float = 0.3) -> None:
    """Return once process ``pid`` uses less than ``below`` of a CPU over ``window`` seconds."""
    while True:
        before = proc_cpu_seconds(pid)
        await trio.sleep(window)
        if proc_cpu_seconds(pid) - before < below * window:
            return


def machine_facts() -> dict[str, Any]:
    import platform

    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


# -- the lean load generator (rawload.py) ----------------------------------------------------


class LoadGen:
    """A running ``rawload.py`` process: connected and ready, waiting for `go`."""

    def __init__(self, process: trio.Process, out: Path, mode: str) -> None:
        self.process = process
        self._out = out
        self._mode = mode

    async def go(self) -> None:
        """Start the clock (modes ``closed`` and ``pairs`` wait for this)."""
        assert self.process.stdin is not None
        await self.process.stdin.send_all(b"go\n")

    async def result(self) -> dict[str, Any]:
        """Wait for the process to end; its report."""
        await self.process.wait()
        if self.process.returncode != 0:
            raise RuntimeError(
                f"the {self._mode} load generator exited with status "
                f"{self.process.returncode} (its log: rawload.log in the work folder)"
            )
        report: dict[str, Any] = json.loads(await trio.Path(self._out).read_text())
        return report


@contextlib.asynccontextmanager
async def rawload(
    workdir: Path, mode: str, url: str, *options: str, name: str, ready_timeout: float = 120
) -> AsyncIterator[LoadGen]:
    """Start ``rawload.py MODE URL OPTIONS`` and return once it has printed ``ready``."""
    out = workdir / f"{name}.json"
    command = [PYTHON, str(BENCH / "rawload.py"), mode, url, f"--out={out}", *options]
    async with child(command, log=workdir / "rawload.log", cwd=workdir) as (process, lines):
        with trio.fail_after(ready_timeout):
            await lines.readline()
        yield LoadGen(process, out, mode)
