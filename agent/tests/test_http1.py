"""The proxy's upstream client (proxy/http1.py) against real servers: the Ollama simulator as a process,
small aiohttp servers, and raw sockets for what a well-behaved server never does."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from postgres import make_ca_and_cert
from support import Proc, free_port, http, wait_until

from llmfleet_agent.proxy.http1 import Client, ConnectError, ConnectionLost, Response, UpstreamError

SIM = Path(sys.executable).parent / "llmfleet-ollama-sim"
CHAT = {"model": "tinyllama", "messages": [{"role": "user", "content": "one two three four five six"}]}
JSON = [("Content-Type", "application/json")]


def _client(**kwargs: object) -> Client:
    options: dict = {"limit": 8, "connect_timeout": 2.0, "read_timeout": 5.0, **kwargs}
    return Client(**options)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Proc]]:
    """The simulator, 0.1 s a token (a stream in pieces), tinyllama pulled."""
    root = tmp_path_factory.mktemp("sim")
    port = free_port()
    env = {"OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_MODELS": str(root / "models")}
    proc = Proc([str(SIM), "serve", "--token-delay", "0.1", "--pull-delay", "0"], root / "sim.log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http("GET", f"{url}/api/version", timeout=2)[0] == 200, 15, "the simulator")
        assert http("POST", f"{url}/api/pull", {"model": "tinyllama", "stream": False})[0] == 200
        yield url, proc
    finally:
        proc.stop()


@asynccontextmanager
async def aiohttp_server(
    routes: list[web.RouteDef], context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    try:
        yield f"{'https' if context else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


Conn = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@asynccontextmanager
async def raw_server(handle: Conn) -> AsyncIterator[tuple[str, list[int]]]:
    """A server that does what `handle` says with each connection (given its number); the list counts
    connections."""
    seen: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(len(seen))
        try:
            await handle(reader, writer, len(seen) - 1)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# ----- the simulator ------------------------------------------------------------------
async def test_answers_whole_and_kept_alive(sim: tuple[str, Proc]) -> None:
    url, _ = sim
    client = _client()
    try:
        for _ in range(3):
            body = json.dumps({**CHAT, "stream": False}).encode()
            async with await client.request("POST", url, "/api/chat", JSON, body) as response:
                assert response.status == 200 and response.reason == "OK"
                assert response.content_length is not None
                answer = await response.json()
            assert answer["done"] is True and answer["message"]["content"]
        assert client.idle_connections == 1  # one connection, reused
        async with await client.request("GET", url, "/api/tags") as response:
            assert [m["name"] for m in (await response.json())["models"]] == ["tinyllama:latest"]
        async with await client.request("HEAD", url, "/") as response:
            assert response.status == 200 and await response.read() == b""
        async with await client.request("GET", url, "/nowhere?x=1") as response:
            assert response.status == 404
            assert response.headers["content-type"].startswith("text/plain")
            assert await response.read(4) == b"404 "
    finally:
        await client.close()


async def test_a_stream_arrives_in_pieces_as_they_come(sim: tuple[str, Proc]) -> None:
    url, _ = sim
    client = _client()
    try:
        body = json.dumps({**CHAT, "stream": True}).encode()
        response = await client.request("POST", url, "/api/chat", JSON, body)
        async with response:
            assert response.headers["Transfer-Encoding"] == "chunked" and response.content_length is None
            loop = asyncio.get_running_loop()
            times, data = [], b""
            async for chunk in response:
                times.append(loop.time())
                data += chunk
        lines = [json.loads(line) for line in data.splitlines()]
        assert lines[-1]["done"] is True and len(lines) > 3
        assert len(times) >= len(lines) - 1  # not gathered: a piece each 0.1 s token
        assert times[-1] - times[0] > 0.2
        assert client.idle_connections == 1
    finally:
        await client.close()


async def test_closing_mid_answer_stops_the_generation(sim: tuple[str, Proc]) -> None:
    url, proc = sim
    client = _client()
    try:
        long = {**CHAT, "stream": True, "options": {"num_predict": 200}}
        response = await client.request("POST", url, "/api/chat", JSON, json.dumps(long).encode())
        assert (await response.next_chunk()).startswith(b"{")
        response.close()
        assert client.idle_connections == 0
        await asyncio.to_thread(
            wait_until,
            lambda: "client disconnected, generation cancelled" in proc.output(),
            10,
            "the simulator to stop generating",
        )
    finally:
        await client.close()


# ----- small aiohttp servers ---------------------------------------------------------
async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "size": len(body),
            "chunked": request.headers.get("Transfer-Encoding"),
            "host": request.headers.get("Host"),
            "x": request.headers.getall("X-Thing", []),
            "query": request.query_string,
        }
    )


async def test_bodies_bytes_and_streamed_chunked() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for _ in range(50):
            yield b"z" * 10_000
            await asyncio.sleep(0)

    async with aiohttp_server([web.post("/echo", echo)]) as url:
        client = _client()
        try:
            headers = [("X-Thing", "a"), ("X-Thing", "b")]
            response = await client.request("POST", url, "/echo?q=1", headers, b"x" * 200_000)
            async with response:
                got = await response.json()
            port = url.rsplit(":", 1)[1]
            expected = {"size": 200_000, "chunked": None, "host": f"127.0.0.1:{port}", "x": ["a", "b"]}
            assert got == {**expected, "query": "q=1"}
            async with await client.request("POST", url, "/echo", (), pieces()) as response:
                got = await response.json()
            assert (got["size"], got["chunked"]) == (500_000, "chunked")
            async with await client.request("POST", url, "/echo") as response:
                assert (await response.json())["size"] == 0
            with pytest.raises(ValueError):
                await client.request("GET", url, "/echo", [("X-Bad", "a\r\nInjected: 1")])
        finally:
            await client.close()


async def test_tls_with_the_gateways_ca(tmp_path: Path) -> None:
    ca, cert, key = make_ca_and_cert(tmp_path / "tls")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    async with aiohttp_server([web.post("/echo", echo)], server_context) as url:
        client = _client(ssl_context=ssl.create_default_context(cafile=str(ca)))
        try:
            for _ in range(2):
                async with await client.request("POST", url, "/echo", (), b"abc") as response:
                    assert (await response.json())["size"] == 3
            assert client.idle_connections == 1
        finally:
            await client.close()
        untrusting = _client()  # the system's CAs: the test CA is not one of them
        try:
            with pytest.raises(ConnectError) as caught:
                await untrusting.request("POST", url, "/echo", (), b"abc")
            assert isinstance(caught.value.os_error, ssl.SSLError)
        finally:
            await untrusting.close()


async def test_connections_in_use_are_limited() -> None:
    active, peak = 0, 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.05)
        active -= 1
        return web.Response(text="done")

    async with aiohttp_server([web.get("/slow", slow)]) as url:
        client = _client(limit=2)
        try:

            async def one() -> bytes:
                async with await client.request("GET", url, "/slow") as response:
                    return await response.read()

            assert await asyncio.gather(*(one() for _ in range(6))) == [b"done"] * 6
            assert peak == 2 and client.idle_connections == 2
        finally:
            await client.close()


async def test_a_failing_body_source_loses_the_request() -> None:
    async def fails(error: Exception) -> AsyncIterator[bytes]:
        yield b"some"
        raise error

    async with aiohttp_server([web.post("/echo", echo)]) as url:
        client = _client()
        try:
            with pytest.raises(asyncio.TimeoutError):  # a stalled source is the caller's to tell
                await client.request("POST", url, "/echo", (), fails(asyncio.TimeoutError()))
            with pytest.raises(ConnectionLost, match="ValueError"):
                await client.request("POST", url, "/echo", (), fails(ValueError("bad chunk")))
            with pytest.raises(ConnectionLost, match="ConnectionResetError"):
                await client.request("POST", url, "/echo", (), fails(ConnectionResetError()))
            assert client.idle_connections == 0
        finally:
            await client.close()


async def test_a_server_closing_during_a_streamed_upload() -> None:
    async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        await reader.read(1000)

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 65536
            await asyncio.sleep(0.001)

    async with raw_server(hangs_up) as (url, _):
        client = _client()
        try:
            with pytest.raises(ConnectionLost, match="closed while sending"):
                await asyncio.wait_for(client.request("POST", url, "/", (), endless()), 10)
        finally:
            await client.close()


# ----- what servers do wrong, or die doing ----------------------------------------------
async def test_connection_refused_is_a_connect_error() -> None:
    client = _client()
    try:
        with pytest.raises(ConnectError) as caught:
            await client.request("GET", f"http://127.0.0.1:{free_port()}", "/")
        assert isinstance(caught.value.os_error, ConnectionRefusedError)
    finally:
        await client.close()


async def test_a_kept_alive_connection_the_server_closed_is_retried_once() -> None:
    async def once_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await read_request(reader)  # the second request on the connection: closed unanswered

    async with raw_server(once_per_connection) as (url, seen):
        client = _client()
        try:
            for expected in (1, 2, 3):
                async with await client.request("GET", url, "/") as response:
                    assert await response.read() == b"ok"
                assert len(seen) == expected  # each retried on a new connection, transparently

            async def body() -> AsyncIterator[bytes]:
                yield b"once"

            # a streamed body cannot be sent again: the failure is the caller's to handle
            with pytest.raises(ConnectionLost):
                await client.request("POST", url, "/", (), body())
        finally:
            await client.close()


async def test_a_new_connection_closed_unanswered_is_not_retried() -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)

    async with raw_server(rude) as (url, seen):
        client = _client()
        try:
            with pytest.raises(ConnectionLost):
                await client.request("GET", url, "/")
            assert len(seen) == 1
        finally:
            await client.close()


async def test_death_mid_answer_is_never_retried() -> None:
    async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()

    async with raw_server(dies) as (url, seen):
        client = _client()
        try:
            response = await client.request("GET", url, "/")
            assert await response.next_chunk() == b"0123456789"
            with pytest.raises(ConnectionLost):
                await response.read()
            assert len(seen) == 1
        finally:
            await client.close()


async def test_read_timeouts_before_and_during_the_answer() -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 0:
            await asyncio.sleep(5)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        if n == 2:  # slow but steady: never a read timeout, however long it takes in all
            for _ in range(6):
                await asyncio.sleep(0.1)
                writer.write(b"4\r\nnext\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        await asyncio.sleep(5)

    async with raw_server(stalls) as (url, _):
        client, steady = _client(read_timeout=0.2), _client(read_timeout=0.25)
        try:
            with pytest.raises(asyncio.TimeoutError):
                await client.request("GET", url, "/")
            response = await client.request("GET", url, "/")
            assert await response.next_chunk() == b"first"
            with pytest.raises(asyncio.TimeoutError):
                await response.next_chunk()
            response.close()
            async with await steady.request("GET", url, "/") as response:
                assert await response.read() == b"first" + b"next" * 6
        finally:
            await client.close()
            await steady.close()


async def test_bodies_to_the_end_of_the_connection_and_connection_close() -> None:
    async def old(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 0:
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of ")
            await writer.drain()
            writer.write(b"it")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 4\r\n\r\ndone")
        await writer.drain()

    async with raw_server(old) as (url, seen):
        client = _client()
        try:
            async with await client.request("GET", url, "/") as response:
                assert response.content_length is None and await response.read() == b"all of it"
            async with await client.request("GET", url, "/") as response:
                assert await response.read() == b"done"
            assert client.idle_connections == 0 and len(seen) == 2
        finally:
            await client.close()


async def test_a_malformed_answer_is_an_upstream_error() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async with raw_server(garbage) as (url, _):
        client = _client()
        try:
            with pytest.raises(UpstreamError):
                await client.request("GET", url, "/")
        finally:
            await client.close()


async def test_pieces_that_came_together_are_taken_together() -> None:
    """What has come goes on as one piece (one write for the proxy, one wake-up for its client), and the
    answer says when its last bytes were taken, so that the proxy sends them with the end."""
    sent_rest = asyncio.Event()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head + b"2\r\nab\r\n2\r\ncd\r\n2\r\nef\r\n")  # three pieces in one write
        await writer.drain()
        await sent_rest.wait()
        writer.write(b"1\r\ng\r\n0\r\n\r\n")  # the last piece and the end
        await writer.drain()
        await asyncio.sleep(1)

    async with raw_server(stream) as (url, _):
        client = _client()
        try:
            async with await client.request("GET", url, "/") as response:
                await wait_for_bytes(response, 6)
                assert await response.next_chunk() == b"abcdef" and not response.ended
                sent_rest.set()
                assert await response.next_chunk() == b"g"
                assert response.ended and await response.next_chunk() == b""
            assert client.idle_connections == 1
        finally:
            await client.close()


async def wait_for_bytes(response: Response, size: int) -> None:
    """Until `size` bytes of the answer's body have come (the answer's own count of them)."""
    deadline = asyncio.get_running_loop().time() + 5
    while response._buffered < size:
        assert asyncio.get_running_loop().time() < deadline, "the pieces did not come"
        await asyncio.sleep(0.01)
