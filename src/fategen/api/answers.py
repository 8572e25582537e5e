"""Answering many long-polls of one job cheaply and without holding the event loop.

When a job finishes, every ``/wait`` of it answers with the same state. Building that answer
(`job_response`, then quart-schema's conversion and the JSON encoding) is most of a waiter's
cost; `JobAnswers` keeps the body built for each job's last state (and base URL), so the
waiters after the first send the same bytes. And at most `ANSWER_BATCH` answers are built
between two looks at I/O (`JobAnswers.turn`): the store wakes the waiters of a change in
batches too, but thousands whose timeouts end at the same instant are woken together.
"""

from __future__ import annotations

import collections
from typing import cast

import trio
from quart import Response, current_app, request
from quart_trio import QuartTrio

from fategen.api.common import job_response, state
from fategen.store.jobs import JobView

__all__ = ["ANSWERS_HELD", "ANSWER_BATCH", "JobAnswers", "answers", "job_answer"]

#: The key of `JobAnswers` in ``app.extensions``.
EXTENSION = "fategen.answers"
#: Jobs whose last answer is kept (the least recently answered go first).
ANSWERS_HELD = 1024
#: Long-poll answers built at once; the others wait their turn (a scheduler round or so).
ANSWER_BATCH = 32


#: What `fategen.api.common.base_url` is made of: the public URL, or the request's scheme,
#: host and root path (reading ``request.host_url`` itself costs more than a cached answer).
BaseKey = str | tuple[str, str, str]


class JobAnswers:
    """The last answer body of each job (by its state and base URL), and the turns."""

    def __init__(self, held: int = ANSWERS_HELD, batch: int = ANSWER_BATCH) -> None:
        self._held = held
        self._bodies: collections.OrderedDict[str, tuple[JobView, BaseKey, bytes]] = (
            collections.OrderedDict()
        )
        #: Answers being built now (`ANSWER_BATCH` at most).
        self.turn = trio.CapacityLimiter(batch)
        #: Bodies built, and bodies reused (for tests and diagnostics).
        self.built = 0
        self.reused = 0

    def body(self, view: JobView, base: BaseKey) -> bytes | None:
        """The body built for exactly this state of the job and base URL, if any."""
        found = self._bodies.get(view.id)
        if found is None or found[1] != base or found[0] != view:
            return None
        self._bodies.move_to_end(view.id)
        self.reused += 1
        return found[2]

    def keep(self, view: JobView, base: BaseKey, body: bytes) -> None:
        self._bodies[view.id] = (view, base, body)
        self._bodies.move_to_end(view.id)
        self.built += 1
        while len(self._bodies) > self._held:
            self._bodies.popitem(last=False)


def install(app: QuartTrio) -> None:
    app.extensions[EXTENSION] = JobAnswers()


def answers() -> JobAnswers:
    """The `JobAnswers` of the app answering the current request."""
    return cast(JobAnswers, current_app.extensions[EXTENSION])


async def job_answer(view: JobView, status: int) -> Response:
    """``view`` as a `JobResponse` JSON answer, byte for byte what quart-schema makes of
    ``(job_response(view), status)``, built once per state of the job."""
    cache = answers()
    base = state().settings.public_url or (request.scheme, request.host, request.root_path)
    body = cache.body(view, base)
    if body is None:
        # quart-schema's make_response takes the attrs model (`validate_response` hands it on).
        built = await current_app.make_response(job_response(view))  # type: ignore[arg-type]
        body = await cast(Response, built).get_data(as_text=False)
        cache.keep(view, base, body)
    return current_app.response_class(body, status=status, mimetype="application/json")
