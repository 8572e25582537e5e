"""Serving the app: hypercorn's HTTP machinery under an accept loop of our own.

hypercorn's trio worker hands each connection to ``trio.serve_listeners``, where an exception
escaping one connection's task ends the whole server (hypercorn issue #203: a malformed chunked
request makes hypercorn send an error response while its own close holds the socket, and the
``trio.BusyResourceError`` takes the process down). It also retries ``accept`` on ``EMFILE``
ten times a second with a traceback each time, and takes connections without limit until the
process has no file descriptor left for ComfyUI or the database. So `serve_http` runs
hypercorn's lifespan and protocol code (`IsolatedTCPServer`) under its own accept loop:

* each connection's task is isolated: whatever it raises ends that connection only, and is
  logged in one line (rate-limited: a hostile client cannot fill the log);
* at most ``max_connections`` client connections are open at once; beyond that new
  connections wait in the listen backlog until one closes;
* ``EMFILE`` and its kin are logged once per `CAPACITY_LOG_INTERVAL`, not per ``accept``;
* the listen backlog is ``backlog`` (`DEFAULT_BACKLOG`), not hypercorn's 100: with 100, a
  burst of thousands of clients waits out SYN retries (seconds) instead of being queued.

`install_connection_isolation` gives plain ``hypercorn --worker-class trio`` deployments the
isolation too (they keep hypercorn's own accept loop).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection

from fategen.errors import ConfigError

log = logging.getLogger("fategen.http")

#: How long the last write of a response (and hypercorn's close after it) may take.
_FINAL_SEND_SECONDS = 10.0
#: ``accept`` errors that mean "out of resources, try again later" (as trio's serve_listeners).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: Seconds between two log lines about the same kind of trouble.
CAPACITY_LOG_INTERVAL = 60.0
#: Seconds to wait before accepting again after ``EMFILE`` (as trio's serve_listeners).
_ACCEPT_RETRY_SECONDS = 0.1
#: Connections the kernel holds until they are accepted (``FATEGEN_LISTEN_BACKLOG``'s default).
DEFAULT_BACKLOG = 4096


class ClosingHTTPConnection(TrioASGIHTTPConnection):
    """quart-trio's HTTP connection, with the last send of each response shielded.

    Works around hypercorn issue #106 (pgjones/hypercorn): with ``Connection: close`` or
    HTTP/1.0, hypercorn closes the socket from inside the app's final ``send``, after passing
    ``http.disconnect`` to the app; quart-trio then cancels its request nursery, and that
    cancellation interrupts hypercorn's ``send_eof`` before ``aclose``, so the socket stays
    open until the read timeout. Shielding the final send lets the close finish. It lives in
    the app (`fategen.api.app.create_app` installs it), so it holds under ``fategen serve``
    and under plain ``hypercorn --worker-class trio`` alike.
    """

    async def __call__(self, receive: Any, send: Any) -> None:
        async def send_last_shielded(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.move_on_after(_FINAL_SEND_SECONDS, shield=True):
                    await send(message)
            else:
                await send(message)

        await super().__call__(receive, send_last_shielded)


class RateLimitedLog:
    """Logs a kind of event at most once per ``interval`` seconds (trio's clock), saying how
    many were not logged in between."""

    def __init__(self, logger: logging.Logger, interval: float = CAPACITY_LOG_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def note(self, kind: str, level: int, message: str, *args: object) -> bool:
        """Log ``message % args`` unless ``kind`` was logged less than ``interval`` ago;
        True when it was logged."""
        now = trio.current_time()
        last = self._last.get(kind)
        # (A clock behind the last report is another trio run's: start afresh.)
        if last is not None and 0 <= now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._last[kind] = now
        skipped = self._suppressed.pop(kind, 0)
        if skipped:
            message += " (%d more like it since the last report)"
            args = (*args, skipped)
        self.logger.log(level, message, *args)
        return True


#: One rate limit for connection failures, shared by every server in the process.
_connection_log = RateLimitedLog(log)


class IsolatedTCPServer(TCPServer):
    """hypercorn's connection handler, with three fixes.

    * ``run`` never raises (but for cancellation): a failure inside the connection, a
      protocol error or a bug in a dependency, ends that connection only and is logged.
    * ``_close`` takes the send lock around ``send_eof``, which otherwise holds the socket
      across a checkpoint while an error response is sent: the cause of hypercorn #203.
    * once the client has closed, the keep-alive timer stops, so the connection ends then,
      not ``keep_alive_timeout`` seconds later.
    """

    async def run(self) -> None:
        try:
            await super().run()
        except* Exception as group:
            first = group.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            _connection_log.note(
                "connection-failed",
                logging.WARNING,
                "a client connection failed and was closed: %s: %s",
                type(first).__name__,
                first,
            )
            log.debug("the connection failure in full", exc_info=group)

    async def _read_data(self) -> None:
        await super()._read_data()
        # The client has gone (or will send no more): its keep-alive timer has nothing left to
        # time. Left running, it holds the finished connection's task, descriptor and slot
        # for the whole keep_alive_timeout after the client closed.
        await self.idle_task.stop()

    async def _close(self) -> None:
        lock = self.send_lock
        if lock.statistics().owner is trio.lowlevel.current_task():
            await super()._close()
            return
        async with lock:
            await super()._close()


def install_connection_isolation() -> None:
    """Make plain ``hypercorn --worker-class trio`` run connections in `IsolatedTCPServer`.

    hypercorn's trio worker looks its handler class up in ``hypercorn.trio.run`` when it
    starts serving; under ``fategen serve`` `serve_http` uses `IsolatedTCPServer` directly.
    """
    hypercorn_run.TCPServer = IsolatedTCPServer  # type: ignore[attr-defined]


async def _accept_forever(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    handler_nursery: trio.Nursery,
    slots: trio.Semaphore,
) -> None:
    """Accept connections while a slot is free; each runs ``handler`` and frees its slot."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        finally:
            slots.release()

    while True:
        await slots.acquire()
        try:
            stream = await listener.accept()
        except OSError as exc:
            slots.release()
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            _connection_log.note(
                "accept-capacity",
                logging.ERROR,
                "cannot accept connections: %s; new clients wait until descriptors free up",
                exc.strerror or exc,
            )
            await trio.sleep(_ACCEPT_RETRY_SECONDS)
            continue
        handler_nursery.start_soon(handle, stream)


def make_config(
    host: str,
    port: int,
    *,
    graceful_timeout: float,
    read_timeout: float,
    keep_alive_timeout: float,
    backlog: int = DEFAULT_BACKLOG,
) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.backlog = backlog
    config.accesslog = None
    # hypercorn's own messages through the process's logging, once (a name string makes
    # hypercorn add a second handler of its own: every line twice).
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = graceful_timeout
    config.keep_alive_timeout = keep_alive_timeout
    config.read_timeout = read_timeout  # type: ignore[assignment]  # typed int, any float works
    config.h11_max_incomplete_size = 16 * 1024
    return config


async def serve_http(
    app: QuartTrio,
    host: str,
    port: int,
    shutdown_trigger: Callable[[], Awaitable[None]],
    *,
    graceful_timeout: float = 5.0,
    read_timeout: float = 30.0,
    keep_alive_timeout: float = 75.0,
    max_connections: int = 10_000,
    backlog: int = DEFAULT_BACKLOG,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` over HTTP (hypercorn's h11 and h2 protocols) until ``shutdown_trigger``
    returns, then stop gracefully: idle keep-alive connections close at once, the others get
    ``graceful_timeout`` seconds.

    Reports the bound URLs (so port 0 works) through ``task_status``. Mirrors hypercorn's
    ``trio.run.worker_serve`` (lifespan, listeners, graceful stop) with the accept loop and
    connection handler described in the module's docstring.

    Args:
        read_timeout: a connection that sends nothing for this long (say, a client sending
            its headers very slowly) is closed. hypercorn applies it to each read, not to the
            whole request head, so it bounds idle silence, not total header time.
        keep_alive_timeout: an idle keep-alive connection is closed after this long.
        max_connections: client connections open at once; more wait in the listen backlog.
        backlog: connections the kernel completes and holds until they are accepted (each
            listening socket's ``listen(backlog)``; Linux caps it at ``net.core.somaxconn``).
    """
    config = make_config(
        host,
        port,
        graceful_timeout=graceful_timeout,
        read_timeout=read_timeout,
        keep_alive_timeout=keep_alive_timeout,
        backlog=backlog,
    )
    config.set_statsd_logger_class(StatsdLogger)
    asgi = wrap_app(app, config.wsgi_max_body_size, None)
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(asgi, config, lifespan_state)
    context = WorkerContext(None)
    slots = trio.Semaphore(max_connections)

    async def handler(stream: trio.SocketStream) -> None:
        server = IsolatedTCPServer(
            asgi,
            config,
            context,
            ConnectionState(lifespan_state.copy()),
            stream,  # type: ignore[arg-type]  # hypercorn types it SSLStream, takes both
        )
        await server.run()

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            try:
                sockets = config.create_sockets()
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                    + (" (another program uses that port)" if exc.errno == errno.EADDRINUSE else "")
                ) from None
            listeners = []
            binds = []
            for sock in sockets.insecure_sockets:
                sock.listen(config.backlog)
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                bind = repr_socket_addr(sock.family, sock.getsockname())
                binds.append(f"http://{bind}")
                await config.log.info(f"Running on http://{bind} (CTRL + C to quit)")
            task_status.started(binds)
            try:
                async with trio.open_nursery() as accepting:
                    for listener in listeners:
                        accepting.start_soon(
                            _accept_forever, listener, handler, server_nursery, slots
                        )
                    await shutdown_trigger()
                    accepting.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    for listener in listeners:
                        await listener.aclose()
                    await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
