"""The job store, the one source of truth for job state: jobs in memory, every change written
to SQLite first (`sqlite`), and retention of finished jobs.

May import `fategen.core` and `fategen.errors`; never the ComfyUI link, the queue or the API.
"""
