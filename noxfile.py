"""Tasks: ``nox -s tests`` (the default), ``lint``, ``typecheck``, ``browser``, ``fuzz``,
``bench``."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False

PYTHON = ["3.11", "3.12", "3.13"]


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (unit, contract and end-to-end over real sockets); the tests in a
    real browser are ``nox -s browser``'s."""
    session.install("-e", ".[test]")
    session.run("pytest", "--ignore=tests/browser", *session.posargs)


@nox.session(default=False)
def browser(session: nox.Session) -> None:
    """The pages in a real headless Chromium: Debian's (``apt-get install chromium``; CI
    installs it), driven by Playwright's Python package. Playwright's own browser download
    is never used; FATEGEN_TEST_CHROMIUM names another Chromium."""
    session.install("-e", ".[test]", "playwright>=1.40")
    # Screenshots are kept (the artifacts of a CI run): each test's folder under it
    # (pytest makes the base folder itself, not its parent).
    Path("artifacts").mkdir(exist_ok=True)
    session.run("pytest", "tests/browser", "--basetemp=artifacts/browser", *session.posargs)


@nox.session(default=False)
def lint(session: nox.Session) -> None:
    """ruff (with flake8-async's rules) over the source and the tests, then the import
    layering contracts of pyproject.toml (import-linter: core < store | comfy < queue < api)."""
    session.install("ruff>=0.6", "import-linter>=2.1")
    session.run("ruff", "check", "src", "tests", "bench", "noxfile.py", *session.posargs)
    session.run("lint-imports", env={"PYTHONPATH": "src"})


@nox.session(default=False)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on src/."""
    session.install("-e", ".[test]", "mypy>=1.10", "sortedcontainers-stubs>=2.4")
    session.run("mypy", "src", *session.posargs)


@nox.session(default=False)
def fuzz(session: nox.Session) -> None:
    """Hypothesis fuzzing of the prompt parser and of POST /request with many examples
    (FUZZ_EXAMPLES, default 5000)."""
    session.install("-e", ".[test]")
    session.env.setdefault("FUZZ_EXAMPLES", "5000")
    session.run("pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py", *session.posargs)


@nox.session(default=False)
def schemathesis(session: nox.Session) -> None:
    """schemathesis against the live service's /openapi.json (fategen serve --simulate).

    Excluded checks, on purpose: ``positive_data_acceptance`` (a chat line's grammar cannot be
    said in JSON Schema, so schema-valid bodies are often refused with 400) and
    ``use_after_free`` (DELETE cancels a job; the cancelled job stays readable).
    """
    session.install("-e", ".", "schemathesis>=4")
    args = session.posargs or ["--max-examples", "200"]
    session.run(
        "python",
        "bench/schemathesis_run.py",
        "--exclude-checks",
        "positive_data_acceptance,use_after_free",
        *args,
    )


@nox.session(default=False)
def soak(session: nox.Session) -> None:
    """A bounded soak with random simulator faults (SOAK_SECONDS, default 120); writes
    bench/soak-results.json and fails if any job is lost."""
    session.install("-e", ".")
    session.run("python", "bench/soak.py", *session.posargs)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """The benchmark suite against the ComfyUI simulator (about 12 minutes on 2 cores; ``--
    --quick`` under 2): prints a table of ratios with their spread and targets, and writes
    bench/results.json as each scenario ends. ``-- --only throughput`` runs one scenario;
    ``-- --strict`` exits 1 on a missed target; ``-- --profile DIR`` also samples the service
    with py-spy (installed here)."""
    session.install("-e", ".")
    if "--profile" in session.posargs:
        session.install("py-spy")
    session.run("python", "bench/run.py", *session.posargs)
