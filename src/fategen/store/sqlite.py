"""The job database: SQLite in WAL mode, one connection, one writer, called from worker threads.

Trio runs each ``to_thread.run_sync`` call on whichever worker thread is free, so the one
connection is opened with ``check_same_thread=False`` and every call holds a `trio.Lock`.
The schema is versioned with ``PRAGMA user_version``; `MIGRATIONS` brings an older file up.

Durable writes, grouped: ``synchronous=FULL`` makes each commit fsync the WAL, so a write
`JobDB.write` returned from survives an OS crash or a power loss, not only a killed process.
An fsync costs about as much as hundreds of statements, so writes are committed in groups:
the writes that arrive while a commit is in flight wait, and go together into the next
transaction (one fsync), each in a SAVEPOINT of its own so that one failing write (the unique
Idempotency-Key index, a broken job) fails alone. Each caller returns once the commit that
holds its write has returned; writes are applied in the order they were called.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from fategen.core.webhooks import DeliveryState
from fategen.errors import ConfigError
from fategen.store.model import FINISHED_STATUSES, Job, JobStatus, job_from_body, job_to_row

T = TypeVar("T")

log = logging.getLogger("fategen.db")

SCHEMA_VERSION = 5

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
    # Finished jobs by when they finished: the most recent ones (loaded at start-up) and the
    # expired ones (pruned) are found without a scan.
    4: """
    CREATE INDEX jobs_finished ON jobs (finished) WHERE finished IS NOT NULL;
    """,
    # The webhook outbox: a delivery is written in the same commit as the job change it
    # tells of, so a crash loses none; the pending ones are found by when they are due.
    5: """
    CREATE TABLE deliveries (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        event TEXT NOT NULL,
        url TEXT NOT NULL,
        key_name TEXT,
        payload TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        next_at REAL,
        last_status INTEGER,
        last_error TEXT,
        delivered REAL
    );
    CREATE INDEX deliveries_due ON deliveries (next_at) WHERE state = 'pending';
    CREATE INDEX deliveries_job ON deliveries (job_id);
    """,
}

_DELIVERY_COLUMNS = (
    "id, job_id, event, url, state, attempts, next_at, last_status, last_error, delivered"
)


def _delivery(row: tuple[Any, ...]) -> DeliveryState:
    return DeliveryState(*row)


@attrs.frozen
class Outgoing:
    """A delivery with what it sends: its state, the key it belongs to, and its JSON body."""

    state: DeliveryState
    key_name: str | None
    payload: str


#: The statuses of finished jobs, as SQL (``status IN (...)``).
_FINISHED_SQL = ", ".join(f"'{status.value}'" for status in FINISHED_STATUSES)


@attrs.define(eq=False)
class _Write:
    """One queued write: ``fn(*args)`` runs in the group's transaction; ``then`` (if any) on
    the event loop once that transaction committed, in the order the writes were queued."""

    fn: Callable[..., object]
    args: tuple[Any, ...]
    then: Callable[[], object] | None
    #: Set when the write's outcome is known, or when it is its turn to lead a commit.
    woken: trio.Event = attrs.field(factory=trio.Event)
    lead: bool = False
    error: BaseException | None = None


@attrs.frozen
class DBStatistics:
    """A snapshot of `JobDB.statistics`."""

    #: Transactions committed by `JobDB.write` (one per group, plus one per write of a group
    #: that had to be applied one by one).
    commits: int
    #: Writes applied (or refused) through `JobDB.write`.
    writes: int
    #: The largest group committed at once.
    largest_group: int
    #: Groups whose commit failed and were applied one write per transaction instead.
    fallbacks: int
    #: Writes waiting for the next commit now.
    pending: int


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
            # Every commit fsyncs the WAL: an acknowledged job survives a power loss.
            self._conn.execute("PRAGMA synchronous=FULL")
        except BaseException:
            self._conn.close()
            raise
        self._lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(1)
        #: Writes waiting for the next group commit, in the order they were called.
        self._pending: list[_Write] = []
        #: True while some task leads a group commit (the others wait for it).
        self._committing = False
        self._commits = 0
        self._writes = 0
        self._largest_group = 0
        self._fallbacks = 0

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
        """Run a blocking method (a read, or a write of its own in autocommit) in a thread."""
        async with self._lock:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def write(
        self, fn: Callable[..., object], *args: Any, then: Callable[[], object] | None = None
    ) -> None:
        """Apply the blocking write ``fn(*args)`` (`insert`, `save`, `delete`) in the next
        group commit, and return once that commit returned: the write is on disk.

        ``then`` is called on the event loop right after the commit, before any later write's
        ``then``, and only if this write succeeded: the caller's view of memory changes in
        the order the writes reached the disk, whatever order the waiting tasks wake in.

        Once called, the write happens (or fails) even if the caller is cancelled meanwhile:
        the wait is shielded, so that no caller is left not knowing whether it is on disk.

        Raises:
            sqlite3.Error (or whatever ``fn`` raised): this write failed and changed nothing;
            the other writes of its group are not affected.
        """
        write = _Write(fn, args, then)
        self._pending.append(write)
        with trio.CancelScope(shield=True):
            if self._committing:
                await write.woken.wait()
            else:
                self._committing = True
                write.lead = True
            if write.lead:
                await self._commit_pending()
        if write.error is not None:
            raise write.error

    async def _commit_pending(self) -> None:
        """Commit every write queued so far (the leader's own among them), release their
        callers, and hand the lead to the first write queued meanwhile."""
        batch: list[_Write] = []
        try:
            async with self._lock:
                # Taken only now: the writes queued while waiting for the lock join in.
                batch, self._pending = self._pending, []
                await trio.to_thread.run_sync(self._commit, batch, limiter=self._limiter)
            for write in batch:
                if write.error is None and write.then is not None:
                    try:
                        write.then()
                    except Exception as exc:  # a bug: the write is on disk, memory is not
                        log.exception("applying a committed write failed")
                        write.error = exc
        except BaseException as exc:  # the thread call itself failed (not a database error)
            for write in batch:
                if write.error is None:
                    write.error = exc
            raise
        finally:
            for write in batch:
                write.woken.set()
            if self._pending:
                following = self._pending[0]
                following.lead = True
                following.woken.set()
            else:
                self._committing = False

    def statistics(self) -> DBStatistics:
        return DBStatistics(
            commits=self._commits,
            writes=self._writes,
            largest_group=self._largest_group,
            fallbacks=self._fallbacks,
            pending=len(self._pending),
        )

    def close(self) -> None:
        self._conn.close()

    # -- group commit (in the thread) ----------------------------------------------------
    def _commit(self, batch: list[_Write]) -> None:
        """One transaction for the whole group, a SAVEPOINT per write; if the transaction
        itself fails (the disk is full, I/O), each write again in a transaction of its own."""
        conn = self._conn
        self._writes += len(batch)
        self._largest_group = max(self._largest_group, len(batch))
        try:
            conn.execute("BEGIN IMMEDIATE")
            for write in batch:
                conn.execute("SAVEPOINT write")
                try:
                    write.fn(*write.args)
                except Exception as exc:
                    write.error = exc
                    conn.execute("ROLLBACK TO write")
                conn.execute("RELEASE write")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.warning(
                "a group of %d write(s) failed to commit (%s); applying them one by one",
                len(batch),
                exc,
            )
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._fallbacks += 1
            for write in batch:
                write.error = None
                self._commit_one(write)
        else:
            self._commits += 1

    def _commit_one(self, write: _Write) -> None:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            write.fn(*write.args)
            conn.execute("COMMIT")
        except Exception as exc:
            write.error = exc
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("rolling back a failed write failed")
        else:
            self._commits += 1

    # -- blocking operations -------------------------------------------------------------
    # `insert`, `save` and `delete` start no transaction of their own: `write` runs them in
    # its group's (`run` would run them each in autocommit).
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
        ids = [(i,) for i in job_ids]
        self._conn.executemany("DELETE FROM jobs WHERE id = ?", ids)
        self._conn.executemany("DELETE FROM deliveries WHERE job_id = ?", ids)

    def save_with_deliveries(self, job: Job, deliveries: list[Outgoing]) -> None:
        """The job's change and the webhook deliveries telling of it, in one transaction."""
        self.save(job)
        self._conn.executemany(
            "INSERT INTO deliveries (id, job_id, event, url, key_name, payload, state,"
            " attempts, next_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?)",
            [
                (
                    d.state.id,
                    d.state.job_id,
                    d.state.event,
                    d.state.url,
                    d.key_name,
                    d.payload,
                    d.state.next_at,
                )
                for d in deliveries
            ],
        )

    def record_attempt(self, state: DeliveryState) -> None:
        """A delivery's attempt and what is next (autocommit: run it through `run`)."""
        self._conn.execute(
            "UPDATE deliveries SET state = ?, attempts = ?, next_at = ?, last_status = ?,"
            " last_error = ?, delivered = ? WHERE id = ?",
            (
                state.state,
                state.attempts,
                state.next_at,
                state.last_status,
                state.last_error,
                state.delivered,
                state.id,
            ),
        )

    def deliveries_of(self, job_id: str) -> list[DeliveryState]:
        rows = self._conn.execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE job_id = ? ORDER BY rowid",
            (job_id,),
        ).fetchall()
        return [_delivery(row) for row in rows]

    def due_deliveries(self, before: float, limit: int) -> list[Outgoing]:
        """Pending deliveries due before ``before``, soonest first (an index range)."""
        rows = self._conn.execute(
            f"SELECT {_DELIVERY_COLUMNS}, key_name, payload FROM deliveries"
            " WHERE state = 'pending' AND next_at <= ? ORDER BY next_at LIMIT ?",
            (before, limit),
        ).fetchall()
        return [Outgoing(_delivery(row[:10]), row[10], row[11]) for row in rows]

    def next_due(self) -> float | None:
        """When the soonest pending delivery is due (None: none is pending)."""
        row = self._conn.execute(
            "SELECT min(next_at) FROM deliveries WHERE state = 'pending'"
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def list_ids(
        self,
        status: str,
        before_seq: int | None,
        limit: int,
        nick: str | None,
        model: str | None,
    ) -> list[tuple[str, int]]:
        """Ids (and seqs) of jobs in ``status``, newest first, below ``before_seq``: a page,
        read off the (status, seq) index (a model filter reads the bodies of that range)."""
        sql = "SELECT id, seq FROM jobs WHERE status = ?"
        args: list[Any] = [status]
        if before_seq is not None:
            sql += " AND seq < ?"
            args.append(before_seq)
        if nick is not None:
            sql += " AND nick = ?"
            args.append(nick)
        if model is not None:
            sql += " AND json_extract(body, '$.request.model') = ?"
            args.append(model)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit)
        return [(str(i), int(q)) for i, q in self._conn.execute(sql, args).fetchall()]

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
        """Every job, in sequence order (for tests and tools: the service never holds all)."""
        rows = self._conn.execute("SELECT body FROM jobs ORDER BY seq").fetchall()
        return [job_from_body(body) for (body,) in rows]

    def load_held(self, recent: int) -> tuple[list[Job], list[Job], int]:
        """What the store holds after a restart, in one call: `load_unfinished`,
        `load_recent_finished` (``recent`` of them) and `max_seq`."""
        return self.load_unfinished(), self.load_recent_finished(recent), self.max_seq()

    def load_unfinished(self) -> list[Job]:
        """The queued and processing jobs, in sequence order."""
        rows = self._conn.execute(
            f"SELECT body FROM jobs WHERE status NOT IN ({_FINISHED_SQL}) ORDER BY seq"
        ).fetchall()
        return [job_from_body(body) for (body,) in rows]

    def load_recent_finished(self, limit: int) -> list[Job]:
        """The ``limit`` finished jobs that finished last, the latest last."""
        rows = self._conn.execute(
            # INDEXED BY: by status, the planner would sort every finished job.
            "SELECT body FROM jobs INDEXED BY jobs_finished WHERE finished IS NOT NULL"
            f" AND status IN ({_FINISHED_SQL}) ORDER BY finished DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [job_from_body(body) for (body,) in reversed(rows)]

    def max_seq(self) -> int:
        """The highest sequence number given so far (0 without jobs): one index probe per
        status, not a scan."""
        statuses = [status.value for status in JobStatus]
        parts = " UNION ALL ".join(
            "SELECT max(seq) AS m FROM jobs WHERE status = ?" for _ in statuses
        )
        (highest,) = self._conn.execute(f"SELECT max(m) FROM ({parts})", statuses).fetchone()
        return int(highest or 0)

    def has(self, job_id: str) -> bool:
        """Whether a job of this id is stored (a primary-key probe)."""
        return (
            self._conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None
        )

    def get(self, job_id: str) -> Job | None:
        row = self._conn.execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else job_from_body(row[0])

    def by_idempotency_key(self, nick: str, key_name: str | None, key: str) -> Job | None:
        """The job ``nick`` sent through API key ``key_name`` with Idempotency-Key ``key``
        (the unique index's own expression, so the lookup is an index probe)."""
        row = self._conn.execute(
            "SELECT body FROM jobs WHERE nick = ?"
            " AND coalesce(json_extract(body, '$.key_name'), '') = ? AND idempotency_key = ?",
            (nick, key_name or "", key),
        ).fetchone()
        return None if row is None else job_from_body(row[0])

    def expired(self, before: float, limit: int) -> list[str]:
        """Up to ``limit`` ids of finished jobs that finished before ``before``, oldest first."""
        rows = self._conn.execute(
            "SELECT id FROM jobs INDEXED BY jobs_finished WHERE finished IS NOT NULL"
            f" AND finished < ? AND status IN ({_FINISHED_SQL}) ORDER BY finished LIMIT ?",
            (before, limit),
        ).fetchall()
        return [job_id for (job_id,) in rows]

    def last_served(self) -> list[Job]:
        """For each nick, the finished job it was last served (submitted to ComfyUI or
        started) with: what the scheduler's turns need after a restart, without loading
        every finished job. One scan of the table, once at start-up."""
        rows = self._conn.execute(
            "SELECT body, max(coalesce(json_extract(body, '$.submitted'),"
            " json_extract(body, '$.started'))) AS served"
            f" FROM jobs WHERE status IN ({_FINISHED_SQL})"
            " GROUP BY nick HAVING served IS NOT NULL"
        ).fetchall()
        return [job_from_body(body) for body, _ in rows]
