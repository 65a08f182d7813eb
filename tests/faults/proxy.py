"""A loopback TCP proxy between clients and a redis-server, for fault tests.

It runs its own asyncio loop in a thread, so tests (sync or async, blocking on subprocesses or
not) drive it with plain calls; every call returns once the proxy acts on it::

    with FaultProxy.for_url(redis_url) as proxy:
        client = redis.Redis.from_url(proxy.url)
        proxy.blackhole()        # half-open: nothing flows, nothing is closed
        proxy.heal()             # what was held flows on, in order
        proxy.delay_replies(800) # server replies arrive 800 ms late; requests are not delayed
        proxy.cut()              # close every connection (reset=True: RST instead of FIN)

Faults and what they model:

``blackhole``
    A link that drops packets without a reset: both directions stop, no connection is closed,
    the proxy stops reading, so the sender's bytes wait in socket buffers like unacknowledged
    TCP segments. New connections are accepted (the kernel completes the handshake) but get
    nothing. On ``heal`` the held bytes are delivered, late, like TCP retransmissions: a command
    written into the blackhole runs on the server after the heal, even if its client gave up
    and closed the connection meanwhile.
``delay_replies(ms)``
    Requests reach the server at once (the command runs), replies read from the server from
    now on are delivered ``ms`` later, in order: a reply slower than the client's socket timeout.
``cut``
    Every open connection is closed at once (both sides; with ``reset`` by RST). The proxy keeps
    accepting, so clients can reconnect.
``heal``
    Back to passing everything through: the blackhole opens, new replies are not delayed.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

CHUNK = 65536


@dataclass
class ProxyStats:
    accepted: int = 0
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0  # server -> client


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client, self.server = client, server
        self.tasks: list[asyncio.Task] = []

    def close(self, *, abort: bool = True, reset: bool = False) -> None:
        """Close both sides: at once (``abort``, buffered bytes dropped; with ``reset`` by RST)
        or after flushing what was written (an end of stream passed on)."""
        for writer in (self.client, self.server):
            transport = writer.transport
            if not abort:
                transport.close()
                continue
            if reset:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    try:  # linger 0: close() sends RST instead of FIN
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    except OSError:
                        pass
            transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """A TCP proxy from ``127.0.0.1:<port>`` to ``upstream`` that injects link faults."""

    def __init__(self, upstream_host: str, upstream_port: int, *, listen_port: int = 0,
                 url_template: str | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listen_port = listen_port
        self._url_template = url_template
        self.stats = ProxyStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._links: set[_Link] = set()
        self._flowing: asyncio.Event | None = None
        self._reply_delay_s = 0.0
        self._blackholed_at: float | None = None

    @classmethod
    def for_url(cls, url: str) -> FaultProxy:
        """A proxy in front of the Redis at ``url`` (``redis://[auth@]host:port[/db]``)."""
        parts = urlsplit(url)
        if parts.scheme != "redis" or parts.port is None:
            raise ValueError(f"FaultProxy needs a redis://host:port URL, got {url!r}")
        return cls(parts.hostname or "127.0.0.1", parts.port, url_template=url)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self._flowing = asyncio.Event()
            self._flowing.set()
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, "127.0.0.1", self.listen_port))
            self.listen_port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        """Close every connection and the listening socket; the port is free afterwards."""
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close()
        self._links.clear()
        while True:  # a connection accepted just before the close may start its task late
            await asyncio.sleep(0.01)
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if not others:
                break
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- where clients connect ---------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.listen_port

    @property
    def url(self) -> str:
        """The upstream URL (auth, db) with the proxy's address in place of the server's."""
        if self._url_template is None:
            return f"redis://127.0.0.1:{self.listen_port}/0"
        parts = urlsplit(self._url_template)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.listen_port}" if auth else f"127.0.0.1:{self.listen_port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @property
    def connections(self) -> int:
        """Client connections the proxy holds open now."""
        return len(self._links)

    # -- faults ------------------------------------------------------------------------------
    def blackhole(self) -> float:
        """Stop forwarding in both directions without closing anything; returns the time
        (``time.time()``) it took effect."""
        def act() -> float:
            self._flowing.clear()
            self._blackholed_at = time.time()
            return self._blackholed_at
        return self._call(act)

    def delay_replies(self, ms: float) -> None:
        """Deliver server replies read from now on ``ms`` late (requests pass at once)."""
        def act() -> None:
            self._reply_delay_s = ms / 1000.0
        self._call(act)

    def cut(self, *, reset: bool = False) -> int:
        """Close every open connection (with RST when ``reset``); returns how many."""
        def act() -> int:
            links = list(self._links)
            self._links.clear()
            for link in links:
                link.close(reset=reset)
            return len(links)
        return self._call(act)

    def heal(self) -> float:
        """Pass everything through again (held bytes flow on); returns ``time.time()``."""
        def act() -> float:
            self._reply_delay_s = 0.0
            self._blackholed_at = None
            self._flowing.set()
            return time.time()
        return self._call(act)

    @property
    def blackholed(self) -> bool:
        return self._blackholed_at is not None

    def _call(self, fn: Any) -> Any:
        if self._loop is None:
            raise RuntimeError("fault proxy is not running")

        async def run() -> Any:
            return fn()

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        return future.result(10)

    # -- forwarding --------------------------------------------------------------------------
    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        """One client connection, from accept to close (the task of asyncio's server: it ends
        quietly when the proxy stops)."""
        self.stats.accepted += 1
        try:
            sreader, swriter = await asyncio.open_connection(*self.upstream)
        except (OSError, asyncio.CancelledError):
            cwriter.transport.abort()  # upstream down, or stopping: the client is dropped
            return
        link = _Link(cwriter, swriter)
        self._links.add(link)
        up = self._spawn(self._pump(creader, swriter, up=True), link)
        down = self._spawn(self._pump(sreader, cwriter, up=False), link)
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            link.close()
            return
        if link in self._links:  # an end of stream, not a cut: flush, then close both sides
            self._links.discard(link)
            link.close(abort=False)

    def _spawn(self, coro: Coroutine[Any, Any, None], link: _Link) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        link.tasks.append(task)
        return task

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool) -> None:
        """Copy one direction. Reading and writing are separate tasks joined by a queue, so a
        reply delay holds each chunk for its own time and keeps their order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        deliver = asyncio.get_running_loop().create_task(self._deliver(queue, writer, up=up))
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except (ConnectionError, OSError):
                    data = b""
                await self._flowing.wait()  # a blackhole holds this chunk and stops reading
                due = loop.time() + (0.0 if up else self._reply_delay_s)
                await queue.put((due, data))
                if not data:
                    break
            await deliver  # EOF: everything read is delivered before the link closes
        finally:
            deliver.cancel()

    async def _deliver(self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter,
                       *, up: bool) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            if not data:
                return
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._flowing.wait()
            try:
                writer.write(data)
                await writer.drain()
            except (ConnectionError, OSError):
                return
            if up:
                self.stats.bytes_up += len(data)
            else:
                self.stats.bytes_down += len(data)
