"""The job database: SQLite in WAL mode, one connection, one writer, called from worker threads.

Trio runs each ``to_thread.run_sync`` call on whichever worker thread is free, so the one
connection is opened with ``check_same_thread=False`` and every call holds a `trio.Lock`.
The schema is versioned with ``PRAGMA user_version``; `MIGRATIONS` brings an older file up.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from fategen.errors import ConfigError
from fategen.store.model import Job, job_from_body, job_to_row

T = TypeVar("T")

SCHEMA_VERSION = 3

MIGRATIONS: dict[int, str] = {
    # version -> SQL that brings a database at version-1 up to it.
    1: """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        nick TEXT NOT NULL,
        status TEXT NOT NULL,
        created REAL NOT NULL,
        finished REAL,
        idempotency_key TEXT,
        body TEXT NOT NULL
    );
    CREATE INDEX jobs_status ON jobs (status, seq);
    CREATE UNIQUE INDEX jobs_idempotency ON jobs (nick, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    """,
    # Small facts that outlive a restart (the ComfyUI client id).
    2: """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # An Idempotency-Key belongs to a nick within its API key (the job body's key_name).
    3: """
    DROP INDEX jobs_idempotency;
    CREATE UNIQUE INDEX jobs_idempotency
        ON jobs (nick, coalesce(json_extract(body, '$.key_name'), ''), idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    """,
}


class JobDB:
    """Blocking methods (run them through `run`) on one SQLite connection."""

    def __init__(self, path: Path | None) -> None:
        self._path = ":memory:" if path is None else str(path)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(
            self._path, check_same_thread=False, isolation_level=None, timeout=10
        )
        try:
            self._migrate()
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            self._conn.close()
            raise
        self._lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(1)

    def _migrate(self) -> None:
        (version,) = self._conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"the job database {self._path} is from a newer fategen "
                f"(schema {version}, this release knows {SCHEMA_VERSION})"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {target}")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._lock:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def close(self) -> None:
        self._conn.close()

    # -- blocking operations -------------------------------------------------------------
    def insert(self, job: Job) -> None:
        self._conn.execute(
            "INSERT INTO jobs (id, seq, nick, status, created, finished, idempotency_key, body)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            job_to_row(job),
        )

    def save(self, job: Job) -> None:
        self._conn.execute(
            "UPDATE jobs SET seq = ?, nick = ?, status = ?, created = ?, finished = ?,"
            " idempotency_key = ?, body = ? WHERE id = ?",
            (*job_to_row(job)[1:], job.id),
        )

    def delete(self, job_ids: list[str]) -> None:
        self._conn.execute("BEGIN")
        try:
            self._conn.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in job_ids])
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def get_meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def load_all(self) -> list[Job]:
        rows = self._conn.execute("SELECT body FROM jobs ORDER BY seq").fetchall()
        return [job_from_body(body) for (body,) in rows]
