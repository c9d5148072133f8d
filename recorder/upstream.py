"""The recording proxy's HTTP/1.1 client to the upstream: kept-alive connections, responses parsed by httptools.

Why not aiohttp's client (which ``cwreplay run`` uses): on the project's machine the proxy's
thread spent 0.40 ms of CPU a call with it, half of it in aiohttp, and 1.0 ms after an idle wait
(its code and data gone from the caches), so that the proxy added 0.71 ms back to back and
1.14 ms after an idle wait, past its budget of 1 ms a call; with this client the thread spends
0.18 ms (0.56 ms) and the proxy adds 0.38 ms (0.74 ms) (``experiments/bench_record.py``). The
parsing (status line, headers, chunked bodies) is httptools', the parser uvicorn serves the
proxy with; this module only frames the request and keeps the connections.

The surface: :meth:`Upstream.request` sends one request and returns an :class:`Answer` once the
answer's head has arrived; its body comes as it arrives (:meth:`Answer.chunks`) or whole
(:meth:`Answer.read`). Failures are :class:`Unreachable` (no connection), :class:`TimeoutError`
(nothing from the upstream for ``read_timeout_s``) and :class:`Broken` (the connection ended
mid-answer, or the upstream's bytes are not HTTP).

Connections: one request at a time on each; after a whole answer that allows it the connection
goes back to the pool, else it is closed. A pooled connection the upstream closed meanwhile (a
keep-alive timeout: uvicorn's, under vLLM, is 5 s) is dropped when it is taken, or, when the close
crosses the request, the request is sent once more on a fresh connection if not one byte of an
answer had come back.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

__all__ = ["Answer", "Broken", "Unreachable", "Upstream"]

_HIGH_WATER = 4 << 20  # bytes of answer buffered before the upstream connection stops being read


class Unreachable(ConnectionError):
    """No connection to the upstream."""


class Broken(ConnectionError):
    """The upstream's answer broke off (or is not HTTP)."""


class _Connection(asyncio.Protocol):
    """One connection: the parser's callbacks fill the current :class:`Answer`."""

    def __init__(self, upstream: Upstream):
        self._upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer: Answer | None = None
        self.closed = False
        self.got_bytes = False  # of the current answer
        self.until_close = False  # the current answer's body ends with the connection (no length given)
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0.0

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self._last = self._upstream.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(Broken(f"the upstream's answer is not HTTP ({e})"))

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._stop_timer()
        self._upstream._all.discard(self)
        a = self.answer
        if a is not None and not a.complete:
            if self.until_close and a.head.done():
                self.answer = None
                a._end(None)
            else:
                self._fail(Broken("the upstream closed the connection mid-answer"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.answer.headers.append((name, value))

    def on_headers_complete(self) -> None:
        a = self.answer
        a.status = self.parser.get_status_code()
        names = {k.lower() for k, _ in a.headers}
        self.until_close = b"content-length" not in names and b"transfer-encoding" not in names
        if not a.head.done():
            a.head.set_result(None)
        if a.method == "HEAD":  # no body follows, whatever the headers say
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        self.answer._feed(body)
        if self.answer._buffered > _HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        a = self.answer
        if a is None or a.complete:
            return
        self._stop_timer()
        keep = a.method != "HEAD" and self.parser.should_keep_alive()
        a._end(None)
        self.answer = None
        if keep and not self.closed:
            self._upstream._release(self)
        else:
            self.close()

    # the connection's side
    def send(self, answer: Answer, data: bytes) -> None:
        self.answer, self.got_bytes, self.until_close = answer, False, False
        self._last = self._upstream.loop.time()
        self._arm()
        self.transport.write(data)

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        a, self.answer = self.answer, None
        if a is not None:
            a._end(exc)
        self.close()

    def _arm(self) -> None:
        self._timer = self._upstream.loop.call_at(self._last + self._upstream.read_timeout_s, self._check)

    def _check(self) -> None:
        """Nothing from the upstream for ``read_timeout_s``: the answer times out (else look again later)."""
        self._timer = None
        if self.answer is None:
            return
        if self._upstream.loop.time() - self._last >= self._upstream.read_timeout_s:
            self._fail(TimeoutError(f"nothing from the upstream for {self._upstream.read_timeout_s:g} s"))
        else:
            self._arm()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Answer:
    """The upstream's answer: ``status`` and raw ``headers`` (lowercase names not guaranteed) once
    :meth:`Upstream.request` returns; the body from :meth:`chunks` or :meth:`read`."""

    def __init__(self, method: str, conn: _Connection):
        loop = conn._upstream.loop
        self.method = method
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head = loop.create_future()
        self.complete = False
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None

    def header(self, name: str) -> str:
        """The first value of header ``name`` (case-insensitive), or ``""``."""
        n = name.lower().encode("latin-1")
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == n), "")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked transfer decoded); raises :class:`Broken` or :class:`TimeoutError`."""
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered <= _HIGH_WATER // 2:
                    self._conn.resume()
                yield chunk
            if self._error is not None:
                raise self._error
            if self.complete:
                return
            self._waiter = self._conn._upstream.loop.create_future()
            await self._waiter

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    def close(self) -> None:
        """Stop reading this answer (the client went away): its connection is closed."""
        if not self.complete:
            self._conn._fail(Broken("the answer was abandoned"))

    def _feed(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        self._wake()

    def _end(self, exc: BaseException | None) -> None:
        self.complete = True
        self._error = exc
        if not self.head.done():
            if exc is not None:
                self.head.set_exception(exc)
            else:
                self.head.set_result(None)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Upstream:
    """Kept-alive HTTP/1.1 connections to one upstream (``http://`` or ``https://``; its path is the
    prefix of every request's). Create and use it on one running event loop; :meth:`close` at the end."""

    def __init__(self, url: str, connect_timeout_s: float = 10.0, read_timeout_s: float = 600.0):
        u = urlsplit(url)
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.prefix = u.path.rstrip("/")
        self.host_header = (f"[{self.host}]" if ":" in self.host else self.host) + (f":{u.port}" if u.port else "")
        self._ssl = ssl.create_default_context() if u.scheme == "https" else None
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()

    async def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> Answer:
        """Send ``method target`` (the path and query, after the upstream's own path) with ``headers``
        (no ``Host``, ``Content-Length`` or hop-by-hop ones: this client writes those) and ``body``."""
        lines = [f"{method} {self.prefix}{target} HTTP/1.1\r\nhost: {self.host_header}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers]
        if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            lines.append(f"content-length: {len(body)}\r\n")
        data = "".join(lines).encode("latin-1") + b"\r\n" + body
        for attempt in (0, 1):
            conn, reused = self._take()
            if conn is None:
                conn = await self._connect()
            answer = Answer(method, conn)
            conn.send(answer, data)
            try:
                await answer.head
                return answer
            except Broken:
                if attempt or not reused or conn.got_bytes:
                    raise  # a fresh connection broke, or the upstream had begun to answer
        raise AssertionError("unreachable")

    def _take(self) -> tuple[_Connection | None, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn, True
            self._all.discard(conn)
        return None, False

    async def _connect(self) -> _Connection:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Connection(self), self.host, self.port, ssl=self._ssl,
                                            server_hostname=self.host if self._ssl else None),
                self.connect_timeout_s)
        except (OSError, asyncio.TimeoutError) as e:
            raise Unreachable(type(e).__name__) from None
        self._all.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        self._idle.append(conn)

    def close(self) -> None:
        for conn in self._all:
            conn.close()
        self._all.clear()
        self._idle.clear()
