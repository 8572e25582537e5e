"""`fategen irc` end to end over real sockets: a real IRC server (miniircd, in a subprocess),
the service on the simulator, the bot (`run_bot`), and a person in the channel played by a
small irctokens client of the test's own. Then the pure parts: `fit`, `Throttle`, the
configuration and the command line."""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import os
import re
import ssl
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from irctokens.line import Line, build, tokenise
from PIL import Image

from conftest import Stack, free_port, open_stack
from fategen import cli
from fategen.client import AsyncClient
from fategen.errors import ConfigError
from fategen.irc import LINE_BYTES, IrcBot, IrcConfig, Throttle, fit, parse_server, run_bot
from fategen.simulator import SimulatorKnobs

BOT = "fategen"
CHANNEL = "#art"
TINY = "-m tiny -w 256 -h 256"


class Ircd:
    """miniircd on 127.0.0.1:``port`` in a subprocess; `stop` kills it, `start` again."""

    def __init__(self, port: int, pem: Path | None = None) -> None:
        self.port = port
        self.pem = pem
        self.process: trio.Process | None = None

    async def start(self) -> None:
        args = [sys.executable, "-m", "miniircd", "--listen", "127.0.0.1"]
        args += ["--ports", str(self.port)]
        if os.getuid() == 0:  # it refuses to run as root unless told (CI runs as root)
            args += ["--setuid", "root"]
        if self.pem is not None:
            args += ["--ssl-pem-file", str(self.pem)]
        self.process = await trio.lowlevel.open_process(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            while True:  # until it listens
                assert self.process.returncode is None, "miniircd stopped"
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", self.port)).aclose()
                    return
                except OSError:
                    await trio.sleep(0.05)
        except BaseException:
            await self.stop()
            raise

    async def __aenter__(self) -> Ircd:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            with trio.move_on_after(5, shield=True):
                await self.process.wait()
            self.process = None


class IrcUser:
    """A person on IRC: irctokens lines over a trio stream. Answers PINGs (unless told not
    to: the server's end of a fake server); keeps the size of every line the bot sends it
    (CRLF included) in ``sizes``."""

    def __init__(
        self, stream: trio.abc.Stream, nick: str, channel: str, *, answer_pings: bool = True
    ) -> None:
        self.answer_pings = answer_pings
        self.stream = stream
        self.nick = nick
        self.channel = channel
        self.names: set[str] = set()
        self.sizes: list[int] = []
        self._buffer = b""
        self._lines: deque[tuple[int, Line]] = deque()

    @classmethod
    @contextlib.asynccontextmanager
    async def joined(
        cls, port: int, nick: str, channel: str, context: ssl.SSLContext | None = None
    ) -> AsyncIterator[IrcUser]:
        """Connected, registered and in ``channel`` (``names``: who else is there)."""
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        if context is not None:
            stream = trio.SSLStream(stream, context, server_hostname="127.0.0.1")
        user = cls(stream, nick, channel)
        try:
            await user.send("NICK", nick)
            await user.send("USER", nick, "0", "*", "a person")
            await user.until(lambda line: line.command == "001")
            await user.send("JOIN", channel)
            while (
                line := await user.until(lambda line: line.command in ("353", "366"))
            ).command == "353":
                user.names.update(name.lstrip("@+") for name in line.params[-1].split())
            yield user
        finally:
            await trio.aclose_forcefully(stream)

    async def send(self, command: str, *params: str) -> None:
        await self.stream.send_all(f"{build(command, list(params)).format()}\r\n".encode())

    async def say(self, text: str) -> None:
        await self.send("PRIVMSG", self.channel, text)

    async def line(self) -> tuple[int, Line]:
        while not self._lines:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the server closed the connection")
            *complete, self._buffer = (self._buffer + data).split(b"\n")
            for raw in complete:
                line = tokenise(raw.rstrip(b"\r"))
                if line.command == "PING" and self.answer_pings:
                    await self.send("PONG", *line.params)
                else:
                    self._lines.append((len(raw) + 1, line))
        return self._lines.popleft()

    async def until(self, match: Callable[[Line], bool]) -> Line:
        while True:
            _, line = await self.line()
            if match(line):
                return line

    async def reply(self, bot: str = BOT) -> str:
        """The bot's next line to the channel."""
        while True:
            size, line = await self.line()
            if line.command == "PRIVMSG" and line.source and line.hostmask.nickname == bot:
                assert line.params[0] == self.channel
                self.sizes.append(size)
                return line.params[1]


@attrs.define
class Irc:
    stack: Stack
    ircd: Ircd
    bot: IrcBot
    config: IrcConfig
    context: ssl.SSLContext | None = None

    def user(self, nick: str = "alice") -> contextlib.AbstractAsyncContextManager[IrcUser]:
        return IrcUser.joined(self.ircd.port, nick, self.config.channels[0], self.context)


@contextlib.asynccontextmanager
async def open_irc(
    tmp_path: Path,
    knobs: SimulatorKnobs | None = None,
    *,
    pem: Path | None = None,
    context: ssl.SSLContext | None = None,
    env: dict[str, str] | None = None,
    ircd: Ircd | None = None,
    **config: Any,
) -> AsyncIterator[Irc]:
    """The service on a simulator (with ``env``), miniircd (or ``ircd``, running), and the
    bot in the channel."""
    own = ircd is None
    ircd = Ircd(free_port(), pem) if ircd is None else ircd
    async with open_stack(tmp_path, knobs, **(env or {})) as stack:
        if own:
            await ircd.start()
        try:
            async with trio.open_nursery() as nursery:
                settings = IrcConfig(
                    host="127.0.0.1",
                    port=ircd.port,
                    channels=(config.pop("channel", CHANNEL),),
                    url=stack.url,
                    reconnect_seconds=0.2,
                    reconnect_max_seconds=1.0,
                    **config,
                )
                start = functools.partial(run_bot, settings, ssl_context=context)
                bot = await nursery.start(start)
                yield Irc(stack, ircd, bot, settings, context)
                nursery.cancel_scope.cancel()
        finally:
            if own:
                await ircd.stop()


def slow(step_seconds: float) -> SimulatorKnobs:
    return SimulatorKnobs(step_seconds=step_seconds, model_load_seconds=0.01)


async def test_img_queued_started_done_status_and_a_refusal(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_irc(tmp_path, slow(0.1)) as irc, irc.user() as alice:
            await alice.say(f"!img a red fox {TINY}")
            queued = re.fullmatch(
                r"alice: queued, position (\d+) \(job ([0-9a-f]{8})\)", await alice.reply()
            )
            assert queued, alice.sizes
            short = queued[2]
            assert await alice.reply() == "alice: started"
            done = re.fullmatch(r"alice: done (http://\S+/job/(\S+)/image)", await alice.reply())
            assert done and done[2].startswith(short)
            image = await irc.stack.client.get(done[1])
            assert image.status_code == 200
            assert image.headers["content-type"] == "image/webp"
            with Image.open(io.BytesIO(image.content)) as webp:
                assert (webp.format, webp.size) == ("WEBP", (256, 256))
            job = await irc.stack.client.get(f"/job/{done[2]}")
            assert job.json()["nick"] == "alice" and job.json()["prompt"] == "a red fox"

            await alice.say(f"!status {short}")
            status = f"alice: job {short} done {done[1]} (tiny 256x256): a red fox"
            assert await alice.reply() == status

            await alice.say("!img a cat -m nosuchmodel")
            refusal = await alice.reply()
            assert refusal.startswith("alice: unknown model 'nosuchmodel'"), refusal
            await alice.say("!status")  # the next line is its answer: the refusal was one line
            assert await alice.reply() == status

            await alice.say("!help")
            assert (await alice.reply()).startswith("alice: commands: !img <prompt>")
            assert all(size <= LINE_BYTES for size in alice.sizes)


async def test_upscale_and_vary_the_latest_job(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_irc(tmp_path) as irc, irc.user("cy") as cy:
            await cy.say(f"!img two owls -c 2 {TINY}")
            queued = re.fullmatch(
                r"cy: queued, position \d+ \(job ([0-9a-f]{8})\)", await cy.reply()
            )
            assert queued
            assert await cy.reply() == "cy: started"
            assert (await cy.reply()).startswith("cy: done ")
            await cy.say("!upscale 2")
            up = re.fullmatch(r"cy: queued, position \d+ \(job ([0-9a-f]{8})\)", await cy.reply())
            assert up, cy.sizes
            assert await cy.reply() == "cy: started"
            done = re.fullmatch(r"cy: done (http://\S+/job/(\S+)/image)", await cy.reply())
            assert done
            job = (await irc.stack.client.get(f"/job/{done[2]}")).json()
            assert job["kind"] == "upscale" and (job["width"], job["height"]) == (512, 512)
            assert job["input"]["image"] == 2 and job["input"]["job_id"].startswith(queued[1])
            await cy.say(f"!vary {queued[1]} 1 --strength 0.3 -c 1")
            assert re.fullmatch(r"cy: queued, position \d+ \(job [0-9a-f]{8}\)", await cy.reply())
            assert await cy.reply() == "cy: started"
            done = re.fullmatch(r"cy: done (http://\S+/job/(\S+)/image)", await cy.reply())
            assert done
            job = (await irc.stack.client.get(f"/job/{done[2]}")).json()
            assert job["kind"] == "img2img" and job["input"]["strength"] == 0.3
            await cy.say("!upscale 7")
            refusal = await cy.reply()
            assert refusal.startswith("cy: job ") and "made 1 image; pick 1" in refusal


async def test_cancel_a_running_job(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_irc(tmp_path, slow(2.0)) as irc, irc.user("bob") as bob:
            await bob.say(f"!img a slow snail {TINY}")
            queued = re.fullmatch(
                r"bob: queued, position \d+ \(job ([0-9a-f]{8})\)", await bob.reply()
            )
            assert queued
            assert await bob.reply() == "bob: started"
            await bob.say("!cancel")
            assert await bob.reply() == f"bob: cancelled (job {queued[1]})"
            await bob.say("!cancel")
            again = await bob.reply()
            assert re.fullmatch(r"bob: job \S+ has already cancelled", again), again
            assert irc.bot.statistics().following == 0


async def test_long_polls_when_no_event_stream_is_free(tmp_path: Path) -> None:
    knobs = slow(0.05)
    knobs.hang = 1  # the first job hangs until it is cancelled
    with trio.fail_after(20):
        async with (
            open_irc(tmp_path, knobs, env={"FATEGEN_MAX_STREAMS": "1"}) as irc,
            irc.user() as alice,
            trio.open_nursery() as nursery,
        ):
            stuck = (await irc.stack.submit(f"a stuck clock {TINY}", "zed"))["job_id"]
            streaming = trio.Event()

            async def hold_the_only_stream() -> None:
                async with AsyncClient(irc.stack.url) as client:
                    async for _ in client.events(stuck):
                        streaming.set()

            nursery.start_soon(hold_the_only_stream)
            await streaming.wait()
            await alice.say(f"!img a clock that works {TINY}")
            assert re.fullmatch(r"alice: queued, position \d+ \(job \w+\)", await alice.reply())
            # Its stream was refused (429): the bot long-polls (seen from outside, so polled).
            while irc.bot.statistics().polling == 0:  # noqa: ASYNC110
                await trio.sleep(0.01)
            cancel = await irc.stack.client.delete(f"/job/{stuck}", params={"nick": "zed"})
            assert cancel.status_code == 200, cancel.text
            assert re.fullmatch(r"alice: done http://\S+/image", await alice.reply())
            assert irc.bot.statistics().polling == 0


async def test_long_replies_fit_in_irc_lines(tmp_path: Path) -> None:
    nick, channel = "fategen_" + "b" * 30, "#" + "c" * 40
    with trio.fail_after(20):
        async with open_irc(tmp_path, nick=nick, channel=channel) as irc, irc.user() as alice:
            assert nick in alice.names
            words = "a red fox in the snow, größer und schöner, 雪の中の狐"
            prompt = words
            while len(f"PRIVMSG {channel} :!img {prompt}, {words} {TINY}\r\n".encode()) <= 512:
                prompt += f", {words}"
            await alice.say(f"!img {prompt} {TINY}")
            assert (await alice.reply(nick)).startswith("alice: queued")
            while not (await alice.reply(nick)).startswith("alice: done"):
                pass
            await alice.say("!status")
            status = await alice.reply(nick)
            assert status.startswith("alice: job ") and status.endswith("…")
            assert prompt.startswith(status.partition("(tiny 256x256): ")[2][:-1])
            # The bot knows its prefix (from its JOIN): the line fills IRC's 512 bytes.
            assert LINE_BYTES - 4 <= alice.sizes[-1] <= LINE_BYTES

            await alice.say("!img a fox -m " + "x" * 300)
            assert (await alice.reply(nick)).startswith("alice: unknown model")
            assert all(size <= LINE_BYTES for size in alice.sizes), alice.sizes


async def test_replies_are_paced_after_a_burst(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_irc(tmp_path) as irc, irc.user() as alice:
            assert (irc.config.flood_burst, irc.config.flood_interval) == (4, 0.5)
            await alice.stream.send_all(b"".join(b"PRIVMSG #art :!status\r\n" for _ in range(6)))
            times = []
            for _ in range(6):
                assert await alice.reply() == "alice: you have no job yet (!img <prompt>)"
                times.append(trio.current_time())
            assert times[-1] - times[0] >= (6 - 4) * 0.5 - 0.1, times
            assert all(b - a >= 0.4 for a, b in itertools.pairwise(times[4:])), times


async def test_reconnects_and_rejoins_when_the_server_goes(tmp_path: Path) -> None:
    with trio.fail_after(25):
        async with open_irc(tmp_path, slow(0.75)) as irc:
            async with irc.user() as alice:
                await alice.say(f"!img a phoenix {TINY}")
                assert (await alice.reply()).startswith("alice: queued")
                assert await alice.reply() == "alice: started"
            await irc.ircd.stop()  # the bot is dropped in the middle of the job
            gone = trio.current_time()
            await irc.ircd.start()
            async with irc.user() as alice:
                if BOT not in alice.names:
                    await alice.until(
                        lambda line: (
                            line.command == "JOIN"
                            and line.hostmask.nickname == BOT
                            and line.params[0] == CHANNEL
                        )
                    )
                assert trio.current_time() - gone < 5
                # The job ended while the bot was away or coming back: it still says so.
                assert re.fullmatch(r"alice: done http://\S+/image", await alice.reply())
                await alice.say(f"!img a second phoenix {TINY}")
                assert (await alice.reply()).startswith("alice: queued, position")
                stats = irc.bot.statistics()
                assert stats.connections == 2 and stats.nick == BOT
                assert stats.channels == (CHANNEL,)


async def test_a_taken_nick_is_taken_back_once_free(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with (
            Ircd(free_port()) as ircd,
            IrcUser.joined(ircd.port, BOT, CHANNEL) as squatter,  # the bot's nick, taken
            open_irc(tmp_path, ircd=ircd) as irc,
            irc.user() as alice,
        ):
            assert irc.bot.statistics().nick == BOT + "_"
            await alice.say("!status")
            assert (await alice.reply(BOT + "_")).startswith("alice: you have no job")
            await squatter.send("QUIT", "bye")
            renamed = await alice.until(lambda line: line.command == "NICK")
            assert (renamed.hostmask.nickname, renamed.params) == (BOT + "_", [BOT])
            await alice.say("!status")
            assert (await alice.reply(BOT)).startswith("alice: you have no job")
            assert irc.bot.statistics().nick == BOT


async def test_a_fake_server_pings_blank_lines_and_silence(tmp_path: Path) -> None:
    """Against a server of the test's own: the bot answers PING, skips lines that are no
    IRC, PINGs a server that goes silent and connects again when it stays so."""
    connections_send, connections = trio.open_memory_channel[trio.SocketStream](4)

    async def accept(stream: trio.SocketStream) -> None:
        await connections_send.send(stream)
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with open_stack(tmp_path) as stack, trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, accept, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            config = IrcConfig(
                host="127.0.0.1",
                port=port,
                channels=(CHANNEL,),
                url=stack.url,
                idle_seconds=0.5,
                reconnect_seconds=0.1,
            )
            nursery.start_soon(run_bot, config)
            server = IrcUser(await connections.receive(), "irc.test", CHANNEL, answer_pings=False)
            assert (await server.line())[1].params[0] == BOT
            assert (await server.line())[1].command == "USER"
            await server.stream.send_all(
                b"\r\n:irc.test 001 fategen :hi\r\n   \r\n@only=tags\r\nPING :abc 123\r\n"
            )
            pong = (await server.line())[1]
            assert (pong.command, pong.params) == ("PONG", ["abc 123"])
            join = (await server.line())[1]
            assert (join.command, join.params) == ("JOIN", [CHANNEL])
            await server.stream.send_all(
                b":fategen!fategen@127.0.0.1 JOIN #art\r\n:alice!a@h PRIVMSG #art :!status\r\n"
            )
            answer = (await server.line())[1]
            assert answer.params == [CHANNEL, "alice: you have no job yet (!img <prompt>)"]
            silent = trio.current_time()
            ping = (await server.line())[1]
            assert ping.command == "PING" and trio.current_time() - silent >= 0.4
            assert (await server.line())[1].command == "QUIT"  # silent still: it goes
            again = IrcUser(await connections.receive(), "irc.test", CHANNEL, answer_pings=False)
            assert trio.current_time() - silent >= 0.9
            assert (await again.line())[1].command == "NICK"
            nursery.cancel_scope.cancel()


async def test_over_tls(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    with trio.fail_after(20):
        await trio.run_process(
            [
                *("openssl", "req", "-x509", "-newkey", "ec", "-nodes", "-days", "1"),
                *("-pkeyopt", "ec_paramgen_curve:prime256v1", "-subj", "/CN=localhost"),
                *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
            ],
            capture_stdout=True,
            capture_stderr=True,
        )
        pem = tmp_path / "server.pem"
        pem.write_bytes(key.read_bytes() + cert.read_bytes())
        context = ssl.create_default_context(cafile=str(cert))
        async with (
            open_irc(tmp_path, pem=pem, context=context, tls=True) as irc,
            irc.user() as alice,
        ):
            await alice.say(f"!img a lighthouse {TINY}")
            assert (await alice.reply()).startswith("alice: queued, position")
            while not (await alice.reply()).startswith("alice: done http://"):
                pass


# The pure parts.


def test_fit_splits_at_spaces_and_cuts_on_character_boundaries() -> None:
    assert fit("hello world", 100) == ["hello world"]
    assert fit("  two\r\nlines\0here ", 100) == ["two lines here"]
    assert fit("", 100) == []
    assert fit("aaaa bbbb cccc", 10, lines=3) == ["aaaa bbbb", "cccc"]
    assert fit("aaaa bbbb cccc dddd", 10) == ["aaaa bb…"]
    text = "狐" * 100  # 3 bytes each, no spaces
    for lines in (1, 2, 5):
        pieces = fit(text, 31, lines=lines)
        assert len(pieces) == lines
        assert all(len(piece.encode()) <= 31 for piece in pieces)
        assert pieces[-1].endswith("…") and "".join(pieces).startswith("狐" * 9)
    url = "http://127.0.0.1:8000/job/" + "f" * 36 + "/image"
    assert fit(f"alice: done {url}", 70, lines=2) == ["alice: done", url]
    with pytest.raises(ValueError):
        fit("x", 4)


async def test_throttle_lets_a_burst_go_then_one_line_per_interval(autojump_clock: Any) -> None:
    throttle = Throttle(burst=4, interval=0.5)
    times = []
    for _ in range(7):
        await throttle.wait()
        times.append(trio.current_time())
    assert times == [0, 0, 0, 0, 0.5, 1.0, 1.5]
    await trio.sleep(10)  # a rest fills the bucket again
    start = trio.current_time()
    for _ in range(5):
        await throttle.wait()
    assert trio.current_time() - start == 0.5


async def test_reconnection_backoff_doubles_up_to_the_max(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = []

    async def refused(self: IrcBot) -> trio.abc.Stream:
        attempts.append(trio.current_time())
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(IrcBot, "_connect", refused)
    config = IrcConfig(host="irc.invalid", port=6667, channels=("#a",), reconnect_max_seconds=8)
    with trio.move_on_after(40):
        await run_bot(config)
    assert [b - a for a, b in itertools.pairwise(attempts)] == [1, 2, 4, 8, 8, 8, 8]


def test_config_from_flags_then_the_environment() -> None:
    environ = {"IRC_SERVER": "irc.example.org", "IRC_NICK": "painter", "IRC_CHANNELS": "#a, b"}
    config = IrcConfig.from_options(environ, url="http://fategen:8000", key="k")
    assert (config.host, config.port, config.nick) == ("irc.example.org", 6667, "painter")
    assert config.channels == ("#a", "#b") and (config.url, config.key) == (
        "http://fategen:8000",
        "k",
    )
    config = IrcConfig.from_options(
        environ, server="irc.libera.chat", tls=True, nick="bot", channels=["#x", "#x"]
    )
    assert (config.port, config.tls, config.nick, config.channels) == (6697, True, "bot", ("#x",))
    assert config.url == "http://127.0.0.1:8000" and config.key is None
    assert parse_server("[::1]:7000") == ("::1", 7000)
    assert parse_server("127.0.0.1:6668") == ("127.0.0.1", 6668)
    for bad in ({}, {"IRC_SERVER": "host:0"}, {"IRC_SERVER": "h", "IRC_CHANNELS": ""}):
        with pytest.raises(ConfigError):
            IrcConfig.from_options(bad)
    with pytest.raises(ConfigError, match="nick"):
        IrcConfig.from_options(environ, nick="two words")
    with pytest.raises(ConfigError, match="http://"):
        IrcConfig.from_options(environ, url="127.0.0.1:8000")


def test_the_command_line_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("IRC_SERVER", "IRC_NICK", "IRC_CHANNELS"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["irc", "--server", "127.0.0.1:1"]) == 2
    assert "--channel" in capsys.readouterr().err
    monkeypatch.setenv("IRC_CHANNELS", "#art")
    assert cli.main(["irc"]) == 2
    assert "IRC_SERVER" in capsys.readouterr().err
