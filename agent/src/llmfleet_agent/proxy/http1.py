"""The proxy's client for its one hop upstream (the agent to its Ollama, the gateway to an agent): HTTP/1.1
over pooled keep-alive connections, answers parsed by llhttp (httptools), bodies handed on as they arrive.

Only what the hop needs: a request's body is bytes, an async iterator of bytes (sent chunked) or none; an
answer is read as it comes (`async for chunk in response`), whole (`read`, `json`), or dropped (`close`:
an answer not read to its end closes its connection, which is how Ollama learns that a generation is no
longer wanted). No redirects, cookies, proxies, compression or HTTP/2.

Errors: `ConnectError` when no connection could be made (nothing was sent: another host may take the
request), `asyncio.TimeoutError` when connecting or a wait for the next bytes of the answer outlasts its
limit, `UpstreamError` for any other failure (the connection closed early, a malformed answer). A kept-alive
connection that the server had closed before a byte of the answer arrived is retried once on a new one.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

Body = bytes | AsyncIterable[bytes] | None

_HIGH_WATER = 512 * 1024  # unread answer bytes at which reading from the socket pauses (until they are taken)
_ONE_WRITE = 64 * 1024  # a body up to this size goes out with the request's head, in one write
# methods whose request without a body says nothing of one (any other says Content-Length: 0)
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE", "CONNECT"})


class UpstreamError(Exception):
    """The exchange with the upstream server failed."""


class ConnectError(UpstreamError):
    """No connection could be made: nothing of the request was sent."""

    def __init__(self, host: str, port: int, os_error: OSError) -> None:
        super().__init__(f"cannot connect to {host}:{port}: {os_error}")
        self.os_error = os_error


class ConnectionLost(UpstreamError):
    """The connection closed (or failed) before the answer was complete."""


class BadResponse(UpstreamError):
    """The server's answer is not HTTP/1.x as it should be."""


class _Stale(ConnectionLost):
    """The connection closed before a byte of the answer came: a kept-alive one the server had closed."""


@dataclass(frozen=True)
class _Origin:
    host: str
    port: int
    ssl: ssl.SSLContext | None
    host_header: str


def _check(text: str) -> str:
    if "\r" in text or "\n" in text:
        raise ValueError(f"line break in a request header or target: {text!r}")
    return text


class Response:
    """An answer, its head read; its body arrives as it is read."""

    def __init__(self, conn: _Connection, method: str, read_timeout: float) -> None:
        self._conn: _Connection | None = conn
        self._head_only = method == "HEAD"
        self._read_timeout = read_timeout
        # it calls back this object's on_* methods; dropped once the answer is in (no cycle for the GC)
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        # one timer for the read timeout, not one a wait: it checks when the current wait began
        self._timer: asyncio.TimerHandle | None = None
        self._wait_began = 0.0
        self._started = False  # a byte of the answer arrived
        self._head_done = False
        self._until_eof = False  # a body without a length: it ends when the connection does
        self._complete = False
        self._error: BaseException | None = None
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.content_length: int | None = None

    # ----- from the connection (llhttp's callbacks) ---------------------------------
    def _feed(self, data: bytes) -> None:
        self._started = True
        parser = self._parser
        if parser is None:
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"malformed answer: {exc}"))
            conn = self._detach()
            if conn is not None:
                conn.drop()
            self._wake()

    def on_status(self, status: bytes) -> None:
        self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None  # called back by it
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer: the real one follows
            self._raw_headers.clear()
            self.reason = ""
            return
        self.status = status
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in self._raw_headers:
            headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
        self._raw_headers.clear()
        self.headers = CIMultiDictProxy(headers)
        length = headers.get("Content-Length")
        if length is not None and length.isdigit():
            self.content_length = int(length)
        self._head_done = True
        if self._head_only:  # the head is all of it; the connection is not reused (its parser expects more)
            self._complete = True
            conn = self._detach()
            if conn is not None:
                conn.drop()
        elif (
            self.content_length is None
            and status not in (204, 304)
            and "chunked" not in headers.get("Transfer-Encoding", "").lower()
        ):
            self._until_eof = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and self._conn is not None:
            self._conn.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self._head_done:  # the end of an interim answer
            return
        self._complete = True
        assert self._parser is not None  # called back by it
        keep = self._parser.should_keep_alive()
        conn = self._detach()
        if conn is not None:
            conn.release() if keep else conn.drop()
        self._wake()

    def _lost(self, exc: BaseException | None) -> None:
        """The connection closed (EOF or error) while this answer was being read."""
        self._conn = None
        self._parser = None
        self._stop_timer()
        if self._complete:
            return
        if self._until_eof and exc is None:
            self._complete = True
        elif not self._started:
            self._fail(_Stale("the connection closed before an answer"))
        else:
            detail = f": {exc}" if exc is not None else ""
            self._fail(ConnectionLost(f"the connection closed mid-answer{detail}"))
        self._wake()

    # ----- the reader ------------------------------------------------------------------
    def _detach(self) -> _Connection | None:
        conn, self._conn = self._conn, None
        self._parser = None
        self._stop_timer()
        if conn is not None:
            conn.response = None
        return conn

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        """Until more of the answer (or its end, or an error) comes: at most the read timeout."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiter = waiter
        self._wait_began = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(self._wait_began + self._read_timeout, self._check_timeout)
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_timeout(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # not waiting: the next wait arms it again
        due = self._wait_began + self._read_timeout
        loop = waiter.get_loop()
        if loop.time() >= due:
            waiter.set_exception(asyncio.TimeoutError())
        else:  # armed by an earlier wait
            self._timer = loop.call_at(due, self._check_timeout)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _head(self) -> None:
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    def _take(self) -> bytes:
        chunks = self._chunks
        chunk = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._conn is not None:
            self._conn.resume_reading()
        return chunk

    @property
    def ended(self) -> bool:
        """All of the body has come and been taken: the next piece is b""."""
        return self._complete and not self._chunks and self._error is None

    async def next_chunk(self) -> bytes:
        """All of the body that has come and was not taken yet, as soon as there is some (b"" at its end):
        pieces that came together go on together."""
        while True:
            if self._chunks:
                return self._take()
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self.next_chunk()
            if not chunk:
                return
            yield chunk

    async def read(self, limit: int = -1) -> bytes:
        """The body, or its first `limit` bytes (then the rest is not read: close the answer)."""
        parts: list[bytes] = []
        size = 0
        while limit < 0 or size < limit:
            chunk = await self.next_chunk()
            if not chunk:
                break
            if 0 <= limit < size + len(chunk):
                self._chunks.appendleft(chunk[limit - size :])
                self._buffered += len(chunk) - (limit - size)
                chunk = chunk[: limit - size]
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)

    async def json(self) -> Any:
        return json.loads(await self.read())

    def close(self) -> None:
        """Done with the answer: a connection whose answer was not all received is closed, not reused."""
        conn = self._detach()
        if conn is not None:
            conn.drop()
        self._chunks.clear()
        self._buffered = 0

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class _Connection(asyncio.Protocol):
    def __init__(self, pool: Client, origin: _Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self._paused = False
        self._drain: asyncio.Future[None] | None = None

    # ----- asyncio.Protocol ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one without being a subclass

    def data_received(self, data: bytes) -> None:
        if self.response is not None:
            self.response._feed(data)
        else:  # bytes nobody asked for: the connection cannot be trusted
            self.drop()

    def eof_received(self) -> bool:
        self._end(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc)
        self.resume_writing()  # a sender waiting to write finds the connection closed

    def pause_writing(self) -> None:
        self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # ----- the pool's --------------------------------------------------------------------
    def _end(self, exc: BaseException | None) -> None:
        if not self.closed:
            self.closed = True
            self.pool._closed(self)
        response, self.response = self.response, None
        if response is not None:
            response._lost(exc)

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def release(self) -> None:
        """The answer is all read: back to the pool."""
        self.resume_reading()
        self.pool._release(self)

    def drop(self) -> None:
        """Closed, never reused (an unfinished answer: the server sees the connection close)."""
        if self.transport is not None:
            self.transport.close()
        was_open = not self.closed
        self.closed = True
        self.response = None
        if was_open:
            self.pool._closed(self)

    async def drain(self) -> None:
        if self._drain is not None:
            await self._drain
        if self.closed:
            raise ConnectionLost("the connection closed while sending")

    async def send(self, head: bytes, body: Body, response: Response) -> None:
        """Write the request (its head ends with the line its body's framing needs)."""
        transport = self.transport
        assert transport is not None
        self.response = response
        if body is None or isinstance(body, bytes):
            if body and len(body) > _ONE_WRITE:
                transport.write(head)
                transport.write(body)
            else:
                transport.write(head + body if body else head)
            return
        transport.write(head)
        try:
            async for chunk in body:
                if chunk:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    await self.drain()
        except (asyncio.TimeoutError, UpstreamError):  # a stalled source is the caller's to tell
            raise
        except Exception as exc:  # the body's source or the connection failed: the request is lost
            raise ConnectionLost(f"cannot send the request body: {exc!r}") from exc
        transport.write(b"0\r\n\r\n")


class Client:
    """Keep-alive connections to the servers the proxy forwards to: at most `limit` in use at once."""

    def __init__(
        self,
        *,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        keepalive: float = 30.0,
    ) -> None:
        self._limit = limit
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._ssl = ssl_context
        self._keepalive = keepalive
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._in_use: set[_Connection] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False

    def _origin(self, base_url: str) -> _Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            parts = urlsplit(base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"not an http(s) URL: {base_url!r}")
            tls = parts.scheme == "https"
            port = parts.port or (443 if tls else 80)
            context = (self._ssl or ssl.create_default_context()) if tls else None
            host = parts.hostname
            shown = f"[{host}]" if ":" in host else host
            default = port == (443 if tls else 80)
            origin = _Origin(host, port, context, shown if default else f"{shown}:{port}")
            if len(self._origins) < 1024:  # a fleet's hosts: a few
                self._origins[base_url] = origin
        return origin

    async def request(
        self,
        method: str,
        base_url: str,
        target: str,
        headers: Iterable[tuple[str, str]] = (),
        body: Body = None,
    ) -> Response:
        """Send a request (`target`: the path and query) and read the answer's head."""
        if self._closing:
            raise UpstreamError("the client is closed")
        origin = self._origin(base_url)
        lines = [f"{_check(method)} {_check(target)} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
        lines += [f"{_check(name)}: {_check(value)}\r\n" for name, value in headers]
        if isinstance(body, bytes):
            lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        elif body is not None:
            lines.append("Transfer-Encoding: chunked\r\n\r\n")
        else:
            lines.append("\r\n" if method in _NO_BODY_METHODS else "Content-Length: 0\r\n\r\n")
        head = "".join(lines).encode("utf-8", "surrogateescape")
        replayable = body is None or isinstance(body, bytes)
        fresh = False
        while True:
            conn, reused = await self._acquire(origin, fresh)
            response = Response(conn, method, self._read_timeout)
            try:
                await conn.send(head, body, response)
                await response._head()
            except _Stale:
                response.close()
                if reused and replayable:
                    fresh = True
                    continue  # the server had closed the kept-alive connection: once more, on a new one
                raise ConnectionLost("the connection closed before an answer") from None
            except BaseException:
                response.close()
                raise
            return response

    def _reuse(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                self._in_use.add(conn)
                return conn
        return None

    async def _acquire(self, origin: _Origin, fresh: bool) -> tuple[_Connection, bool]:
        """A connection to the origin: a kept-alive one unless `fresh` (then True if it was), or a new one."""
        conn = None if fresh else self._reuse(origin)
        if conn is not None:
            return conn, True
        while len(self._in_use) + self._connecting >= self._limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass on the turn it was given
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            conn = None if fresh else self._reuse(origin)
            if conn is not None:
                return conn, True
        self._connecting += 1
        try:
            conn = await self._connect(origin)
        except BaseException:
            self._connecting -= 1
            self._wake_one()  # its place is free
            raise
        self._connecting -= 1
        self._in_use.add(conn)
        return conn, False

    async def _connect(self, origin: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(self, origin)
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: conn,
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl is not None else None,
                ),
                self._connect_timeout,
            )
        except asyncio.TimeoutError:
            raise
        except OSError as exc:
            raise ConnectError(origin.host, origin.port, exc) from exc
        return conn

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _release(self, conn: _Connection) -> None:
        self._in_use.discard(conn)
        if self._closing or conn.closed:
            conn.drop()
        else:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.origin, []).append(conn)
            if self._sweeper is None:
                loop = asyncio.get_running_loop()
                self._sweeper = loop.call_later(self._keepalive, self._sweep)
        self._wake_one()

    def _closed(self, conn: _Connection) -> None:
        if conn in self._in_use:
            self._in_use.discard(conn)
            self._wake_one()

    def _sweep(self) -> None:
        """Close the connections idle longer than the keep-alive time."""
        self._sweeper = None
        oldest = time.monotonic() - self._keepalive
        remaining = 0
        for origin, conns in list(self._idle.items()):
            kept = [c for c in conns if not c.closed and c.idle_since > oldest]
            for conn in conns:
                if conn not in kept and not conn.closed:
                    conn.drop()
            if kept:
                self._idle[origin] = kept
                remaining += len(kept)
            else:
                del self._idle[origin]
        if remaining:
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive / 2, self._sweep)

    @property
    def idle_connections(self) -> int:
        return sum(len([c for c in conns if not c.closed]) for conns in self._idle.values())

    async def close(self) -> None:
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conns in self._idle.values():
            for conn in conns:
                conn.drop()
        self._idle.clear()
        for conn in list(self._in_use):
            conn.drop()
        self._in_use.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.cancel()
        await asyncio.sleep(0)  # the transports' close callbacks
