"""``fategen irc``: an IRC bot that turns ``!img`` lines into fategen jobs.

It speaks IRC through the sans-I/O libraries ``irctokens`` (lines) and ``ircstates`` (what the
server said: the bot's nick and hostmask, its channels) over a trio stream, TLS optional, and
fategen through `fategen.client.AsyncClient`, with the bot's API key and the sender's nick::

    <alice> !img a red fox -m tiny -w 256 -h 256
    <fategen> alice: queued, position 1 (job 3f2a9c1e)
    <fategen> alice: started
    <fategen> alice: done http://127.0.0.1:8000/job/3f2a9c1e-.../image

``!cancel [job]`` and ``!status [job]`` take a job id, or its first characters as the bot
showed them, and default to the sender's latest job; so do ``!upscale [job] [N] [overrides]``
and ``!vary [job] [N] [overrides]`` (image N of it, 1 by default; ``!vary 2 --strength 0.3``),
queued as ``--upscale``/``--vary`` follow-ups; ``!help`` lists the commands.

The pieces: `IrcConfig` (read once by the command line); `fit` (a reply cut into lines that
stay within IRC's 512 bytes once the server has put the bot's prefix before them);
`Throttle` (flood control); `_Link` (one connection); `_Desk` (the fategen side: commands,
and a task per job that follows its event stream); `IrcBot` (connects, registers, joins,
and reconnects with backoff). Replies wait in a bounded outbox, so a job that ends while the
bot is away is announced once it is back.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import NoReturn

import attrs
import trio
from ircstates.server import Server as ServerState
from irctokens.line import Line, build, tokenise

from fategen.client import DEFAULT_URL, AsyncClient, FategenClientError, JobInfo
from fategen.errors import ConfigError, FategenError

__all__ = ["IrcBot", "IrcConfig", "IrcDisconnected", "Statistics", "Throttle", "fit", "run_bot"]

log = logging.getLogger("fategen.irc")

#: The longest line IRC carries, CRLF included.
LINE_BYTES = 512
#: The prefix the server puts before the bot's lines, while it has not shown the bot its
#: own: usernames have up to 10 characters (and a ``~``), hostnames up to 63.
UNKNOWN_USER = "~" + "u" * 10
UNKNOWN_HOST = "h" * 63
#: A line carries at least this many bytes of text, whatever the prefix and target.
MIN_TEXT_BYTES = 64
ELLIPSIS = "…"
#: The command line's environment variables (besides the client's FATEGEN_URL/FATEGEN_KEY).
SERVER_VARIABLE = "IRC_SERVER"
NICK_VARIABLE = "IRC_NICK"
CHANNELS_VARIABLE = "IRC_CHANNELS"
DEFAULT_NICK = "fategen"
PREFIX = "!"
HELP = (
    "commands: !img <prompt> [-m model] [-w width] [-h height] [-c count] ... queues an "
    "image; !upscale [job] [N] and !vary [job] [N] follow up on image N; !cancel [job] and "
    "!status [job] (default: your latest job)"
)
#: Replies waiting to be sent (they outlive a connection), commands waiting for a worker,
#: and the workers: a flood of commands beyond that is dropped.
OUTBOX_SIZE = 64
COMMAND_QUEUE_SIZE = 16
COMMAND_WORKERS = 4
#: Jobs remembered for ``!cancel``/``!status`` and their short ids (the oldest go first).
REMEMBERED = 1000
SHORT_ID = 8
RECEIVE_BYTES = 65536
#: The most the server may send without a line break: past it, the bot connects again.
MAX_PENDING_BYTES = 65536
#: A connection that stayed up this many seconds starts the reconnection backoff again.
STABLE_SECONDS = 60.0
#: What ends a connection; the bot connects again.
_DROPS = (OSError, trio.BrokenResourceError, trio.TooSlowError, FategenError)


class IrcDisconnected(FategenError):
    """The IRC server closed the connection, or stopped answering."""


@attrs.frozen
class IrcConfig:
    """Where the bot goes and how it behaves (`from_options` reads the command line's)."""

    host: str
    port: int
    channels: tuple[str, ...]
    nick: str = DEFAULT_NICK
    tls: bool = False
    #: The fategen service, and the bot's API key for it.
    url: str = DEFAULT_URL
    key: str | None = None
    username: str = "fategen"
    realname: str = "fategen image bot"
    #: Flood control: this many lines at once, then one per ``flood_interval`` seconds.
    flood_burst: int = 4
    flood_interval: float = 0.5
    #: Seconds before connecting again, doubled after each failure in a row, up to the max.
    reconnect_seconds: float = 1.0
    reconnect_max_seconds: float = 60.0
    #: Seconds to connect (TCP and TLS), and again to register.
    connect_seconds: float = 30.0
    #: Seconds of silence before the bot PINGs the server; as many again and it reconnects.
    idle_seconds: float = 120.0

    @classmethod
    def from_options(
        cls,
        environ: Mapping[str, str],
        *,
        server: str | None = None,
        nick: str | None = None,
        channels: Sequence[str] = (),
        tls: bool = False,
        url: str | None = None,
        key: str | None = None,
    ) -> IrcConfig:
        """The configuration of the command line's flags, each falling back on its variable
        (IRC_SERVER, IRC_NICK, IRC_CHANNELS: comma-separated).

        Raises:
            ConfigError: no server or channel, or one that is none.
        """
        server = server or environ.get(SERVER_VARIABLE)
        if not server:
            raise ConfigError(
                f"say which IRC server to join: --server HOST:PORT or {SERVER_VARIABLE}"
            )
        host, port = parse_server(server, tls=tls)
        names = list(channels) or environ.get(CHANNELS_VARIABLE, "").replace(",", " ").split()
        if not names:
            raise ConfigError(
                f"say which channels to join: --channel '#name' (repeatable) or {CHANNELS_VARIABLE}"
            )
        nick = (nick or environ.get(NICK_VARIABLE) or DEFAULT_NICK).strip()
        if not nick or any(c in nick for c in " ,:!@\r\n\0") or nick[0] in "#&$":
            raise ConfigError(f"{nick!r} cannot be an IRC nick")
        url = (url or DEFAULT_URL).strip()
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"the fategen URL must start with http:// or https://, not {url!r}")
        return cls(
            host=host,
            port=port,
            channels=tuple(dict.fromkeys(_channel(name) for name in names)),
            nick=nick,
            tls=tls,
            url=url,
            key=key or None,
        )


def parse_server(text: str, *, tls: bool = False) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6 address]:port`` as (host, port); the port defaults
    to 6697 with TLS, else 6667."""
    text = text.strip()
    port_text = ""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ConfigError(f"{text!r} is not an IRC server: expected [ADDRESS]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host = text
    if not host or " " in host:
        raise ConfigError(f"{text!r} is not an IRC server: expected HOST:PORT")
    if not port_text:
        return host, 6697 if tls else 6667
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ConfigError(f"{text!r} is not an IRC server: the port must be from 1 to 65535")
    return host, int(port_text)


def _channel(name: str) -> str:
    name = name.strip()
    if name[:1] not in ("#", "&", "+", "!"):
        name = "#" + name
    if len(name) < 2 or any(c in name for c in " ,:\x07\r\n\0"):
        raise ConfigError(f"{name!r} cannot be an IRC channel")
    return name


def fit(text: str, size: int, *, lines: int = 1) -> list[str]:
    """``text`` as at most ``lines`` pieces of at most ``size`` bytes of UTF-8 each.

    A piece ends at its last space (a URL stays whole), else on a character boundary; what
    does not fit in the last piece is cut off, and it ends with an ellipsis.
    Runs of white space (line breaks included, which IRC cannot carry) become one space.
    """
    if size < 8:
        raise ValueError(f"a line of {size} bytes cannot carry text")
    text = " ".join(text.replace("\0", " ").split())
    pieces: list[str] = []
    while len(text.encode()) > size:
        if len(pieces) == lines - 1:
            pieces.append(_clip(text, size - len(ELLIPSIS.encode())).rstrip() + ELLIPSIS)
            return pieces
        head = _clip(text, size)
        space = head.rfind(" ")
        if space > 0:
            head = head[:space]
        pieces.append(head)
        text = text[len(head) :].lstrip()
    if text:
        pieces.append(text)
    return pieces


def _clip(text: str, size: int) -> str:
    """The longest start of ``text`` that takes at most ``size`` bytes of UTF-8."""
    return text.encode()[:size].decode("utf-8", "ignore")


@attrs.define
class Throttle:
    """Flood control: `wait` lets ``burst`` lines go at once, then one per ``interval``
    seconds (a token bucket, kept as the time the next line is free to go)."""

    burst: int
    interval: float
    _free_at: float = float("-inf")

    async def wait(self) -> None:
        now = trio.current_time()
        slot = max(self._free_at, now)
        self._free_at = slot + self.interval  # taken before sleeping: callers queue up
        await trio.sleep_until(slot - (self.burst - 1) * self.interval)


@attrs.frozen
class Command:
    """``!verb rest`` from ``nick`` (``who``: casefolded); the replies go to ``target``."""

    nick: str
    who: str
    target: str
    verb: str
    rest: str

    @property
    def argument(self) -> str:
        """The first word after the verb ("" if none)."""
        words = self.rest.split(maxsplit=1)
        return words[0] if words else ""


@attrs.frozen
class Reply:
    """Text for ``target``, in at most ``lines`` IRC lines (see `fit`)."""

    target: str
    text: str
    lines: int = 1


@attrs.frozen
class Statistics:
    """A snapshot of the bot (`IrcBot.statistics`)."""

    #: Connections made so far (1 before any reconnection).
    connections: int
    #: The nick it has on the server now ("" between connections).
    nick: str
    #: The channels it is in now.
    channels: tuple[str, ...]
    #: Jobs whose end it is waiting for, and those of them it follows by long-polls (the
    #: service had no event stream for them).
    following: int
    polling: int


def _short(job_id: str) -> str:
    return job_id[:SHORT_ID]


def _remember(table: OrderedDict[str, str], key: str, value: str) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > REMEMBERED:
        table.popitem(last=False)


def _state(job: JobInfo) -> str:
    """A job's state in a few words: ``running, step 2 of 4``."""
    if job.status == "queued":
        return "queued" + ("" if job.queue_position is None else f", position {job.queue_position}")
    if job.status == "processing":
        step = f", step {job.progress.step} of {job.progress.of}" if job.progress.of else ""
        return f"running{step}"
    if job.status == "completed":
        return f"done {job.image_url or job.result or ''}".rstrip()
    if job.status == "failed":
        return f"failed, {job.error or 'no reason given'}"
    if job.status == "cancelled":
        by = job.cancelled_by
        return "cancelled" + (f" by {by}" if by and by != job.nick else "")
    return job.status


class _Desk:
    """The fategen side: runs commands and follows each job in a task of ``nursery`` until
    it ends, putting the replies in the outbox."""

    def __init__(
        self, client: AsyncClient, outbox: trio.MemorySendChannel[Reply], nursery: trio.Nursery
    ) -> None:
        self._client = client
        self._outbox = outbox
        self._nursery = nursery
        #: Job id -> the nick that asked for it (through this bot), oldest first.
        self._jobs: OrderedDict[str, str] = OrderedDict()
        #: Casefolded nick -> its latest job.
        self._latest: OrderedDict[str, str] = OrderedDict()
        self.following = 0
        self.polling = 0

    async def work(self, commands: trio.MemoryReceiveChannel[Command]) -> None:
        async with commands:
            async for command in commands:
                try:
                    await self._run(command)
                except FategenClientError as exc:  # a refusal, or the service is away
                    await self._say(command, f"{command.nick}: {exc}")
                except Exception:  # a bug: the bot stays up
                    log.exception("the command %r of %s failed", command.verb, command.nick)
                    await self._say(command, f"{command.nick}: that went wrong (see the log)")

    async def _say(self, command: Command, text: str, *, lines: int = 1) -> None:
        await self._outbox.send(Reply(command.target, text, lines))

    async def _run(self, command: Command) -> None:
        if command.verb == "img":
            await self._img(command)
        elif command.verb in ("upscale", "vary"):
            await self._follow_up(command)
        elif command.verb in ("cancel", "status"):
            job_id = self._job_of(command)
            if job_id is None:
                await self._say(command, f"{command.nick}: you have no job yet (!img <prompt>)")
            elif command.verb == "cancel":
                job = await self._client.cancel(job_id, nick=command.nick)
                if job.job_id not in self._jobs:  # else its follower says it
                    await self._say(command, f"{command.nick}: job {_short(job_id)} {_state(job)}")
            else:
                job = await self._client.job(job_id)
                what = f"{job.model} {job.width}x{job.height}" + (
                    f" x{job.count}" if job.count > 1 else ""
                )
                text = f"job {_short(job.job_id)} {_state(job)} ({what}): {job.prompt}"
                await self._say(command, f"{command.nick}: {text}")
        else:
            await self._say(command, f"{command.nick}: {HELP}", lines=2)

    def _job_of(self, command: Command) -> str | None:
        """The job a ``!cancel``/``!status`` means: its argument (a job id, or the start of
        one this bot queued), else the sender's latest job."""
        given = command.argument
        if not given:
            return self._latest.get(command.who)
        matches = [job_id for job_id in self._jobs if job_id.startswith(given)]
        return matches[0] if len(matches) == 1 else given

    async def _follow_up(self, command: Command) -> None:
        """``!upscale [job] [N] [overrides]`` / ``!vary ...``: a follow-up on image N of a
        job (the sender's latest by default) as a ``--upscale``/``--vary`` message."""
        words = command.rest.split()
        job_id = None
        if words and not words[0].isdigit() and not words[0].startswith(("-", "\u2014")):
            given = words.pop(0)
            matches = [j for j in self._jobs if j.startswith(given)]
            job_id = matches[0] if len(matches) == 1 else given
        else:
            job_id = self._latest.get(command.who)
        if job_id is None:
            await self._say(command, f"{command.nick}: you have no job yet (!img <prompt>)")
            return
        which = f":{words.pop(0)}" if words and words[0].isdigit() else ""
        await self._queue(command, " ".join([*words, f"--{command.verb} {job_id}{which}"]))

    async def _img(self, command: Command) -> None:
        if not command.rest:
            await self._say(command, f"{command.nick}: {HELP}", lines=2)
            return
        await self._queue(command, command.rest)

    async def _queue(self, command: Command, message: str) -> None:
        submitted = await self._client.submit(message, command.nick)
        job_id = submitted.job_id
        _remember(self._jobs, job_id, command.nick)
        _remember(self._latest, command.who, job_id)
        where = "" if submitted.queue_position is None else f", position {submitted.queue_position}"
        await self._say(
            command, f"{command.nick}: {submitted.status}{where} (job {_short(job_id)})"
        )
        self._nursery.start_soon(self._follow, command, job_id)

    async def _follow(self, command: Command, job_id: str) -> None:
        self.following += 1
        try:
            job = await self._until_done(command, job_id)
        except FategenClientError as exc:
            await self._say(command, f"{command.nick}: lost track of job {_short(job_id)}: {exc}")
            return
        finally:
            self.following -= 1
        if job.status == "completed":
            await self._say(command, f"{command.nick}: {_state(job)}", lines=2)
        elif job.status == "failed":
            await self._say(command, f"{command.nick}: {_state(job)}")
        else:
            await self._say(command, f"{command.nick}: {_state(job)} (job {_short(job_id)})")

    async def _until_done(self, command: Command, job_id: str) -> JobInfo:
        """The job once it has ended, saying when it starts: from its event stream, else
        (a service without streams, or one that keeps breaking) by long-polls."""
        started = False
        try:
            async with contextlib.aclosing(self._client.events(job_id)) as events:
                async for event in events:
                    if event.job is None:
                        continue
                    if event.job.done:
                        return event.job
                    if not started and event.job.status == "processing":
                        started = True
                        await self._say(command, f"{command.nick}: started")
        except FategenClientError as exc:
            log.info("no event stream for job %s (%s): long-polling", job_id, exc)
        self.polling += 1
        try:
            return await self._client.wait(job_id)
        finally:
            self.polling -= 1


@attrs.define
class _Link:
    """One connection: its stream, what the server said (``state``), and sending with flood
    control (an urgent line, a PONG, skips the queue)."""

    stream: trio.abc.Stream
    state: ServerState
    throttle: Throttle
    nicks_tried: int = 0
    welcomed: trio.Event = attrs.field(factory=trio.Event)
    opened: float = attrs.field(factory=trio.current_time)
    joined: trio.Event = attrs.field(factory=trio.Event)
    _lock: trio.Lock = attrs.field(factory=trio.Lock)
    _pending: bytes = b""

    def lines(self, data: bytes) -> list[Line]:
        """The lines ``data`` completes, each tokenised by irctokens (blank lines, and lines
        that are no IRC, are skipped with a warning, where ``ircstates`` would stop).

        Raises:
            IrcDisconnected: ``data`` is empty (the server closed the connection), or too
                much came without a line break.
        """
        if not data:
            raise IrcDisconnected("the server closed the connection")
        *complete, self._pending = (self._pending + data).split(b"\n")
        if len(self._pending) > MAX_PENDING_BYTES:
            raise IrcDisconnected(f"the server sent more than {MAX_PENDING_BYTES} bytes in a line")
        lines = []
        for raw in complete:
            raw = raw.rstrip(b"\r")
            if not raw.strip():
                continue
            try:
                lines.append(tokenise(raw))
            except (IndexError, ValueError):
                log.warning("the server sent a line that is no IRC: %r", raw[:100])
        return lines

    async def send(self, line: Line, *, urgent: bool = False) -> None:
        text = line.format()
        if not urgent:
            await self.throttle.wait()
        async with self._lock:
            log.debug("> %s", text)
            await self.stream.send_all(f"{text}\r\n".encode())

    def room(self, target: str) -> int:
        """Bytes of text a PRIVMSG to ``target`` may carry: the server relays it as
        ``:nick!user@host PRIVMSG target :text`` and CRLF, in `LINE_BYTES`."""
        state = self.state
        prefix = (
            f"{state.nickname}!{state.username or UNKNOWN_USER}@{state.hostname or UNKNOWN_HOST}"
        )
        overhead = len(f":{prefix} PRIVMSG {target} :\r\n".encode())
        return max(LINE_BYTES - overhead, MIN_TEXT_BYTES)


@attrs.define
class IrcBot:
    """The bot: `run` it (or call `run_bot`)."""

    config: IrcConfig
    client: AsyncClient
    #: For TLS: the context that checks the server's certificate (default: the system's CAs).
    ssl_context: ssl.SSLContext | None = None
    _connections: int = attrs.field(default=0, init=False)
    _link: _Link | None = attrs.field(default=None, init=False)
    _desk: _Desk | None = attrs.field(default=None, init=False)
    _joined_once: trio.Event = attrs.field(factory=trio.Event, init=False)
    #: The reply being sent when a connection broke: the next connection sends it first.
    _unsent: Reply | None = attrs.field(default=None, init=False)

    def statistics(self) -> Statistics:
        link, desk = self._link, self._desk
        joined: tuple[str, ...] = ()
        if link is not None and link.welcomed.is_set():
            joined = tuple(channel.name for channel in link.state.channels.values())
        return Statistics(
            connections=self._connections,
            nick=link.state.nickname if link is not None else "",
            channels=joined,
            following=desk.following if desk is not None else 0,
            polling=desk.polling if desk is not None else 0,
        )

    async def run(
        self, *, task_status: trio.TaskStatus[IrcBot] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Stay on IRC and answer commands until cancelled; ``started(self)`` once it has
        joined its channels the first time. It connects again whenever it loses the server."""
        outbox_send, outbox = trio.open_memory_channel[Reply](OUTBOX_SIZE)
        commands_send, commands = trio.open_memory_channel[Command](COMMAND_QUEUE_SIZE)
        async with outbox_send, outbox, commands_send, commands, trio.open_nursery() as nursery:
            desk = self._desk = _Desk(self.client, outbox_send, nursery)
            for _ in range(COMMAND_WORKERS):
                nursery.start_soon(desk.work, commands.clone())
            nursery.start_soon(self._stay_connected, outbox, commands_send)
            await self._joined_once.wait()
            task_status.started(self)
            await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def _stay_connected(
        self, outbox: trio.MemoryReceiveChannel[Reply], commands: trio.MemorySendChannel[Command]
    ) -> NoReturn:
        cfg = self.config
        failures = 0
        while True:
            problem: BaseException | None = None
            try:
                await self._session(outbox, commands)
            except* _DROPS as group:
                problem = group.exceptions[0]
            link = self._link
            if link is not None and trio.current_time() - link.opened >= STABLE_SECONDS:
                failures = 0  # it was up for a while: start the backoff again
            failures += 1
            seconds = min(cfg.reconnect_seconds * 2 ** (failures - 1), cfg.reconnect_max_seconds)
            log.warning(
                "lost the IRC server %s:%d (%s); connecting again in %g s",
                cfg.host,
                cfg.port,
                str(problem) or type(problem).__name__,
                seconds,
            )
            self._link = None
            await trio.sleep(seconds)

    async def _connect(self) -> trio.abc.Stream:
        cfg = self.config
        tcp = await trio.open_tcp_stream(cfg.host, cfg.port)
        if not cfg.tls:
            return tcp
        context = self.ssl_context or ssl.create_default_context()
        stream = trio.SSLStream(tcp, context, server_hostname=cfg.host)
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return stream

    async def _session(
        self, outbox: trio.MemoryReceiveChannel[Reply], commands: trio.MemorySendChannel[Command]
    ) -> NoReturn:
        """One connection: register, join, then read and send until it breaks."""
        cfg = self.config
        with trio.fail_after(cfg.connect_seconds):
            stream = await self._connect()
        self._connections += 1
        link = self._link = _Link(
            stream, ServerState(cfg.host), Throttle(cfg.flood_burst, cfg.flood_interval)
        )
        log.info("connected to %s:%d%s", cfg.host, cfg.port, " (TLS)" if cfg.tls else "")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, link, commands)
                with trio.fail_after(cfg.connect_seconds):
                    await link.send(build("NICK", [cfg.nick]))
                    await link.send(build("USER", [cfg.username, "0", "*", cfg.realname]))
                    await link.welcomed.wait()
                log.info("registered as %s", link.state.nickname)
                for channel in cfg.channels:
                    await link.send(build("JOIN", [channel]))
                nursery.start_soon(self._drain, link, outbox)
                await link.joined.wait()
                self._joined_once.set()
                await trio.sleep_forever()
        finally:
            if link.welcomed.is_set():
                with trio.move_on_after(1, shield=True), contextlib.suppress(*_DROPS):
                    await link.send(build("QUIT", ["bye"]), urgent=True)
            await trio.aclose_forcefully(stream)

    async def _receive(self, link: _Link) -> bytes:
        """The next bytes from the server; a PING after `IrcConfig.idle_seconds` of silence."""
        with trio.move_on_after(self.config.idle_seconds):
            return bytes(await link.stream.receive_some(RECEIVE_BYTES))
        await link.send(build("PING", ["fategen"]), urgent=True)
        with trio.move_on_after(self.config.idle_seconds):
            return bytes(await link.stream.receive_some(RECEIVE_BYTES))
        raise IrcDisconnected(f"the server said nothing for {2 * self.config.idle_seconds:g} s")

    async def _read(self, link: _Link, commands: trio.MemorySendChannel[Command]) -> NoReturn:
        while True:
            for line in link.lines(await self._receive(link)):
                log.debug("< %s", line.format())
                try:
                    link.state.parse_tokens(line)
                except (IndexError, KeyError, ValueError):
                    log.warning("cannot follow the server's line %r", line.format())
                    continue
                await self._on_line(link, line, commands)

    async def _on_line(
        self, link: _Link, line: Line, commands: trio.MemorySendChannel[Command]
    ) -> None:
        state = link.state
        if line.command == "PING":
            await link.send(build("PONG", line.params), urgent=True)
        elif line.command == "001":
            link.welcomed.set()
        elif line.command in ("432", "433") and not link.welcomed.is_set():
            link.nicks_tried += 1
            tried = link.nicks_tried
            nick = self.config.nick + ("_" * tried if tried <= 3 else str(tried))
            log.warning("the nick %s is taken or refused; trying %s", line.params[1:2], nick)
            await link.send(build("NICK", [nick]))
        elif line.command in ("JOIN", "PART", "KICK") and line.source and line.params:
            if str(state.casefold(line.hostmask.nickname)) == state.nickname_lower:
                log.info("%s %s", line.command.lower(), line.params[0])
            if all(state.has_channel(channel) for channel in self.config.channels):
                link.joined.set()
        elif line.command in ("QUIT", "NICK") and line.source:
            # Someone (the bot's ghost from before a reconnection) leaves the nick it wants.
            wanted = str(state.casefold(self.config.nick))
            if str(state.casefold(line.hostmask.nickname)) == wanted != state.nickname_lower:
                log.info("the nick %s is free again: taking it", self.config.nick)
                await link.send(build("NICK", [self.config.nick]))
        elif line.command == "ERROR":
            log.warning("the IRC server says: %s", " ".join(line.params))
        elif line.command == "PRIVMSG" and line.source and len(line.params) >= 2:
            command = self._command(link, line)
            if command is not None:
                try:
                    commands.send_nowait(command)
                except trio.WouldBlock:
                    log.warning(
                        "too many commands at once: dropped %s's !%s", command.nick, command.verb
                    )

    def _command(self, link: _Link, line: Line) -> Command | None:
        """The command a PRIVMSG carries, if any (replies to a private one go to its sender)."""
        state = link.state
        nick = line.hostmask.nickname
        target, text = line.params[0], line.params[1]
        who = str(state.casefold(nick))
        if who == state.nickname_lower or not text.startswith(PREFIX):
            return None
        verb, _, rest = text[len(PREFIX) :].partition(" ")
        verb = verb.lower()
        if verb not in ("img", "upscale", "vary", "cancel", "status", "help"):
            return None
        where = target if state.is_channel(target) else nick
        return Command(nick=nick, who=who, target=where, verb=verb, rest=rest.strip())

    async def _drain(self, link: _Link, outbox: trio.MemoryReceiveChannel[Reply]) -> NoReturn:
        """Send the outbox's replies, each cut to fit this connection's lines."""
        while True:
            if self._unsent is None:
                self._unsent = await outbox.receive()
            reply = self._unsent
            for text in fit(reply.text, link.room(reply.target), lines=reply.lines):
                await link.send(build("PRIVMSG", [reply.target, text]))
            self._unsent = None


async def run_bot(
    config: IrcConfig,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[IrcBot] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run the bot of ``config`` until cancelled (see `IrcBot.run`).

    Args:
        config: the server, channels, nick, and the fategen service with the bot's key.
        ssl_context: with ``config.tls``, the context that checks the server's certificate.

    ``task_status.started(bot)`` once it has joined its channels the first time.
    """
    async with AsyncClient(config.url, key=config.key) as client:
        bot = IrcBot(config, client, ssl_context=ssl_context)
        await bot.run(task_status=task_status)


def main(config: IrcConfig) -> int:
    """``fategen irc``: run the bot until Ctrl-C; the exit code."""
    try:
        trio.run(run_bot, config)
    except* KeyboardInterrupt:
        pass
    return 130
