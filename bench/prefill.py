"""Job databases made before the service starts: 100,000 jobs through HTTP would take minutes.

`make_db` writes ``jobs`` jobs for ``nicks`` users (round robin: every user has the same share,
in submission order) with the store's own code (`fategen.store.sqlite.JobDB`,
`fategen.store.model.Job`), so the service loads them at start-up as it would after a restart.
``status="queued"`` makes a queue; ``status="completed"`` makes finished jobs (finished over the
last hours, well inside the retention period, so none is pruned). One file per shape is made
once (`template`); each service gets its own copy.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import attrs
from common import MODEL_CONFIG, WORKFLOWS

from fategen.core.modelconfig import load_model_config
from fategen.core.prompt import parse_request
from fategen.core.workflow import load_templates
from fategen.store.model import Job, JobStatus
from fategen.store.sqlite import JobDB

DB_NAME = "jobs.sqlite3"


def make_db(path: Path, *, jobs: int, nicks: int, status: str = "queued") -> None:
    templates = load_templates(WORKFLOWS)
    config = load_model_config(MODEL_CONFIG, templates=frozenset(templates))
    message = "a prefilled job -m tiny -c 1"
    request = parse_request(message, config)
    now = time.time()
    finished = JobStatus(status).finished
    db = JobDB(path)
    try:
        # One transaction: the store's insert, without a commit per job.
        conn = db._conn
        conn.execute("BEGIN")
        for i in range(jobs):
            created = now - 3 * 3600 * (jobs - i) / jobs  # the last three hours, in order
            job = Job(
                id=str(uuid.uuid4()),
                nick=f"user{i % nicks}",
                message=message,
                request=attrs.evolve(request, seed=i),
                seq=i + 1,
                status=JobStatus(status),
                created=created,
            )
            if finished:
                job.started = job.first_started = created + 1
                job.generated = job.finished = created + 2
                job.attempts = 1
                job.result = f"{job.id}.webp"
            db.insert(job)
        conn.execute("COMMIT")
    finally:
        db.close()


def template(workdir: Path, *, jobs: int, nicks: int, status: str = "queued") -> Path:
    """The database of that shape, made on first use in ``workdir/prefill``."""
    path = workdir / "prefill" / f"{status}-{jobs}-{nicks}" / DB_NAME
    if not path.exists():
        make_db(path, jobs=jobs, nicks=nicks, status=status)
    return path


def copy_into(template_path: Path, data_dir: Path) -> None:
    """Put a copy of the database (and any WAL beside it) in ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        source = template_path.with_name(template_path.name + suffix)
        if source.exists():
            shutil.copyfile(source, data_dir / source.name)
