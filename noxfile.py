"""Tasks: ``nox -s tests`` (the default), ``lint``, ``typecheck``, ``fuzz``, ``bench``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False

PYTHON = ["3.11", "3.12", "3.13"]


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (unit, contract and end-to-end over real sockets)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(default=False)
def lint(session: nox.Session) -> None:
    """ruff (with flake8-async's rules) over the source and the tests."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "src", "tests", "noxfile.py", *session.posargs)


@nox.session(default=False)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on src/."""
    session.install("-e", ".[test]", "mypy>=1.10")
    session.run("mypy", "src", *session.posargs)
